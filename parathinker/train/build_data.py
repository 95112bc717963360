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
- OpenAI-compatible endpoints (vLLM, SGLang, ...): `--api chat` (default; the server's chat
  template) or `--api completions` (the prompt template as raw text), `n` traces per request
  (`--traces-per-request`, default all of a problem's). `--teacher` takes one URL, a comma list
  or a file of URLs: requests are spread by load, at most `--concurrency` in flight per teacher,
  and a teacher that stops answering is retried with backoff while its requests go to the others
  (parathinker.client.endpoints). Each trace record names its teacher and the served model.

Selection (`--select`), per sample of P paths (P fixed or drawn from a range per sample):
- `any-correct` (default): one correct trace plus P-1 others drawn at random; problems with no
  correct trace give no sample;
- `all-correct`: P correct traces; `all`: any P traces.
The summary states the problem's (verified) answer: `--summary-format`, default
" \\boxed{{{answer}}}." after the summary template that training prepends. Traces cut by the
token budget are left out unless `--include-truncated` (then marked "cut": their end tag is not
trained, `parathinker.train.data`). Paths are shuffled again at training.

Resumable like the eval harness: every graded trace is appended at once to
`<output>.traces/samples.jsonl` (an `eval.results.SampleStore`); a rerun samples only missing
traces, then rewrites <output> from all stored traces (selection is seeded per problem).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from parathinker.spec.reference_layout import REFERENCE_BLOCK_SIZE
from parathinker.spec.tokens import SEQUENTIAL_PROMPT_TEMPLATE
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
    concurrency: int = 8  # endpoint requests in flight, per teacher
    traces_per_request: int | None = None  # endpoint: `n` per request; None = a problem's missing traces
    server_retries: int = 5  # endpoint: failures in a row before a teacher is dropped
    request_timeout: float = 3600.0
    device: str = "auto"
    dtype: str = "auto"
    rope_scaling: str | dict[str, Any] = "auto"  # local teacher: --rope-scaling (cli_args)
    layout: str = "native"  # local teacher, paths mode
    linear: str = "auto"
    attention: str = "auto"
    compile: bool | None = None  # local teacher: --compile / --no-compile (engine.graphs)
    allow_pickle: bool = False  # local teacher: --allow-pickle
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
        if (self.traces_per_request is not None and self.traces_per_request < 1) or self.server_retries < 1:
            raise ValueError("--traces-per-request and --server-retries must be >= 1")
        self.teacher_urls  # noqa: B018 - raises for a malformed URL

    @property
    def teacher_urls(self) -> tuple[str, ...]:
        """The endpoint teachers (`--teacher` URLs, comma-separated, or a file of them); ()
        for a local checkpoint."""
        if not is_endpoint_spec(self.teacher):
            return ()
        from parathinker.client.endpoints import endpoint_urls

        return endpoint_urls([self.teacher])

    @property
    def is_endpoint(self) -> bool:
        return bool(self.teacher_urls)


def is_endpoint_spec(teacher: Any) -> bool:
    """URLs, or a file (a checkpoint is a directory or a hub id) of URLs."""
    return isinstance(teacher, str) and (teacher.startswith(("http://", "https://"))
                                         or Path(teacher).is_file())


@dataclass(frozen=True)
class Trace:
    text: str
    finish_reason: str  # "end" | "budget"
    is_path: bool = False  # a ParaThinker path: its text is kept byte for byte (leading space too)


def clean_trace(text: str, path_text: str, eos: str | None = None) -> str:
    """A teacher trace as a path text: no control tags (a path never holds them), optionally
    only the thinking before `</think>`."""
    if path_text == "thinking" and "</think>" in text:
        text = text.split("</think>", 1)[0]
    if eos:
        text = text.replace(eos, "")
    return _TAGS.sub("", text).strip()


# ----- teachers: generate(questions, indices) -> per question, one Trace per requested index

def _all_finish(num_paths: int, layout: str | None) -> int:
    """min_finished_paths for paths that all run to their end; the reference layout always
    stops at the first finished path (SPEC §6): the others come back cut (as truncated traces)."""
    return 1 if layout == "reference" else num_paths


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
                       attention=cfg.attention, compile=cfg.compile, layout=cfg.layout,
                       allow_pickle=cfg.allow_pickle,
                       rope_scaling=PLAIN_ROPE if rope is None else rope)
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
                    num_paths=len(js), min_finished_paths=_all_finish(len(js), c.layout),
                    max_path_tokens=c.max_tokens + 2,
                    max_summary_tokens=len(self.llm.summary_template_ids) + 1,
                    temperature=c.temperature, top_p=c.top_p, seed=c.seed * 100003 + js[0])
                (res,) = self.llm.generate([q], params)
                out[i] = [Trace(p.text, "end" if p.finish_reason == "end" else "budget", True)
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
    """One or more OpenAI-compatible teachers serving the same model, spread by load."""

    def __init__(self, cfg: BuildConfig, questions: Sequence[str] = ()) -> None:
        """`questions`: every problem of the run, to fit --max-tokens to a `parathinker serve`
        teacher's context (`fit_to_served`)."""
        from parathinker.client.endpoints import Dispatcher, EndpointError, Server

        self.cfg = cfg
        key = cfg.api_key or os.environ.get("OPENAI_API_KEY")
        self.servers = [Server(u, cfg.request_timeout, key) for u in cfg.teacher_urls]
        self.dispatcher = Dispatcher(self.servers, cfg.concurrency, cfg.server_retries)
        self.model = cfg.teacher_model
        for s in self.servers:
            try:
                if self.model is None:  # the first answering teacher's first model
                    self.model = s.list_models().data[0].id
                s.fetch_card(self.model)
            except EndpointError:
                raise
            except Exception as e:  # noqa: BLE001 - not answering: left out, the others go on
                s.dropped, s.last_error = True, str(s.error(e))
                self.dispatcher.warn(f"{s.last_error}; not used in this run")
        if all(s.dropped for s in self.servers):
            raise EndpointError("no teacher answers: " + "; ".join(s.last_error for s in self.servers))
        self.cfg = fit_to_served(cfg, self.model, [s.card for s in self.servers if s.is_parathinker],
                                 questions)
        for s in self.servers:
            if s.is_parathinker:
                self._check_parathinker(s)

    def _check_parathinker(self, server: Any) -> None:
        """ValueError before anything runs when a `parathinker serve` teacher cannot take these
        requests (each is one request of `--traces-per-request` paths, see _paths)."""
        c, card = self.cfg, server.card
        if c.api == "completions":
            raise ValueError(f"the teacher {server.url} is parathinker serve: its paths come from "
                             "chat requests; drop --api completions")
        if "summary_template_tokens" not in card:
            raise ValueError(f"the teacher {server.url} does not report summary_template_tokens in "
                             "/v1/models (a parathinker serve older than this build-data): upgrade it")
        step, most = c.traces_per_request or c.traces_per_problem, int(card.get("max_paths") or 1)
        if step > most:
            raise ValueError(f"the teacher {server.url} serves at most {most} paths per request and "
                             f"each of its paths is one trace: pass --traces-per-request {most}")
        if card.get("layout") == "reference" and (c.max_tokens + 2) % REFERENCE_BLOCK_SIZE:
            fit = (c.max_tokens + 2) // REFERENCE_BLOCK_SIZE * REFERENCE_BLOCK_SIZE - 2
            raise ValueError(f"the teacher {server.url} runs the reference layout: a path's budget "
                             f"(--max-tokens + 2 tags) must be a multiple of {REFERENCE_BLOCK_SIZE}; "
                             f"pass --max-tokens {fit}")

    def _paths(self, server: Any, question: str, n: int, seed: int) -> list[Trace]:
        """A ParaThinker teacher: one request of n paths that all run to their end (as
        --teacher-mode paths does locally), each served path one trace, its text as served."""
        from parathinker.client.endpoints import EndpointError

        c = self.cfg
        settings = {"num_paths": n, "min_finished_paths": _all_finish(n, server.card.get("layout")),
                    "max_path_tokens": c.max_tokens + 2,
                    "max_summary_tokens": int(server.card["summary_template_tokens"]) + 1}
        try:
            r = server.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": question}], n=1,
                temperature=c.temperature, top_p=c.top_p, seed=seed, extra_body={"parallel": settings})
        except Exception as e:  # noqa: BLE001 - a budget the server refuses: name the flag
            err = server.error(e)
            if isinstance(err, EndpointError):
                raise EndpointError(f"{err}{_budget_hint(str(err), c.max_tokens, server.card)}") from None
            raise err from None
        paths = (r.choices[0].message.model_extra or {}).get("paths") if r.choices else None
        if not paths or any("text" not in p for p in paths):
            raise EndpointError(f"the teacher {server.url} answered without the parallel extension's "
                                "paths and their text: is it parathinker serve?")
        return [Trace(p["text"], "end" if p["finish_reason"] == "end" else "budget", True)
                for p in sorted(paths, key=lambda p: p["index"])]

    def _one(self, server: Any, question: str, n: int, seed: int) -> list[Trace]:
        from parathinker.client.endpoints import EndpointError

        if server.is_parathinker:
            return self._paths(server, question, n, seed)
        c = self.cfg
        client = server.client
        common = dict(model=self.model, n=n, max_tokens=c.max_tokens, temperature=c.temperature,
                      top_p=c.top_p, seed=seed)
        if c.api == "completions":
            r = client.completions.create(prompt=c.prompt_template.replace("{question}", question),
                                               **common)
            return [Trace(ch.text, "budget" if ch.finish_reason == "length" else "end")
                    for ch in r.choices]
        r = client.chat.completions.create(
            messages=[{"role": "user", "content": c.chat_template.replace("{question}", question)}],
            **common)
        traces = []
        for ch in r.choices:
            # servers with a reasoning parser return the thinking apart from the content
            msg = ch.message
            if "paths" in (msg.model_extra or {}):
                raise EndpointError(f"the teacher {server.url} answers with ParaThinker paths, but its "
                                    "/v1/models does not say it is parathinker serve: the paths "
                                    "would be glued into one trace")
            thinking = getattr(msg, "reasoning_content", None) or getattr(msg, "reasoning", None)
            text = msg.content or ""
            if thinking:
                text = f"{thinking}</think>{text}"
            traces.append(Trace(text, "budget" if ch.finish_reason == "length" else "end"))
        return traces

    def stream(self, todo: Sequence[tuple[dict[str, Any], list[int]]]
               ) -> Iterator[tuple[dict[str, Any], list[int], list[Trace], str]]:
        """(problem, trace indices, their traces, the teacher's URL) per request as it finishes:
        one request per problem, or per --traces-per-request of its missing traces; a request for
        traces j.. is seeded with `seed * 100003 + j` (its first index)."""
        from parathinker.client.endpoints import EndpointError

        step = self.cfg.traces_per_request
        jobs = [(p, js[i:i + (step or len(js))]) for p, js in todo for i in range(0, len(js), step or len(js))]

        def calls(p: dict[str, Any], js: list[int]) -> list[Any]:
            seed = self.cfg.seed * 100003 + js[0]
            return [lambda s: self._one(s, p["problem"], len(js), seed)]

        for (p, js), (traces,), server in self.dispatcher.run((job, calls(*job)) for job in jobs):
            if len(traces) != len(js):
                raise EndpointError(f"the teacher {server.url} answered {len(traces)} choice(s) for "
                                    f"n={len(js)}; pass --traces-per-request 1 for a server that "
                                    "ignores n")
            yield p, js, traces, server.url


