"""Issue 23 on the server, with the official openai client against the demo model (docs/demo/model,
whose paths box their answers): path objects and per-path stream deltas carry each path's
confidence and answer, equal to the Python API's (`LLM.generate`, same seed); the gating fields
work nested in `parallel` and flat; bad values are a 400 naming the field; /v1/models lists them."""

from __future__ import annotations

import httpx
import openai
import pytest
from parathinker.testing.servers import MODEL, client, running_server

from parathinker import LLM
from parathinker.config import SamplingParams
from parathinker.demo.config import DemoConfig
from parathinker.spec.answers import normalize_answer
from parathinker.spec.tokens import last_boxed
from tests import ROOT

pytest.importorskip("uvicorn")
DEMO = ROOT / "docs" / "demo" / "model"
QUESTION = "Solve 5x + 4 = 7 modulo 13."
EIGHT = {"num_paths": 8, "max_path_tokens": DemoConfig().max_path_tokens,
         "max_summary_tokens": DemoConfig().max_summary_tokens, "min_finished_paths": 8}
SEED = 3


@pytest.fixture(scope="module")
def demo():
    """(base URL, a second LLM of the same model for the Python API's outputs)."""
    llm = LLM(str(DEMO), device="cpu", dtype="float32", num_kv_blocks=512)
    with running_server(llm, defaults=SamplingParams(**EIGHT, temperature=1.0)) as url:
        yield url, LLM(str(DEMO), device="cpu", dtype="float32", num_kv_blocks=512)


def ask(base: str, seed: int = SEED, **extra):
    return client(base).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], temperature=1.0, seed=seed,
        extra_body=extra)


def test_path_objects_carry_the_engines_confidence_and_answer(demo):
    base, llm = demo
    out = ask(base, parallel={**EIGHT, "confidence_window": 8, "confidence_top_k": 5})
    paths = sorted(out.choices[0].message.model_extra["paths"], key=lambda p: p["index"])
    (want,) = llm.generate(QUESTION, SamplingParams(**EIGHT, temperature=1.0, seed=SEED,
                                                    confidence_window=8, confidence_top_k=5))
    assert [p["text"] for p in paths] == [p.text for p in want.paths]
    assert [p["confidence"] for p in paths] == pytest.approx([p.confidence for p in want.paths], abs=1e-6)
    assert all(isinstance(p["confidence"], float) and p["confidence"] > 0 for p in paths)
    assert [p["answer"] for p in paths] == [last_boxed(p["text"]) for p in paths]
    assert sum(p["answer"] is not None for p in paths) >= 2  # the demo model boxes its answers
    # without a window: no confidence, answers still there
    plain = ask(base, parallel=EIGHT).choices[0].message.model_extra["paths"]
    assert all(p["confidence"] is None for p in plain) and any(p["answer"] for p in plain)
    hidden = ask(base, parallel={**EIGHT, "confidence_window": 8, "confidence_top_k": 5},
                 include_reasoning=False)
    hidden_paths = hidden.choices[0].message.model_extra["paths"]
    assert all("answer" not in p and "text" not in p for p in hidden_paths)  # pieces of the reasoning
    assert [p["confidence"] for p in hidden_paths] == [p["confidence"] for p in paths]


def test_stream_deltas_carry_them_at_each_paths_finish(demo):
    base, _ = demo
    gated = {**EIGHT, "confidence_window": 8}
    whole = {p["index"]: p for p in ask(base, parallel=gated).choices[0].message.model_extra["paths"]}
    finishes, content = {}, {}
    for chunk in client(base).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": QUESTION}], temperature=1.0, seed=SEED,
            stream=True, stream_options={"include_paths": True}, extra_body={"parallel": gated}):
        for choice in chunk.choices:
            extra = choice.delta.model_extra or {}
            if "path_content" in extra:
                content[extra["path_index"]] = content.get(extra["path_index"], "") + extra["path_content"]
            if "path_finish_reason" in extra:
                assert extra["path_index"] not in finishes  # once per path
                finishes[extra["path_index"]] = extra
    assert sorted(finishes) == list(range(1, 9))
    for k, d in finishes.items():
        assert d["path_finish_reason"] == whole[k]["finish_reason"]
        assert d["path_confidence"] == pytest.approx(whole[k]["confidence"], abs=1e-6)
        assert d["path_answer"] == whole[k]["answer"] == last_boxed(content[k])


def test_agreement_and_pruning_nested_and_flat(demo):
    base, _ = demo
    # seed 1: two paths box 11 by token 43, while six are still thinking
    nested = ask(base, 1, parallel={**EIGHT, "stop_on_agreement": 2})
    flat = ask(base, 1, **EIGHT, stop_on_agreement=2)
    paths = nested.choices[0].message.model_extra["paths"]
    assert paths == flat.choices[0].message.model_extra["paths"]
    assert any(p["finish_reason"] == "cut" for p in paths)  # 8 paths waited for: agreement cut them
    ended = [normalize_answer(p["answer"]) for p in paths if p["finish_reason"] == "end" and p["answer"]]
    assert max(ended.count(a) for a in ended) >= 2
    # a threshold above every confidence prunes every path but one, each below it
    pruned = ask(base, parallel={**EIGHT, "confidence_window": 4},
                 prune_confidence=1e6).choices[0].message.model_extra["paths"]
    assert sorted(p["finish_reason"] == "pruned" for p in pruned) == [False] + [True] * 7
    assert all(p["confidence"] < 1e6 for p in pruned)


@pytest.mark.parametrize("extra, param, says", [
    ({"parallel": {"prune_confidence": 1.0}}, "parallel.prune_confidence", "needs confidence_window"),
    ({"prune_confidence": "high", "confidence_window": 4}, "prune_confidence", "must be a number"),
    ({"parallel": {"confidence_window": -1}}, "parallel.confidence_window", "must be >= 0"),
    ({"confidence_top_k": 0}, "confidence_top_k", "must be >= 1"),
    ({"parallel": {"num_paths": 4, "stop_on_agreement": 5}}, "parallel.stop_on_agreement", "0..num_paths=4"),
    ({"stop_on_agreement": 2, "parallel": {"stop_on_agreement": 3}}, "stop_on_agreement", "set it once"),
])
def test_bad_values_are_400s_naming_the_field(demo, extra, param, says):
    with pytest.raises(openai.BadRequestError) as e:
        ask(demo[0], **extra)
    assert e.value.body["param"] == param and says in e.value.body["message"]


def test_models_card_lists_the_parallel_fields(demo):
    card = httpx.get(f"{demo[0]}/v1/models").json()["data"][0]
    assert {k: card["parallel_fields"][k] for k in ("confidence_window", "confidence_top_k",
                                                    "prune_confidence", "stop_on_agreement")} == \
        {"confidence_window": "integer", "confidence_top_k": "integer", "prune_confidence": "number",
         "stop_on_agreement": "integer"}
    assert card["parallel_fields"]["num_paths"] == "integer"


@pytest.mark.parametrize("flags, says", [
    (["--layout", "reference", "--stop-on-agreement", "2"], "not supported in the reference layout"),
    (["--prune-confidence", "1.5"], "prune_confidence needs confidence_window > 0"),
])
def test_bad_gating_defaults_refuse_to_start_before_anything_loads(flags, says, tmp_path, capsys):
    """A --layout reference server with gating defaults would refuse every request: it refuses to
    start instead. The model does not exist: an error naming it would mean a check came too late."""
    from parathinker.serve.cli import main

    assert main(["--model", str(tmp_path / "no-such-model"), *flags]) == 2
    err = capsys.readouterr().err
    assert says in err and "no-such-model" not in err, err
