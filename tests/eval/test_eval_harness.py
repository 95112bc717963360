"""`parathinker eval` end to end on CPU with a tiny random checkpoint: every mode writes the samples,
summary, report and plot; a run killed halfway and resumed ends with exactly the records of an
uninterrupted run, none twice; bad input fails clearly before anything is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from parathinker.eval.cli import main
from parathinker.eval.config import EvalConfig
from parathinker.eval.plan import Unit, derive_seed, request_params
from parathinker.eval.records import build_record
from parathinker.engine.outputs import PathOutput, RequestOutput, SummaryOutput
from tests import SHARED

BENCH = SHARED / "benchmarks"
needs_bench = pytest.mark.skipif(not (BENCH / "amc23.jsonl").is_file(), reason=f"no benchmarks in {BENCH}")

CUSTOM = [{"id": "c1", "problem": "What is 2+3?", "answer": "5"},
          {"id": "c2", "problem": "What is 6*7?", "answer": 42}]


def _args(ckpt: Path, out: Path, custom: Path) -> list[str]:
    """3 benchmarks x 2 problems x (P=1, P=2, sequential, maj@2) x 2 samples = 48 samples."""
    return ["--model", str(ckpt), "--device", "cpu", "--benchmark", "amc23,math500,mine",
            "--data", f"mine={custom}", "--mode", "parathinker,sequential,majority", "--paths", "1,2",
            "--majority-n", "2", "--samples", "2", "--limit", "2", "--max-path-tokens", "12",
            "--max-summary-tokens", "90", "--max-tokens", "20", "--output", str(out)]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _key(r: dict) -> tuple:
    return (r["benchmark"], r["mode"], r["num_paths"], r["id"], r["sample"])


def _expected_keys() -> set[tuple]:
    math_ids = [json.loads(line)["id"] for line in (BENCH / "math500.jsonl").read_text().splitlines()[:2]]
    amc_ids = [json.loads(line)["id"] for line in (BENCH / "amc23.jsonl").read_text().splitlines()[:2]]
    return {(b, m, n, i, s) for b, ids in (("amc23", amc_ids), ("math500", math_ids), ("mine", ("c1", "c2")))
            for m, n in (("parathinker", 1), ("parathinker", 2), ("sequential", 1), ("majority", 2))
            for i in ids for s in (0, 1)}


@pytest.fixture(scope="module")
def custom_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CUSTOM), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def full_run(ckpt_dir, custom_file, tmp_path_factory) -> Path:
    """One uninterrupted run of every mode (the reference the resume test is compared with)."""
    if not (BENCH / "amc23.jsonl").is_file():
        pytest.skip(f"no benchmarks in {BENCH}")
    out = tmp_path_factory.mktemp("full")
    assert main(_args(ckpt_dir, out, custom_file)) == 0
    return out


@needs_bench
def test_every_mode_writes_samples_summary_report_plot(full_run: Path, capsys) -> None:
    records = _records(full_run / "samples.jsonl")
    keys = [_key(r) for r in records]
    assert len(keys) == len(set(keys)) == 48 and set(keys) == _expected_keys()
    for r in records:
        for f in ("benchmark", "id", "mode", "num_paths", "sample", "seed", "gold", "answer", "correct",
                  "prompt_tokens", "total_tokens", "latency_s", "error", "settings"):
            assert f in r, (f, r)
        assert r["error"] is None and r["latency_s"] > 0 and r["prompt_tokens"] > 10
        assert r["settings"]["temperature"] == 0.5 and r["settings"]["backend"] == "engine"
        if r["mode"] == "parathinker":
            assert len(r["path_answers"]) == len(r["path_tokens"]) == len(r["path_finish"]) == r["num_paths"]
            assert all(2 <= n <= 12 for n in r["path_tokens"]) and r["summary_tokens"] <= 90
            assert r["total_tokens"] == sum(r["path_tokens"]) + r["summary_tokens"]
            assert r["summary"].startswith("By analyzing multiple reasoning processes above")
            assert r["any_path_correct"] == any(r["path_correct"])
            assert isinstance(r["majority_over_paths_correct"], bool)
        elif r["mode"] == "majority":
            assert len(r["path_answers"]) == len(r["path_tokens"]) == 2
            assert r["total_tokens"] == sum(r["path_tokens"]) and max(r["path_tokens"]) <= 12  # per-path budget
        else:
            assert 1 <= r["total_tokens"] <= 20 and r["finish_reason"] in ("end", "budget")
    seeds = [r["seed"] for r in records]
    assert len(set(seeds)) == len(seeds)  # every sample its own seed
    assert {r["gold"] for r in records if r["benchmark"] == "mine"} == {"5", "42"}

    doc = json.loads((full_run / "summary.json").read_text())
    assert list(doc["summary"]) == ["amc23", "math500", "mine"]
    assert list(doc["summary"]["amc23"]) == ["sequential", "P=1", "P=2", "majority@2"]
    p2 = doc["summary"]["mine"]["P=2"]
    assert (p2["num_problems"], p2["num_samples"]) == (2, 4) and "oracle_accuracy" in p2
    cfg = doc["config"]
    assert cfg["status"] == "finished" and cfg["git_commit"] and cfg["parathinker_version"]
    assert cfg["timestamp"] and cfg["config"]["temperature"] == 0.5 and cfg["config"]["seed"] == 0
    assert cfg["engines"]["parathinker"]["device"] == "cpu" and cfg["engines"]["parathinker"]["dtype"] == "float32"
    assert cfg["config"]["resolved_max_tokens"] == 20 and "api_key" not in cfg["config"]
    report = (full_run / "report.md").read_text()
    assert "| benchmark | sequential | P=1 | P=2 | majority@2 |" in report and "Tokens and latency" in report
    assert "Any path correct (oracle)" in report and "Majority vote over paths" in report
    assert (full_run / "accuracy_vs_paths.png").read_bytes()[:4] == b"\x89PNG"
    runs = _records(full_run / "runs.jsonl")
    assert len(runs) == 1 and runs[0]["num_samples_run"] == 48


_KILLER = """
import os, signal, sys
from parathinker.eval import results
append, n = results.SampleStore.append, [0]
def killing_append(self, record):
    append(self, record)
    n[0] += 1
    if n[0] == int(os.environ["KILL_AFTER"]):
        # SIGKILL: no cleanup, no finally, as a power cut or OOM kill; or KILL_SIGNAL
        os.kill(os.getpid(), getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL")))
results.SampleStore.append = killing_append
from parathinker.eval.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "latency_s"}