def _budget_hint(message: str, max_tokens: int, card: dict[str, Any]) -> str:
    """For parathinker serve's "lower the budgets" 400s: the flag to lower, and to what."""
    m = re.search(r"max_path_tokens \((\d+)\).*?(\d+) positions.*?context \((\d+)\)", message)
    if m:  # path budget minus the overflow, tags (2) off; reference: a multiple of 16
        room = int(m[1]) - (int(m[2]) - int(m[3]))
        if card.get("layout") == "reference":
            room = room // REFERENCE_BLOCK_SIZE * REFERENCE_BLOCK_SIZE
        if room - 2 >= 1:
            return f" (--max-tokens {max_tokens} does not fit this prompt: pass --max-tokens {room - 2})"
        return " (the prompt alone fills the teacher's context)"
    if "KV blocks" in message:
        return (f" (each request asks for --traces-per-request paths of --max-tokens {max_tokens} + 2 "
                "tokens: lower --max-tokens or --traces-per-request)")
    return ""


def _check_served_model(store: Any, model: str | None) -> None:
    """Stored traces of a resumed run must come from the model the teachers serve now."""
    other = {r.get("teacher_model") for r in store.records() if r.get("teacher_model")} - {model}
    if other:
        raise ValueError(f"{store.path} holds traces of the model(s) {', '.join(sorted(other))}, but "
                         f"the teachers serve {model!r}: pass --teacher-model, or use another --output")


