"""Issue 23 in `parathinker generate`: the gating flags reach SamplingParams, each path's finish
reason, confidence and answer are printed (and in --json), bad combinations exit 2 before loading.
Runs the real CLI on the demo model (docs/demo/model), as the doc tests do."""

import json
import os
import re
import subprocess
import sys

import pytest

from parathinker import LLM
from parathinker.cli import main
from tests import ROOT

DEMO = str(ROOT / "docs" / "demo" / "model")
QUESTION = "Solve 5x + 4 = 7 modulo 13."  # the demo task: paths end with \boxed{x} when they find x
# 8 paths at temperature 1 and this seed: several find an answer within 48 tokens (each path checks
# its random candidates in turn, ~12 tokens each; the tests below assert that some box one)
GATED = ["--device", "cpu", "--paths", "8", "--max-path-tokens", "48", "--max-summary-tokens", "32",
         "--temperature", "1", "--seed", "4", "--min-finished-paths", "8",
         "--stop-on-agreement", "2", "--confidence-window", "4", "--confidence-top-k", "5",
         "--prune-confidence", "0.5"]


def last_boxed(text: str) -> str | None:
    """The demo's answers are plain numbers: the last \\boxed{...}'s content, written out here."""
    found = re.findall(r"\\boxed\{([^{}]*)\}", text)
    return found[-1].strip() if found else None


def test_gating_flags_reach_the_request_and_each_path_prints_its_facts(monkeypatch, capsys):
    runs = []
    generate = LLM.generate

    def recording(self, prompts, params):  # the real generate, its params and output kept
        (out,) = generate(self, prompts, params)
        runs.append((params, out))
        return [out]

    monkeypatch.setattr(LLM, "generate", recording)
    assert main(["generate", "--model", DEMO, *GATED, QUESTION]) == 0
    printed = capsys.readouterr().out
    ((params, out),) = runs
    assert (params.stop_on_agreement, params.confidence_window, params.confidence_top_k,
            params.prune_confidence, params.min_finished_paths) == (2, 4, 5, 0.5, 8)

    headers = re.findall(r"^===== path (\d+) \((.*)\) =====$", printed, re.M)
    assert [int(k) for k, _ in headers] == list(range(1, 9))
    answers = 0
    for (_, facts), p in zip(headers, out.paths):
        assert p.confidence is not None, "a gated path reports its confidence"
        answer = last_boxed(p.text)
        expected = [f"{len(p.token_ids)} tokens", p.finish_reason, f"confidence {p.confidence:.3f}"]
        assert facts.split(", ") == expected + ([f"answer {answer}"] if answer else []), facts
        answers += answer is not None
    assert answers >= 1, "no path of the demo model found an answer with this seed: pick another"


def test_json_output_carries_confidence_and_answer_per_path():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "parathinker.cli", "generate", "--model", DEMO, *GATED,
                        "--json", QUESTION], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    paths = json.loads(r.stdout)["paths"]
    assert len(paths) == 8
    for p in paths:
        assert isinstance(p["confidence"], float) and p["confidence"] > 0  # -mean of log-probs
        assert p["answer"] == last_boxed(p["text"])
    assert any(p["answer"] for p in paths)


@pytest.mark.parametrize("flags,message", [
    (["--prune-confidence", "1.5"], "prune_confidence needs confidence_window > 0"),
    (["--prune-confidence", "nan", "--confidence-window", "4"], "prune_confidence must be a finite number"),
    (["--paths", "4", "--stop-on-agreement", "5"], "stop_on_agreement must be in 0..num_paths=4"),
    (["--stop-on-agreement", "-1"], "stop_on_agreement must be in 0..num_paths"),
    (["--confidence-window", "-1"], "confidence_window must be >= 0"),
    (["--confidence-top-k", "0"], "confidence_top_k must be >= 1"),
    (["--layout", "reference", "--stop-on-agreement", "2"], "not supported in the reference layout"),
    (["--layout", "reference", "--confidence-window", "8"], "not supported in the reference layout"),
])
def test_bad_gating_flags_exit_2_before_anything_loads(flags, message, tmp_path, capsys):
    """The model does not exist: an error naming it would mean the flags were checked too late."""
    missing = str(tmp_path / "no-such-model")
    assert main(["generate", "--model", missing, *flags, "q"]) == 2
    err = capsys.readouterr().err
    assert message in err and "no-such-model" not in err, err
