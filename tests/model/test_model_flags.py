"""The shared model flags (--rope-scaling, --layout, ...) of generate, serve, eval and build-data,
and the rope scaling they resolve to, checked at the reference's own setting (16K paths) against
inverse frequencies and attention scale computed here from the YaRN formulas (REFERENCE §6)."""

import argparse
import math
from pathlib import Path

import pytest
import torch
from parathinker.testing.checkpoints import make_checkpoint

from parathinker import cli_args
from parathinker.cli import main
from parathinker.config import parse_rope_scaling, resolve_rope_scaling
from parathinker.eval.config import EvalConfig
from tests import ROOT

# The reference example's hf_overrides for 16384-token paths, typed (REFERENCE §6).
REFERENCE_16K = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 9280,
                 "beta_fast": 32, "beta_slow": 1}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
QWEN2 = {"model_type": "qwen2"}
LLAMA = {"model_type": "llama", "rope_scaling": LLAMA3}


@pytest.mark.parametrize("choice,checkpoint,budget,parallel,expected", [
    ("auto", QWEN2, 16384, True, REFERENCE_16K),
    ("auto", QWEN2, 8192, True, None),  # no scaling up to 8192 tokens
    ("auto", QWEN2, 32768, False, None),  # plain traces (sequential baseline): as the checkpoint is
    ("auto", LLAMA, 16384, True, LLAMA3),  # a checkpoint's own scaling is never overridden
    ("auto", {"model_type": "llama"}, 16384, True, None),  # the reference YaRN is Qwen2's
    ("none", QWEN2, 16384, True, None),
    ("none", LLAMA, 16384, True, LLAMA3),  # none adds nothing; the checkpoint's own stays
    ("reference", LLAMA, 16384, True, REFERENCE_16K),  # forced, as the reference's hf_overrides
    ("reference", LLAMA, 4096, True, None),  # the reference's factor 1: plain RoPE
    ("reference", QWEN2, 32768, False, {**REFERENCE_16K, "factor": 4.0}),
    ({"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 4096}, LLAMA, 16, True,
     {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 4096}),
    ({"rope_type": "default"}, LLAMA, 16384, True, None),
])
def test_resolve_rope_scaling(choice, checkpoint, budget, parallel, expected):
    assert resolve_rope_scaling(choice, checkpoint, budget, parallel) == expected


def test_parse_rope_scaling():
    assert parse_rope_scaling("auto") == "auto" and parse_rope_scaling("none") == "none"
    assert parse_rope_scaling('{"rope_type": "yarn", "factor": 2}') == {"rope_type": "yarn", "factor": 2}
    for bad in ("checkpoint", "[1]", '{"rope_type": "dynamic"}'):
        with pytest.raises(ValueError):
            parse_rope_scaling(bad)


def test_eval_rope_follows_the_checkpoint():
    """eval used to apply the reference YaRN whatever the model type."""
    llama = EvalConfig(model="m", output="o", modes=("parathinker", "sequential"), checkpoint=LLAMA)
    assert llama.rope_for("parathinker") == LLAMA3 and llama.rope_for("sequential") == LLAMA3
    qwen = EvalConfig(model="m", output="o", modes=("parathinker", "sequential"), checkpoint=QWEN2)
    assert qwen.rope_for("parathinker") == REFERENCE_16K and qwen.rope_for("sequential") is None
    endpoint = EvalConfig(model="m", output="o", modes=("sequential",), endpoint="http://x/v1",
                          rope_scaling="reference", checkpoint=QWEN2)
    assert endpoint.rope_for("sequential") is None  # a server has its own


def test_flags_are_one_group_with_defaults_shown():
    for command in ("generate", "serve", "eval", "build-data"):
        p = argparse.ArgumentParser()
        sub = p.add_subparsers(dest="c")
        from parathinker.cli import add_generate_args
        from parathinker.eval.cli import add_eval_args
        from parathinker.serve.cli import add_serve_args
        from parathinker.train.cli import add_build_data_args

        adder = {"generate": add_generate_args, "serve": add_serve_args, "eval": add_eval_args,
                 "build-data": add_build_data_args}[command]
        sp = sub.add_parser(command)
        adder(sp)
        text = sp.format_help()
        for flag in ("--device", "--dtype", "--rope-scaling", "--layout", "--linear", "--attention"):
            assert text.count(flag + " ") >= 1, (command, flag)
        assert "Default: auto" in text and "(default: native)" in text, command
    # the copies kept free of torch match the engine's own lists
    from parathinker.attention.paged import BACKENDS
    from parathinker.engine import LAYOUTS
    from parathinker.model.fast_linear import LINEAR_BACKENDS

    assert cli_args.LAYOUTS == LAYOUTS and cli_args.LINEAR_BACKENDS == LINEAR_BACKENDS
    assert cli_args.ATTENTION_BACKENDS == BACKENDS


def test_layout_flag_values():
    p = argparse.ArgumentParser()
    cli_args.add_model_args(p, layout_list=True)
    assert p.parse_args(["--model", "m", "--layout", "native,reference"]).layout == ("native", "reference")
    assert p.parse_args(["--model", "m"]).layout == ("native",)
    one = argparse.ArgumentParser()
    cli_args.add_model_args(one)
    assert one.parse_args(["--model", "m", "--layout", "reference"]).layout == "reference"
    for parser, bad in ((p, "native,tree"), (one, "native,reference")):
        with pytest.raises(SystemExit):
            parser.parse_args(["--model", "m", "--layout", bad])


def _yarn_by_hand(dim, base, factor, orig, beta_fast, beta_slow):
    """vLLM's YaRNScalingRotaryEmbedding, written out from the formulas."""
    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = math.floor(correction_dim(beta_fast)), math.ceil(correction_dim(beta_slow))
    low, high = max(low, 0), min(high, dim - 1)
    inv = []
    for i in range(dim // 2):
        extrap = 1.0 / base ** (2 * i / dim)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        keep = 1.0 - ramp  # 1: the frequency is kept (high frequencies), 0: divided by factor
        inv.append(extrap / factor * (1 - keep) + extrap * keep)
    return low, high, inv, 0.1 * math.log(factor) + 1.0


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory, tokenizer):
    """A tiny Qwen2 checkpoint with the 1.5B's head_dim 128 and rope_theta 1e4."""
    return make_checkpoint(tmp_path_factory.mktemp("long"), tokenizer=tokenizer, head_dim=128,
                           max_position_embeddings=131072)


def _small_pool(monkeypatch):
    """LLMs built by the CLI get a small KV pool (the default 4 GiB takes seconds to zero)."""
    from parathinker.llm import LLM

    real = LLM.__init__

    def init(self, *a, **k):
        k["num_kv_blocks"] = k.get("num_kv_blocks") or 16
        real(self, *a, **k)

    monkeypatch.setattr(LLM, "__init__", init)


def _llm_of(monkeypatch, argv):
    """The LLM `parathinker <argv>` builds, caught before it generates anything."""
    from parathinker.llm import LLM

    _small_pool(monkeypatch)
    seen = []

    def stop(self, *a, **k):
        seen.append(self)
        raise ValueError("stopped by the test")

    monkeypatch.setattr(LLM, "generate", stop)
    assert main(argv) == 2
    return seen[0]


def test_generate_runs_16k_paths_with_the_reference_yarn(long_ckpt, monkeypatch):
    low, high, inv, mscale = _yarn_by_hand(128, 10000.0, 2.0, 9280, 32, 1)
    assert (low, high) == (26, 51)  # REFERENCE §6
    assert abs(mscale - 1.0693) < 1e-4
    llm = _llm_of(monkeypatch, ["generate", "--model", str(long_ckpt), "--device", "cpu",
                                "--max-path-tokens", "16384", "What is 7 * 8?"])
    assert llm.config.rope_scaling == REFERENCE_16K and llm.layout == "native"
    torch.testing.assert_close(llm.model.inv_freq, torch.tensor(inv, dtype=torch.float32),
                               rtol=1e-6, atol=0)
    assert abs(llm.model.rope_scale - mscale) < 1e-6  # multiplies cos and sin
    # below 8192 tokens nothing is added; --rope-scaling none adds nothing either
    plain = [1.0 / 10000.0 ** (2 * i / 128) for i in range(64)]
    for extra in (["--max-path-tokens", "4096"], ["--rope-scaling", "none"]):
        llm = _llm_of(monkeypatch, ["generate", "--model", str(long_ckpt), "--device", "cpu",
                                    *extra, "What is 7 * 8?"])
        assert llm.config.rope_scaling is None and llm.model.rope_scale == 1.0
        torch.testing.assert_close(llm.model.inv_freq, torch.tensor(plain), rtol=1e-6, atol=0)


def test_a_llama_checkpoint_keeps_its_llama3(tmp_path, tokenizer, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "llama", model_type="llama", tokenizer=tokenizer,
                           rope_scaling=LLAMA3, max_position_embeddings=131072)
    llm = _llm_of(monkeypatch, ["generate", "--model", str(ckpt), "--device", "cpu",
                                "--max-path-tokens", "16384", "q"])
    assert llm.config.rope_scaling == LLAMA3


def test_serve_derives_yarn_from_its_path_budget_and_reports_it(long_ckpt, monkeypatch):
    from starlette.testclient import TestClient

    import parathinker.serve.app as app_module

    made = []
    real = app_module.create_app

    def capture(llm, *a, **k):
        made.append(real(llm, "tiny"))
        raise ValueError("stopped by the test")

    monkeypatch.setattr(app_module, "create_app", capture)
    _small_pool(monkeypatch)
    assert main(["serve", "--model", str(long_ckpt), "--device", "cpu", "--max-path-tokens", "16384"]) == 2
    body = TestClient(made[0], base_url="http://127.0.0.1").get("/v1/models").json()
    (card,) = body["data"]
    assert card["rope_scaling"] == REFERENCE_16K and card["layout"] == "native"


def _rope_each_command_loads(monkeypatch, tmp_path, model, *flags):
    """{command: the rope_scaling its LLM is built with}, each command run with its defaults on
    `model` and stopped as it builds the LLM (no weights are loaded)."""
    from parathinker.llm import LLM

    seen = []

    def stop(self, *a, **k):
        seen.append(k["rope_scaling"])
        raise ValueError("stopped by the test")

    monkeypatch.setattr(LLM, "__init__", stop)
    data = tmp_path / "q.jsonl"
    data.write_text('{"id": "1", "problem": "Solve 5x + 4 = 7 modulo 13.", "answer": "11"}\n')
    argvs = {"generate": ["generate", "Solve 5x + 4 = 7 modulo 13."],
             "eval": ["eval", "--data", str(data), "--output", str(tmp_path / f"out-{Path(model).name}-{len(flags)}")],
             "serve": ["serve"]}
    out = {}
    for command, argv in argvs.items():
        assert main([*argv, "--model", str(model), "--device", "cpu", *flags]) == 2
        out[command] = seen.pop()
    return out


def test_every_command_resolves_rope_scaling_by_one_rule(long_ckpt, monkeypatch, tmp_path):
    """The default 16,384-token paths do not fit the demo model's 2,048 positions: every command
    lowers them first, so none turns on a YaRN the model never saw; a Qwen2 checkpoint whose
    context holds them gets the reference's YaRN (SPEC §5.6) from each command alike."""
    demo = ROOT / "docs" / "demo" / "model"
    assert '"max_position_embeddings": 2048' in (demo / "config.json").read_text()
    plain = {"rope_type": "default"}  # LLM(rope_scaling=...) for plain RoPE
    assert _rope_each_command_loads(monkeypatch, tmp_path, demo) == \
        {"generate": plain, "eval": plain, "serve": plain}
    assert _rope_each_command_loads(monkeypatch, tmp_path, long_ckpt) == \
        {"generate": REFERENCE_16K, "eval": REFERENCE_16K, "serve": REFERENCE_16K}
    assert _rope_each_command_loads(monkeypatch, tmp_path, long_ckpt, "--max-path-tokens", "24576") == \
        {c: {**REFERENCE_16K, "factor": 3.0} for c in ("generate", "eval", "serve")}


def test_compile_flag_on_every_model_command():
    """--compile / --no-compile (default: per device) on every command that loads a model, passed
    on as LLM(compile=...)."""
    from parathinker.cli import add_generate_args
    from parathinker.eval.cli import add_eval_args
    from parathinker.serve.cli import add_serve_args
    from parathinker.train.cli import add_build_data_args

    for adder in (add_generate_args, add_serve_args, add_eval_args, add_build_data_args):
        p = argparse.ArgumentParser()
        adder(p)
        assert "--compile, --no-compile" in p.format_help(), adder.__name__
    p = argparse.ArgumentParser()
    cli_args.add_model_args(p)
    for argv, want in (([], None), (["--compile"], True), (["--no-compile"], False)):
        args = p.parse_args(["--model", "m", *argv])
        assert args.compile is want and cli_args.llm_kwargs(args, None)["compile"] is want