def _write_teacher_stats(work: Path, teacher: EndpointTeacher) -> None:
    """<output>.traces/teachers.jsonl: each teacher's share of this run, one line per run."""
    from datetime import datetime, timezone

    def share(s: Any) -> dict[str, Any]:  # requests, not samples; traces carry no token counts
        st = s.stats()
        st["requests"] = st.pop("samples")
        st["requests_per_min"] = st.pop("samples_per_min")
        for k in ("generated_tokens", "tokens_per_s"):
            st.pop(k)
        return st

    line = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": teacher.model, "teachers": {s.url: share(s) for s in teacher.servers}}
    with (work / "teachers.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


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
        cut = tuple(t["finish_reason"] != "end" for t in chosen)  # closed by the budget: "cut"
        out.append(Sample(problem["problem"], tuple(t["path"] for t in chosen), summary,
                          cut if any(cut) else ()))
    return out


# What shapes a stored trace: a resume (traces already in <output>.traces/) must have them equal.
# Endpoint teachers may change between runs (one was lost, more were added): what they serve is
# checked against each stored trace's `teacher_model` instead.
TRACE_SETTINGS = ("teacher", "teacher_mode", "api", "teacher_model", "prompt_template",
                  "chat_template", "max_tokens", "temperature", "top_p", "seed", "path_text",
                  "rope_scaling", "layout", "traces_per_request")


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
            if stored.get(k) != v and not (k == "teacher" and is_endpoint_spec(v)
                                           and is_endpoint_spec(stored.get(k)))]
    if diff:
        raise ValueError(f"{work} holds traces made with other settings, which a resume would mix "
                         "with new ones and misattribute: " + "; ".join(diff) + ". Use the same "
                         "settings, another --output, or delete that directory")


