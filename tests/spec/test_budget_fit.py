"""eval's default budgets (16,384-token paths, 32,768-token traces) are lowered to what a small
model's context holds, said once per flag, and recorded as run; --resume fits the same."""

import json
import os
import subprocess
import sys

from parathinker.testing.checkpoints import make_checkpoint
from tests import ROOT



def run_eval(ckpt_dir, data, out, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "parathinker.cli", "eval", "--model", str(ckpt_dir), "--device", "cpu",
           "--data", str(data), "--mode", "parathinker,sequential", "--paths", "2",
           "--max-summary-tokens", "90", "--temperature", "0", "--output", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_eval_fits_default_budgets_to_the_context(tokenizer, tmp_path):
    ckpt_dir = make_checkpoint(tmp_path / "ckpt", tokenizer=tokenizer, end_boost=1.3,
                               max_position_embeddings=320)  # a small context: short traces
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "problem": q, "answer": "4"}) + "\n"
                            for i, q in enumerate(["What is 2+2?", "What is 2+2? Think about it twice."])))
    r = run_eval(ckpt_dir, data, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if line.startswith("note:")]
    assert [n.split()[1:3] for n in notes] == [["--max-path-tokens", "16384"], ["--max-tokens", "32768"]]
    records = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    context = json.loads((ckpt_dir / "config.json").read_text())["max_position_embeddings"]
    para = [r for r in records if r["mode"] == "parathinker"]
    seq = [r for r in records if r["mode"] == "sequential"]
    assert len(para) == len(seq) == 2 and not any(r["error"] for r in records)
    longest = max(r["prompt_tokens"] for r in para)
    assert {r["settings"]["max_path_tokens"] for r in para} == {context - longest - 90}
    report = (tmp_path / "out" / "report.md").read_text()  # the fitted budget, in its column
    assert f"| max_path_tokens | – | {context - longest - 90} |" in report.split("## Settings")[1]
    config = json.loads((tmp_path / "out" / "runs.jsonl").read_text().splitlines()[-1])["config"]
    assert config["max_tokens"] == context - max(r["prompt_tokens"] for r in seq)
    again = run_eval(ckpt_dir, data, tmp_path / "out", "--resume")  # the same fit: settings agree
    assert again.returncode == 0, again.stderr
    assert len((tmp_path / "out" / "samples.jsonl").read_text().splitlines()) == 4


def test_build_data_fits_a_local_teachers_trace_budget(tokenizer, tmp_path):
    ckpt_dir = make_checkpoint(tmp_path / "ckpt", tokenizer=tokenizer, max_position_embeddings=160)
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"id": "a", "problem": "What is 2+2?", "answer": "4"}) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "parathinker.cli", "build-data", "--teacher", str(ckpt_dir), "--device",
           "cpu", "--problems", str(problems), "--output", str(tmp_path / "data.jsonl"),
           "--traces-per-problem", "1", "--paths", "1", "--select", "all", "--include-truncated"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    (note,) = [line for line in r.stderr.splitlines() if line.startswith("note: --max-tokens 16384")]
    used = int(note.rsplit("using ", 1)[1])
    settings = json.loads((tmp_path / "data.jsonl.traces" / "trace_settings.json").read_text())
    assert settings["max_tokens"] == used < 160
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)  # resume: same fit
    assert again.returncode == 0, again.stderr
