"""build-data keeps a ParaThinker teacher's paths exactly as the teacher wrote them (issue 24):
byte for byte, leading space included (the demo model writes " 5*11 ..."; a stripped path trains
on a token the model never writes), one trace per path. Local teacher (`--teacher-mode paths`)
and `parathinker serve`, native and reference layouts; the expected texts are the engine's own
PathOutput texts and the served JSON's `paths[].text`, read straight from the HTTP response."""

from __future__ import annotations

import json

import httpx
import pytest
from parathinker.testing.servers import running_server

from parathinker import LLM, SamplingParams
from parathinker.cli_args import PLAIN_ROPE
from parathinker.demo.task import all_problems
from parathinker.train.cli import main
from tests import ROOT

pytest.importorskip("openai")

DEMO = ROOT / "docs" / "demo" / "model"  # writes " 5*11 ..." paths
PROBLEMS = all_problems()[:2]
QUESTIONS = [p["problem"] for p in PROBLEMS]
SEED, TEMPERATURE, TRACES, MAX_TOKENS = 4, 1.0, 3, 46  # 46 + 2 tags: a multiple of 16 (reference)


def _problems(tmp_path, problems=PROBLEMS):
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "problem": p["problem"], "answer": p["answer"]})
                            + "\n" for i, p in enumerate(problems)))
    return path


def _all_finish(layout):  # the reference layout stops at the first finished path (SPEC §6)
    return 1 if layout == "reference" else TRACES


def _build(tmp_path, teacher, *extra):
    out = tmp_path / "data.jsonl"
    assert main(["build-data", "--teacher", teacher, "--problems", str(_problems(tmp_path)),
                 "--output", str(out), "--traces-per-problem", str(TRACES), "--paths", "2",
                 "--select", "all", "--include-truncated", "--max-tokens", str(MAX_TOKENS),
                 "--temperature", str(TEMPERATURE), "--seed", str(SEED), *extra]) == 0
    rows = [json.loads(x) for x in (tmp_path / "data.jsonl.traces" / "samples.jsonl").read_text().splitlines()]
    return {r["id"]: [t["path"] for t in sorted((t for t in rows if t["id"] == r["id"]),
                                                key=lambda t: t["sample"])] for r in rows}


def _check(got, want):
    assert got == want
    paths = [p for ps in want.values() for p in ps]
    # not vacuous: texts a strip() would change are among them (the old build-data failed here)
    assert len(paths) == len(QUESTIONS) * TRACES and any(p != p.strip() for p in paths), paths


@pytest.mark.parametrize("layout", ["native", "reference"])
def test_local_paths_teacher_keeps_path_texts_byte_for_byte(tmp_path, layout):
    got = _build(tmp_path, str(DEMO), "--teacher-mode", "paths", "--layout", layout,
                 "--device", "cpu", "--rope-scaling", "none")
    llm = LLM(str(DEMO), device="cpu", layout=layout, rope_scaling=PLAIN_ROPE)
    want = {}
    for i, q in enumerate(QUESTIONS):  # build-data's request: trace j's seed is seed * 100003 + j
        params = SamplingParams(num_paths=TRACES, min_finished_paths=_all_finish(layout),
                                max_path_tokens=MAX_TOKENS + 2, temperature=TEMPERATURE, top_p=0.95,
                                max_summary_tokens=len(llm.summary_template_ids) + 1, seed=SEED * 100003)
        want[f"p{i}"] = [p.text for p in llm.generate([q], params)[0].paths]
    _check(got, want)


@pytest.mark.parametrize("layout", ["native", "reference"])
def test_served_parathinker_teacher_gives_one_trace_per_path_as_served(tmp_path, layout):
    llm = LLM(str(DEMO), device="cpu", layout=layout, rope_scaling=PLAIN_ROPE)
    with running_server(llm) as base:
        got = _build(tmp_path, f"{base}/v1", "--request-timeout", "60")
        want = {}
        for i, q in enumerate(QUESTIONS):  # the same request by hand; the answer's JSON as sent
            r = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
                "model": "tiny-parathinker", "messages": [{"role": "user", "content": q}],
                "temperature": TEMPERATURE, "top_p": 0.95, "seed": SEED * 100003,
                "parallel": {"num_paths": TRACES, "min_finished_paths": _all_finish(layout),
                             "max_path_tokens": MAX_TOKENS + 2,
                             "max_summary_tokens": len(llm.summary_template_ids) + 1}})
            assert r.status_code == 200, r.text
            want[f"p{i}"] = [p["text"] for p in json.loads(r.content)["choices"][0]["message"]["paths"]]
    _check(got, want)


def test_served_teacher_budget_errors_name_the_flag(tmp_path, llm, capsys):
    """Paths beyond the served model's context: the 400 says which --max-tokens fits, and that
    value then runs."""
    with running_server(llm) as base:
        args = ["build-data", "--teacher", f"{base}/v1", "--problems", str(_problems(tmp_path, [
                    {"problem": "What is 2+3?", "answer": "5"}])), "--traces-per-problem", "2", "--paths", "2",
                "--select", "all", "--include-truncated", "--request-timeout", "60", "--max-tokens"]
        assert main([*args, "100000", "--output", str(tmp_path / "d.jsonl")]) == 1
        err = capsys.readouterr().err
        assert "HTTP 400" in err and "--max-tokens 100000 does not fit this prompt: pass --max-tokens" in err
        fit = int(err.split("pass --max-tokens ")[1].split(")")[0])
        context = llm.config.max_position_embeddings
        prompt = len(llm.encode_prompts(["What is 2+3?"], None)[0])  # template + question, with BOS
        assert fit == context - prompt - (len(llm.summary_template_ids) + 1) - 2  # SPEC §4, tags off
        assert main([*args, str(fit), "--output", str(tmp_path / "e.jsonl")]) == 0