def fit_to_context(cfg: BuildConfig, problems: Sequence[dict[str, Any]]) -> BuildConfig:
    """A local teacher's --max-tokens lowered to what its context holds for the longest prompt
    (with a note); an endpoint teacher's is fitted to what it serves (`fit_to_served`)."""
    from dataclasses import replace

    from parathinker.spec.budgets import ContextFit, path_room, trace_room
    from parathinker.spec.tokens import DEFAULT_PROMPT_TEMPLATE, DEFAULT_SUMMARY_TEMPLATE

    if cfg.is_endpoint or not problems:
        return cfg
    fit = ContextFit(cfg.teacher)
    questions = [p["problem"] for p in problems]
    if cfg.teacher_mode == "paths":  # paths of max_tokens + 2 (tags), a summary of template + 1
        lp = fit.longest(fit.prompt(q, DEFAULT_PROMPT_TEMPLATE) for q in questions)
        summary = len(fit.tokenizer.encode(DEFAULT_SUMMARY_TEMPLATE, add_special_tokens=False)) + 1
        room = path_room(fit.context, lp, summary, cfg.layout, fit.has_bos) - 2
    else:
        lp = fit.longest(fit.prompt(q, cfg.prompt_template) for q in questions)
        room = trace_room(fit.context, lp)
    max_tokens = fit.cap("--max-tokens", cfg.max_tokens, room, f" with the longest prompt ({lp} tokens)")
    return replace(cfg, max_tokens=max_tokens) if max_tokens != cfg.max_tokens else cfg