@needs_bench
def test_killed_run_resumes_without_loss_or_repeats(full_run, ckpt_dir, custom_file, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    args = _args(ckpt_dir, out, custom_file)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KILL_AFTER": "7"}
    r = subprocess.run([sys.executable, "-c", _KILLER, *args], env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == -signal.SIGKILL, r.stderr
    samples = out / "samples.jsonl"
    before = samples.read_bytes()
    assert before.count(b"\n") == 7
    with samples.open("ab") as f:  # and the kill landed in the middle of writing the 8th line
        f.write(b'{"benchmark": "amc23", "id": "amc23-12A-01", "mo')

    assert main(args) == 2  # without --resume: refused, nothing touched
    assert "--resume" in capsys.readouterr().err
    assert samples.read_bytes().startswith(before)

    with pytest.warns(UserWarning, match="truncated last line"):
        assert main([*args, "--resume"]) == 0
    after = samples.read_bytes()
    assert after.startswith(before)  # the stored samples are kept byte for byte
    records = _records(samples)
    keys = [_key(r) for r in records]
    assert len(keys) == len(set(keys)) == 48 and set(keys) == _expected_keys()
    # reproducible from the seed: the same samples as the uninterrupted run
    reference = {_key(r): _strip(r) for r in _records(full_run / "samples.jsonl")}
    assert {_key(r): _strip(r) for r in records} == reference
    runs = _records(out / "runs.jsonl")
    assert [r["num_samples_run"] for r in runs] == [41]  # the killed run never got to write its line
    assert "resuming: 7 samples already stored, 41 to run" in capsys.readouterr().err


@needs_bench
def test_resume_refuses_other_settings(full_run, ckpt_dir, custom_file, tmp_path, capsys) -> None:
    out = tmp_path / "copy"
    out.mkdir()
    (out / "samples.jsonl").write_bytes((full_run / "samples.jsonl").read_bytes())
    args = [a if a != str(full_run) else str(out) for a in _args(ckpt_dir, full_run, custom_file)]
    assert main([*args, "--resume", "--temperature", "0.7"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "temperature: stored 0.5, now 0.7" in err
    assert (out / "samples.jsonl").read_bytes() == (full_run / "samples.jsonl").read_bytes()


def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, capsys) -> None:
    def fails(*extra: str) -> str:
        out = tmp_path / "out"
        assert main(["--model", str(tmp_path / "no-model"), "--output", str(out), "--device", "cpu",
                     "--limit", "1", *extra]) == 2
        assert not (out / "samples.jsonl").exists() or not (out / "samples.jsonl").read_bytes()
        return capsys.readouterr().err

    missing = tmp_path / "missing.jsonl"
    assert f"benchmark file not found: {missing}" in fails("--benchmark", "x", "--data", str(missing))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "problem": "p", "answer": "1"}\n{"id": "b", "problem": \n')
    assert f"{bad}:2: invalid JSON" in fails("--benchmark", "x", "--data", str(bad))
    bad.write_text('{"id": "a", "problem": "p", "answer": "1"}\n{"id": "b", "problem": "q"}\n')
    assert f"{bad}:2: field 'answer' must be a non-empty string (missing)" in fails(
        "--benchmark", "x", "--data", str(bad))
    assert "unknown benchmark 'aime23'" in fails("--benchmark", "aime23")
    assert "unknown mode(s) tree" in fails("--mode", "tree")
    assert "--endpoint must be an http(s) URL" in fails("--endpoint", "127.0.0.1:9")
    assert "--concurrency must be >= 1, got 0" in fails("--endpoint", "http://127.0.0.1:9", "--concurrency", "0")
    assert "one --data FILE per --benchmark" in fails("--benchmark", "a,b", "--data", str(bad))
    assert "--samples must be >= 1" in fails("--samples", "0")
    assert "--limit must be >= 1, got 0" in fails("--limit", "0")  # not an empty report and exit 0
    assert "top_p must be in (0, 1]" in fails("--top-p", "0")


def _output(paths: list[tuple[str, int]], summary: str) -> RequestOutput:
    outs = [PathOutput(k + 1, list(range(n)), text, "end") for k, (text, n) in enumerate(paths)]
    return RequestOutput([1] * 30, outs, SummaryOutput(list(range(9)), summary, "end"), None,
                         {"latency_s": 0.5})


def test_parathinker_record_grades_summary_paths_vote_and_oracle() -> None:
    cfg = EvalConfig(model="m", output="o", modes=("parathinker",), paths=(3,))
    unit = Unit("b", {"id": "q", "problem": "?", "answer": "\\frac{1}{2}"}, "parathinker", 3, 0)
    out = _output([("so \\boxed{0.5}", 5), ("maybe \\boxed{3}", 7), ("\\boxed{\\frac12}", 4)],
                  "The final answer is \\boxed{\\dfrac{1}{2}}.")
    r = build_record(cfg, unit, [out])
    assert (r["answer"], r["correct"]) == ("\\dfrac{1}{2}", True)
    assert r["path_answers"] == ["0.5", "3", "\\frac12"] and r["path_correct"] == [True, False, True]
    assert r["any_path_correct"] and r["majority_over_paths_correct"] and r["majority_answer"] == "0.5"
    assert (r["path_tokens"], r["summary_tokens"], r["total_tokens"], r["prompt_tokens"]) == ([5, 7, 4], 9, 25, 30)
    # the summary is wrong and has no box; one path was right: the oracle sees it, the vote does not
    out = _output([("\\boxed{3}", 5), ("\\boxed{0.5}", 7), ("\\boxed{3}", 4)], "The final answer is 1/2")
    r = build_record(cfg, unit, [out])
    assert (r["answer"], r["correct"], r["any_path_correct"], r["majority_over_paths_correct"]) == \
        (None, False, True, False)
    # a request the engine could not run is stored with its error and counts as wrong
    failed = RequestOutput([1] * 30, [], SummaryOutput([], "", "failed"), None, {"latency_s": 0.1},
                           error="request needs 900 KV blocks, the pool has 48")
    r = build_record(cfg, unit, [failed])
    assert (r["correct"], r["any_path_correct"], r["path_answers"], r["error"]) == \
        (False, False, [], "request needs 900 KV blocks, the pool has 48")


def test_seeds_are_per_sample_and_stable() -> None:
    cfg = EvalConfig(model="m", output="o", modes=("majority",), majority_n=(4,), seed=3)
    unit = Unit("b", {"id": "q", "problem": "?", "answer": "1"}, "majority", 4, 2)
    params = request_params(cfg, unit)
    assert len(params) == 4 and len({p.seed for p in params}) == 4
    assert all(p.max_tokens == cfg.max_path_tokens for p in params)  # maj@N at P x per-path budget
    assert unit.seed(3) == derive_seed(3, "b", "majority", 4, "q", 2) == 1117713903  # fixed forever
    assert unit.seed(3) != unit.seed(4) != Unit("b", unit.problem, "majority", 4, 1).seed(4)


def test_baselines_run_on_a_base_model_and_parathinker_mode_is_refused(custom_file, tmp_path):
    """Sequential and majority on a checkpoint without ParaThinker tokens (the paper's
    DeepSeek-R1-Distill baseline); asking it for parallel paths is a clear error."""
    from parathinker.testing.checkpoints import make_checkpoint

    from parathinker.testing.tiny import train_tokenizer

    tok = train_tokenizer(["What is 2+3? The answer is 5."] * 20, vocab_size=300, with_paths=False)
    base = make_checkpoint(tmp_path / "base", tokenizer=tok)
    out = tmp_path / "out"
    args = ["--model", str(base), "--device", "cpu", "--benchmark", "mine", "--data", f"mine={custom_file}",
            "--max-path-tokens", "12", "--max-tokens", "12", "--majority-n", "2", "--output", str(out)]
    assert main([*args, "--mode", "sequential,majority"]) == 0
    records = _records(out / "samples.jsonl")
    assert sorted((r["mode"], r["id"]) for r in records) == [("majority", "c1"), ("majority", "c2"),
                                                             ("sequential", "c1"), ("sequential", "c2")]
    assert all(r["error"] is None for r in records)
    assert main([*args, "--mode", "parathinker", "--paths", "2", "--resume"]) == 2
    assert len(_records(out / "samples.jsonl")) == 4  # nothing lost


def test_data_without_benchmark_is_named_after_the_file_and_recorded(ckpt_dir, custom_file, tmp_path):
    """`--data FILE` alone: the results carry the file's name (never a built-in benchmark's),
    and runs.jsonl records the file used, with its sha256 (computed here independently)."""
    import hashlib

    out = tmp_path / "out"
    assert main(["--model", str(ckpt_dir), "--device", "cpu", "--data", str(custom_file),
                 "--mode", "sequential", "--max-tokens", "8", "--output", str(out)]) == 0
    name = custom_file.stem
    assert {r["benchmark"] for r in _records(out / "samples.jsonl")} == {name} != {"aime24"}
    assert list(json.loads((out / "summary.json").read_text())["summary"]) == [name]
    run = _records(out / "runs.jsonl")[-1]
    assert run["data"][name] == {"path": str(custom_file.resolve()),
                                 "sha256": hashlib.sha256(custom_file.read_bytes()).hexdigest()}


def test_sigterm_stops_the_run_as_ctrl_c_does(ckpt_dir, custom_file, tmp_path):
    """A scheduler's SIGTERM mid-run: exit 130, the finished samples kept, and runs.jsonl says
    the run was interrupted (as for SIGINT)."""
    out = tmp_path / "run"
    args = ["--model", str(ckpt_dir), "--device", "cpu", "--benchmark", "mine", "--data",
            f"mine={custom_file}", "--mode", "sequential", "--samples", "4", "--max-tokens", "8",
            "--batch-size", "1", "--output", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KILL_AFTER": "3", "KILL_SIGNAL": "SIGTERM"}
    r = subprocess.run([sys.executable, "-c", _KILLER, *args], env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 130, r.stderr
    assert "interrupted" in r.stderr
    assert 3 <= len(_records(out / "samples.jsonl")) < 8
    assert _records(out / "runs.jsonl")[-1]["status"] == "interrupted"


def test_progress_counts_tokens_as_the_engine_steps(llm, ckpt_dir, custom_file, tmp_path, capsys):
    """The bar is not stuck at 0/N during a long sample: after every engine step it hears how many
    tokens were sampled; the total it shows at the end is the records' token count (sequential and
    majority traces: every generated token is sampled)."""
    import re

    from parathinker.config import PlainParams
    from parathinker.eval.backends import EngineBackend, Job

    steps: list[int] = []
    job = Job(0, "What is 2+3?", (PlainParams(max_tokens=12, temperature=0), PlainParams(max_tokens=9, seed=1)))
    ((done, traces),) = list(EngineBackend(llm).run([job], 4, steps.append))
    assert len(steps) >= 9 and sum(steps) == sum(t.num_tokens for t in traces)  # before the job ended
    out = tmp_path / "out"
    assert main(["--model", str(ckpt_dir), "--device", "cpu", "--benchmark", "mine", "--data",
                 f"mine={custom_file}", "--mode", "sequential,majority", "--majority-n", "2",
                 "--max-tokens", "12", "--majority-max-tokens", "8", "--output", str(out)]) == 0
    shown = re.findall(r"(?<![\d.])(\d+) tok(?!/)", capsys.readouterr().err)  # the count, not tok/s
    assert shown and int(shown[-1]) == sum(r["total_tokens"] for r in _records(out / "samples.jsonl"))
