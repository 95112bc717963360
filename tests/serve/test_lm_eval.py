"""lm-evaluation-harness end to end (issue 16): its own CLI runs the local generate_until task
tests/serve/lm_eval_task/parathinker_arith.yaml (4 questions in a JSONL file, no hub) against a live
`parathinker serve` on the tiny checkpoint, through `local-completions` (text prompts, batched
2 per request) and `local-chat-completions`, and writes its results and samples files.

Each logged answer is checked against the same request sent here with the official openai
client (lm-eval's payload: temperature 0, its `until` as `stop`, max_gen_toks as max_tokens,
seed 1234), and the reported exact_match against the logged answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from parathinker.testing.servers import MODEL, client

from tests import ROOT

pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm_eval[api]
TASK = "parathinker_arith"
QUESTIONS = [json.loads(line) for line in
             (ROOT / "tests/serve/lm_eval_task/arith.jsonl").read_text().splitlines()]
GEN = {"temperature": 0, "stop": ["\n\n"], "max_tokens": 64, "seed": 1234}




def run_lm_eval(out: Path, model: str, model_args: str, *extra: str) -> tuple[dict, list[dict]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(out / "datasets"), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", model_args,
           "--include_path", "tests/serve/lm_eval_task", "--tasks", TASK, "--output_path", str(out),
           "--log_samples", *extra]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    (results,) = out.glob("*/results_*.json")
    (samples,) = out.glob(f"*/samples_{TASK}_*.jsonl")
    lines = samples.read_text().splitlines()
    return json.loads(results.read_text()), [json.loads(x) for x in lines]


def check(results: dict, samples: list[dict], expected: dict[str, str]) -> None:
    assert results["results"][TASK]["sample_len"] == len(QUESTIONS)
    by_question = {s["doc"]["question"]: s["resps"][0][0] for s in samples}
    assert by_question == expected
    hits = [s["resps"][0][0] == s["target"] for s in samples]
    assert results["results"][TASK]["exact_match,none"] == pytest.approx(sum(hits) / len(hits))


def test_local_completions(served, tmp_path):
    """Text prompts (tokenized_requests=False: the server tokenizes, with the checkpoint's own
    tokenizer.json; transformers 5's AutoTokenizer, which lm-eval would use, can split
    differently), two per request."""
    base, _ = served
    args = (f"model={MODEL},base_url={base}/v1/completions,tokenizer_backend=none,"
            "tokenized_requests=False,max_retries=1")
    results, samples = run_lm_eval(tmp_path, "local-completions", args, "--batch_size", "2")
    c = client(base)
    expected = {q["question"]: c.completions.create(model=MODEL, prompt=q["question"], **GEN)
                .choices[0].text for q in QUESTIONS}
    check(results, samples, expected)


def test_local_chat_completions(served, tmp_path):
    base, _ = served
    args = f"model={MODEL},base_url={base}/v1/chat/completions,max_retries=1"
    results, samples = run_lm_eval(tmp_path, "local-chat-completions", args,
                                   "--apply_chat_template")
    c = client(base)
    expected = {q["question"]: c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": q["question"]}], **GEN)
        .choices[0].message.content for q in QUESTIONS}
    check(results, samples, expected)