def fit_to_served(cfg: BuildConfig, model: str | None, cards: list[dict[str, Any]],
                  questions: Sequence[str]) -> BuildConfig:
    """--max-tokens lowered, with a note, to what the `parathinker serve` teachers' context
    (`max_model_len` of their /v1/models `cards`) holds for the longest prompt: each request
    has paths of max_tokens + 2 tags and a summary of the template + 1 token (`_paths`). The
    prompts are counted with the served model's tokenizer, so `model` must be a local checkpoint
    directory (else nothing is fitted: a teacher refuses what does not fit, and the message
    names the --max-tokens to pass)."""
    from dataclasses import replace

    from parathinker.spec.budgets import ContextFit, path_room
    from parathinker.spec.tokens import DEFAULT_PROMPT_TEMPLATE

    cards = [c for c in cards if c.get("max_model_len") and "summary_template_tokens" in c]
    if not cards or not questions or model is None or not Path(model).is_dir():
        return cfg
    fits = {int(c["max_model_len"]): ContextFit(model, int(c["max_model_len"])) for c in cards}
    fit = next(iter(fits.values()))
    lp = fit.longest(fit.prompt(q, DEFAULT_PROMPT_TEMPLATE) for q in questions)
    rooms = [(path_room(int(c["max_model_len"]), lp, int(c["summary_template_tokens"]) + 1,
                        c.get("layout", "native"), fit.has_bos) - 2, int(c["max_model_len"])) for c in cards]
    room, context = min(rooms)
    max_tokens = fits[context].cap("--max-tokens", cfg.max_tokens, room,
                                   f" (served) with the longest prompt ({lp} tokens)")
    return replace(cfg, max_tokens=max_tokens) if max_tokens != cfg.max_tokens else cfg


def build_data(cfg: BuildConfig) -> dict[str, Any]:
    """Sample, grade, store and select; returns counts (also written to <output>.traces/)."""
    from tqdm import tqdm

    from parathinker.eval.data import read_jsonl
    from parathinker.eval.grade import grade
    from parathinker.spec.tokens import last_boxed
    from parathinker.eval.results import SampleStore

    problems = read_jsonl(cfg.problems)[: cfg.limit]
    cfg = fit_to_context(cfg, problems)  # before the resume check: the same flags fit the same
    work = Path(cfg.output + ".traces")
    n = cfg.traces_per_problem
    with SampleStore(work) as store:
        check_trace_settings(work, cfg, bool(store.records()))
        done = {(r["id"], int(r["sample"])) for r in store.records()}
        todo = [(p, [j for j in range(n) if (p["id"], j) not in done]) for p in problems]
        todo = [(p, js) for p, js in todo if js]
        teacher = None
        if todo:
            teacher = EndpointTeacher(cfg, [p["problem"] for p in problems]) if cfg.is_endpoint \
                else LocalTeacher(cfg)
        eos = getattr(getattr(teacher, "llm", None), "tokenizer", None)
        eos = eos.eos_token if eos is not None else None
        bar = tqdm(total=len(problems) * n, initial=len(problems) * n - sum(len(js) for _, js in todo),
                   desc="traces", unit="trace")

        def keep(p: dict[str, Any], js: Sequence[int], traces: Sequence[Trace], **where: Any) -> None:
            for j, tr in zip(js, traces):
                full = clean_trace(tr.text, "full", eos)  # graded whole, answer included
                path = tr.text if tr.is_path else clean_trace(tr.text, cfg.path_text, eos)
                store.append({"benchmark": "build-data", "mode": "trace", "num_paths": 1,
                              "id": p["id"], "sample": j, "answer": last_boxed(full),
                              "correct": bool(full) and grade(p["answer"], full),
                              "finish_reason": tr.finish_reason, "path": path, **where})
                bar.update(1)

        if isinstance(teacher, EndpointTeacher):
            _check_served_model(store, teacher.model)
            try:  # each request's traces stored as it finishes, whichever teacher ran it
                for p, js, traces, url in teacher.stream(todo):
                    keep(p, js, traces, teacher=url, teacher_model=teacher.model)
            finally:
                bar.close()
                _write_teacher_stats(work, teacher)
        else:
            for start in range(0, len(todo), cfg.batch_size):
                chunk = todo[start:start + cfg.batch_size]
                outs = teacher.generate([p["problem"] for p, _ in chunk], [js for _, js in chunk])
                for (p, js), traces in zip(chunk, outs):
                    keep(p, js, traces)
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
    teachers: dict[str, int] = {}
    for r in records:
        if r.get("teacher"):
            teachers[r["teacher"]] = teachers.get(r["teacher"], 0) + 1
    if teachers:
        stats["traces_by_teacher"] = teachers
    record = {"config": {k: v for k, v in asdict(cfg).items() if k != "api_key"}, "stats": stats}
    (work / "build_config.json").write_text(json.dumps(record, indent=2))
    return stats
