"""Build SFT data from a teacher: sample N independent reasoning traces per problem, grade each
against the problem's answer, and write samples of P paths whose summary states the answer.

    parathinker build-data --teacher http://localhost:8000/v1 \\
        --problems problems.jsonl --output data.jsonl --traces-per-problem 8 --paths 2-6
    parathinker build-data --teacher ./parathinker-checkpoint ...

Teachers:
- a local checkpoint, run by this project's engine. `--teacher-mode sequential` (default):
  one plain trace per request (`LLM.generate_sequential`, the DeepSeek-R1 prompt); trace j of
  every problem is sampled with seed `seed * 100003 + j`, so the N traces of a problem are
  independent and reproducible. `--teacher-mode paths`: one ParaThinker request per problem
  with N paths that all run to their end; the paths see only the prompt, so they are N
  independent traces (for a ParaThinker teacher: self-distillation).
- an OpenAI-compatible endpoint (vLLM, SGLang, ...): `--api chat` (default; the server's chat
  template) or `--api completions` (the prompt template as raw text), `n` traces per request.

Selection (`--select`), per sample of P paths (P fixed or drawn from a range per sample):
- `any-correct` (default): one correct trace plus P-1 others drawn at random; problems with no
  correct trace give no sample;
- `all-correct`: P correct traces; `all`: any P traces.
The summary states the problem's (verified) answer: `--summary-format`, default
" \\boxed{{{answer}}}." after the summary template that training prepends. Traces cut by the
token budget are left out unless `--include-truncated`. Paths are shuffled again at training.

Resumable like the eval harness: every graded trace is appended at once to
`<output>.traces/samples.jsonl` (an `eval.results.SampleStore`); a rerun samples only missing
traces, then rewrites <output> from all stored traces (selection is seeded per problem).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from parathinker.tokens import SEQUENTIAL_PROMPT_TEMPLATE
from parathinker.train.data import Sample, write_samples

SELECTIONS = ("any-correct", "all-correct", "all")
CHAT_TEMPLATE = "{question} Please reason step by step, and put your final answer within \\boxed{}."
_TAGS = re.compile(r"</?think\d*>|</?summary>")


@dataclass(frozen=True)
class BuildConfig:
    teacher: str  # checkpoint directory / hub id, or http(s):// base URL of an endpoint
    problems: str  # JSONL of {"id", "problem", "answer"}
    output: str
    traces_per_problem: int = 8
    min_paths: int = 4
    max_paths: int = 4
    samples_per_problem: int = 1
    select: str = "any-correct"
    include_truncated: bool = False
    path_text: str = "full"  # full: the trace without tags | thinking: only before </think>
    summary_format: str = " \\boxed{{{answer}}}."
    teacher_mode: str = "sequential"  # local teacher: sequential | paths
    api: str = "chat"  # endpoint: chat | completions
    teacher_model: str | None = None  # endpoint model name (default: the server's first)
    api_key: str | None = None
    prompt_template: str = SEQUENTIAL_PROMPT_TEMPLATE  # local sequential, endpoint completions
    chat_template: str = CHAT_TEMPLATE  # endpoint chat: the user message
    max_tokens: int = 16384
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int = 0
    batch_size: int = 32  # problems per engine call
    concurrency: int = 8  # endpoint requests in flight
    request_timeout: float = 3600.0
    device: str = "auto"
    dtype: str = "auto"
    rope_scaling: str | dict[str, Any] = "auto"  # local teacher: --rope-scaling (cli_args)
    layout: str = "native"  # local teacher, paths mode
    linear: str = "auto"
    attention: str = "auto"
    limit: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.min_paths <= self.max_paths:
            raise ValueError(f"paths must satisfy 1 <= min <= max, got {self.min_paths}-{self.max_paths}")
        if self.traces_per_problem < self.max_paths:
            raise ValueError(f"--traces-per-problem ({self.traces_per_problem}) must be at least the "
                             f"largest path count ({self.max_paths})")
        if self.select not in SELECTIONS:
            raise ValueError(f"select must be one of {SELECTIONS}")
        if self.path_text not in ("full", "thinking"):
            raise ValueError("path_text must be 'full' or 'thinking'")
        if self.teacher_mode not in ("sequential", "paths") or self.api not in ("chat", "completions"):
            raise ValueError("teacher_mode: sequential|paths; api: chat|completions")
        if self.samples_per_problem < 1 or self.batch_size < 1 or self.concurrency < 1:
            raise ValueError("samples_per_problem, batch_size and concurrency must be >= 1")

    @property
    def is_endpoint(self) -> bool:
        return self.teacher.startswith(("http://", "https://"))


@dataclass(frozen=True)
class Trace:
    text: str
    finish_reason: str  # "end" | "budget"


def clean_trace(text: str, path_text: str, eos: str | None = None) -> str:
    """A teacher trace as a path text: no control tags (a path never holds them), optionally
    only the thinking before `</think>`."""
    if path_text == "thinking" and "</think>" in text:
        text = text.split("</think>", 1)[0]
    if eos:
        text = text.replace(eos, "")
    return _TAGS.sub("", text).strip()


# ----- teachers: generate(questions, indices) -> per question, one Trace per requested index

class LocalTeacher:
    def __init__(self, cfg: BuildConfig) -> None:
        from parathinker import LLM

        from parathinker.cli_args import PLAIN_ROPE, checkpoint_config
        from parathinker.config import resolve_rope_scaling

        self.cfg = cfg
        paths = cfg.teacher_mode == "paths"
        rope = resolve_rope_scaling(cfg.rope_scaling, checkpoint_config(cfg.teacher),
                                    cfg.max_tokens + 2 if paths else cfg.max_tokens, parallel=paths)
        # a base model is fine for plain traces
        self.llm = LLM(cfg.teacher, device=cfg.device, dtype=cfg.dtype, linear=cfg.linear,
                       attention=cfg.attention, layout=cfg.layout, rope_scaling=PLAIN_ROPE if rope is None else rope)
        if cfg.teacher_mode == "paths" and not self.llm.max_paths:
            raise ValueError(f"--teacher-mode paths needs a ParaThinker teacher; {cfg.teacher} has no "
                             "ParaThinker tokens (use --teacher-mode sequential)")
        if cfg.teacher_mode == "paths" and cfg.traces_per_problem > self.llm.max_paths:
            raise ValueError(f"--teacher-mode paths samples all traces of a problem as paths of one "
                             f"request: at most {self.llm.max_paths} for this model")

    def generate(self, questions: Sequence[str], indices: Sequence[Sequence[int]]) -> list[list[Trace]]:
        from parathinker import PlainParams, SamplingParams

        c = self.cfg
        out: list[list[Trace]] = [[] for _ in questions]
        if c.teacher_mode == "paths":
            for i, (q, js) in enumerate(zip(questions, indices)):
                params = SamplingParams(
                    num_paths=len(js), min_finished_paths=len(js), max_path_tokens=c.max_tokens + 2,
                    max_summary_tokens=len(self.llm.summary_template_ids) + 1,
                    temperature=c.temperature, top_p=c.top_p, seed=c.seed * 100003 + js[0])
                (res,) = self.llm.generate([q], params)
                out[i] = [Trace(p.text, "end" if p.finish_reason == "end" else "budget")
                          for p in res.paths]
            return out
        for j in sorted({j for js in indices for j in js}):  # one batched call per trace index
            rows = [i for i, js in enumerate(indices) if j in js]
            params = PlainParams(max_tokens=c.max_tokens, temperature=c.temperature, top_p=c.top_p,
                                 seed=c.seed * 100003 + j)
            res = self.llm.generate_sequential([questions[i] for i in rows], params,
                                               prompt_template=c.prompt_template)
            for i, r in zip(rows, res):
                if r.error:
                    raise RuntimeError(f"teacher failed on {questions[i][:60]!r}: {r.error}")
                out[i].append(Trace(r.text, r.finish_reason))
        # traces were appended in increasing j; indices are sorted the same way
        return out


class EndpointTeacher:
    def __init__(self, cfg: BuildConfig) -> None:
        from openai import OpenAI

        self.cfg = cfg
        key = cfg.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.client = OpenAI(base_url=cfg.teacher, api_key=key, timeout=cfg.request_timeout,
                             max_retries=2)
        self.model = cfg.teacher_model or self.client.models.list().data[0].id

    def _one(self, question: str, n: int, seed: int) -> list[Trace]:
        c = self.cfg
        common = dict(model=self.model, n=n, max_tokens=c.max_tokens, temperature=c.temperature,
                      top_p=c.top_p, seed=seed)
        if c.api == "completions":
            r = self.client.completions.create(prompt=c.prompt_template.replace("{question}", question),
                                               **common)
            return [Trace(ch.text, "budget" if ch.finish_reason == "length" else "end")
                    for ch in r.choices]
        r = self.client.chat.completions.create(
            messages=[{"role": "user", "content": c.chat_template.replace("{question}", question)}],
            **common)
        traces = []
        for ch in r.choices:
            # servers with a reasoning parser return the thinking apart from the content
            msg = ch.message
            thinking = getattr(msg, "reasoning_content", None) or getattr(msg, "reasoning", None)
            text = msg.content or ""
            if thinking:
                text = f"{thinking}</think>{text}"
            traces.append(Trace(text, "budget" if ch.finish_reason == "length" else "end"))
        return traces

    def generate(self, questions: Sequence[str], indices: Sequence[Sequence[int]]) -> list[list[Trace]]:
        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            futures = [pool.submit(self._one, q, len(js), self.cfg.seed * 100003 + js[0])
                       for q, js in zip(questions, indices)]
            return [f.result() for f in futures]


# ----- selection

def select_samples(problem: dict[str, Any], traces: Sequence[dict[str, Any]],
                   cfg: BuildConfig) -> list[Sample]:
    """Samples of one problem from its graded trace records ({"text", "correct", ...}),
    seeded by (seed, problem id)."""
    rng = random.Random(f"{cfg.seed}-{problem['id']}")
    usable = [t for t in traces if cfg.include_truncated or t["finish_reason"] == "end"]
    usable = [t for t in usable if t["path"].strip()]
    correct = [t for t in usable if t["correct"]]
    seen: set[frozenset[int]] = set()
    out = []
    for _ in range(cfg.samples_per_problem):
        p = rng.randint(cfg.min_paths, cfg.max_paths)
        if cfg.select == "all-correct":
            if len(correct) < p:
                continue
            chosen = rng.sample(correct, p)
        elif cfg.select == "any-correct":
            if not correct or len(usable) < p:
                continue
            first = rng.choice(correct)
            chosen = [first] + rng.sample([t for t in usable if t is not first], p - 1)
        else:
            if len(usable) < p:
                continue
            chosen = rng.sample(usable, p)
        key = frozenset(t["sample"] for t in chosen)
        if key in seen:
            continue
        seen.add(key)
        rng.shuffle(chosen)
        summary = cfg.summary_format.format(answer=problem["answer"])
        out.append(Sample(problem["problem"], tuple(t["path"] for t in chosen), summary))
    return out


# What shapes a stored trace: a resume (traces already in <output>.traces/) must have them equal.
TRACE_SETTINGS = ("teacher", "teacher_mode", "api", "teacher_model", "prompt_template",
                  "chat_template", "max_tokens", "temperature", "top_p", "seed", "path_text",
                  "rope_scaling", "layout")


def check_trace_settings(work: Path, cfg: BuildConfig, has_traces: bool) -> None:
    """Record the trace settings of a new run; refuse to extend traces made with other ones,
    naming each differing field (ValueError)."""
    mine = {k: getattr(cfg, k) for k in TRACE_SETTINGS}
    file = work / "trace_settings.json"
    if not has_traces:
        work.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(mine, indent=2))
        return
    if not file.exists():
        raise ValueError(f"{work} holds traces but no trace_settings.json (made by an older "
                         "version or by hand): their provenance is unknown; use another --output "
                         "or delete that directory")
    stored = json.loads(file.read_text())
    diff = [f"{k}: {stored.get(k)!r} there, {v!r} now" for k, v in json.loads(json.dumps(mine)).items()
            if stored.get(k) != v]
    if diff:
        raise ValueError(f"{work} holds traces made with other settings, which a resume would mix "
                         "with new ones and misattribute: " + "; ".join(diff) + ". Use the same "
                         "settings, another --output, or delete that directory")


def build_data(cfg: BuildConfig) -> dict[str, Any]:
    """Sample, grade, store and select; returns counts (also written to <output>.traces/)."""
    from tqdm import tqdm

    from parathinker.eval.data import read_jsonl
    from parathinker.eval.grade import grade
    from parathinker.tokens import last_boxed
    from parathinker.eval.results import SampleStore

    problems = read_jsonl(cfg.problems)[: cfg.limit]
    work = Path(cfg.output + ".traces")
    n = cfg.traces_per_problem
    with SampleStore(work) as store:
        check_trace_settings(work, cfg, bool(store.records()))
        done = {(r["id"], int(r["sample"])) for r in store.records()}
        todo = [(p, [j for j in range(n) if (p["id"], j) not in done]) for p in problems]
        todo = [(p, js) for p, js in todo if js]
        teacher = None
        if todo:
            teacher = EndpointTeacher(cfg) if cfg.is_endpoint else LocalTeacher(cfg)
        eos = getattr(getattr(teacher, "llm", None), "tokenizer", None)
        eos = eos.eos_token if eos is not None else None
        bar = tqdm(total=len(problems) * n, initial=len(problems) * n - sum(len(js) for _, js in todo),
                   desc="traces", unit="trace")
        for start in range(0, len(todo), cfg.batch_size):
            chunk = todo[start:start + cfg.batch_size]
            outs = teacher.generate([p["problem"] for p, _ in chunk], [js for _, js in chunk])
            for (p, js), traces in zip(chunk, outs):
                for j, tr in zip(js, traces):
                    full = clean_trace(tr.text, "full", eos)  # graded whole, answer included
                    path = clean_trace(tr.text, cfg.path_text, eos)
                    store.append({"benchmark": "build-data", "mode": "trace", "num_paths": 1,
                                  "id": p["id"], "sample": j, "answer": last_boxed(full),
                                  "correct": bool(full) and grade(p["answer"], full),
                                  "finish_reason": tr.finish_reason, "path": path})
                    bar.update(1)
        bar.close()
        records = store.records()
    by_problem: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_problem.setdefault(str(r["id"]), []).append(r)
    samples: list[Sample] = []
    num_without = 0
    for p in problems:
        got = select_samples(p, sorted(by_problem.get(p["id"], []), key=lambda r: r["sample"]), cfg)
        num_without += not got
        samples += got
    write_samples(cfg.output, samples)
    stats = {"problems": len(problems), "traces": len(records),
             "correct_traces": sum(bool(r["correct"]) for r in records),
             "truncated_traces": sum(r["finish_reason"] != "end" for r in records),
             "empty_traces": sum(not r["path"].strip() for r in records),
             "samples": len(samples), "problems_without_sample": num_without}
    record = {"config": asdict(cfg), "stats": stats}
    (work / "build_config.json").write_text(json.dumps(record, indent=2))
    return stats
