"""The eval loop: plan every sample, run them batched, grade and store each one as it finishes.

    cfg = EvalConfig(model="Leslie04/ParaThinker-1.5B", benchmarks=("aime24",), modes=("parathinker",),
                     paths=(2, 4, 8), output="runs/aime24")
    run(cfg)   # samples.jsonl (append-only, resumable), runs.jsonl, summary.json, report.md, the plot

A sample is one (benchmark, problem, mode, num_paths, sample index): one ParaThinker request with
P paths (mode "parathinker", num_paths = P), one plain trace ("sequential", num_paths = 1), or N
plain traces voted on ("majority", num_paths = N). Every sample has its own seed, derived from
--seed and its key, and the backends sample each request from its own generator: a sample's
tokens do not depend on batching, on what else ran, or on where a run was interrupted, so a
resumed run stores exactly what an uninterrupted one would have (up to float non-associativity
of batched kernels). A response's answer is the last `\\boxed{}` of the summary / trace; one
without a box is wrong.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import hashlib
import json
import platform
import subprocess
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from parathinker.config import PlainParams, SamplingParams, reference_yarn
from parathinker.eval.backends import EndpointBackend, EngineBackend, Job, Trace
from parathinker.eval.data import load_benchmark
from parathinker.eval.grade import grade, majority_vote
from parathinker.eval.report import config_label, summarize, write_report
from parathinker.eval.results import SampleKey, SampleStore
from parathinker.tokens import DEFAULT_PROMPT_TEMPLATE, DEFAULT_SUMMARY_TEMPLATE, SEQUENTIAL_PROMPT_TEMPLATE

MODES = ("parathinker", "sequential", "majority")
ROPE_CHOICES = ("auto", "reference", "checkpoint")
TAIL_CHARS = 400  # how much of a plain trace a record keeps without --save-text


@dataclass(frozen=True)
class EvalConfig:
    """Everything that decides what an eval run produces (the CLI builds it; see docs/EVAL.md)."""

    model: str
    output: str
    benchmarks: tuple[str, ...] = ("aime24",)
    data: tuple[str, ...] = ()  # JSONL files: NAME=FILE, or one FILE per benchmark; () = built-in
    modes: tuple[str, ...] = ("parathinker",)
    paths: tuple[int, ...] = (2, 4, 8)
    majority_n: tuple[int, ...] = ()  # () = the same values as `paths`
    samples: int = 1
    max_path_tokens: int = 16384
    max_summary_tokens: int = 1024
    min_finished_paths: int = 1  # clipped to P; 1 = first-finish
    max_tokens: int | None = None  # sequential trace budget; None = 2 x max_path_tokens
    majority_max_tokens: int | None = None  # each majority trace; None = max_path_tokens
    temperature: float = 0.5
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    resume: bool = False
    limit: int | None = None
    endpoint: str | None = None
    request_timeout: float = 3600.0
    batch_size: int = 64
    device: str = "auto"
    dtype: str = "auto"
    rope_scaling: str = "auto"
    linear: str = "auto"
    save_text: bool = False
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"unknown mode(s) {', '.join(bad) or '(none)'}: use {', '.join(MODES)}")
        if not self.benchmarks or any(not b for b in self.benchmarks):
            raise ValueError("--benchmark needs at least one name")
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise ValueError(f"--benchmark lists a name twice: {','.join(self.benchmarks)}")
        self.data_files()  # checks the --data / --benchmark pairing
        for name, values in (("--paths", self.paths), ("--majority-n", self.majority_n)):
            if any(v < 1 for v in values):
                raise ValueError(f"{name} values must be >= 1, got {','.join(map(str, values))}")
        if "parathinker" in self.modes and not self.paths:
            raise ValueError("--paths needs at least one value")
        checks = (("--samples", self.samples, 1), ("--batch-size", self.batch_size, 1),
                  ("--max-path-tokens", self.max_path_tokens, 2),
                  ("--max-summary-tokens", self.max_summary_tokens, 1),
                  ("--min-finished-paths", self.min_finished_paths, 1),
                  ("--max-tokens", self.max_tokens or 1, 1),
                  ("--majority-max-tokens", self.majority_max_tokens or 1, 1),
                  ("--limit", 0 if self.limit is None else self.limit, 0))
        for name, value, low in checks:
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if self.rope_scaling not in ROPE_CHOICES:
            raise ValueError(f"--rope-scaling must be one of {', '.join(ROPE_CHOICES)}")
        if self.request_timeout <= 0:
            raise ValueError(f"--request-timeout must be > 0, got {self.request_timeout}")
        if self.endpoint and "parathinker" in self.modes:
            raise ValueError("--endpoint serves the sequential and majority modes only; run parathinker "
                             "mode on the project's engine (drop --endpoint) in a separate invocation")
        PlainParams(max_tokens=1, temperature=self.temperature, top_p=self.top_p)  # same checks as sampling

    def data_files(self) -> dict[str, str]:
        """--data entries by benchmark: `NAME=FILE`, or plain FILEs one per --benchmark name in order."""
        named = dict(d.split("=", 1) for d in self.data if "=" in d and d.split("=", 1)[0] in self.benchmarks)
        plain = [d for d in self.data if not ("=" in d and d.split("=", 1)[0] in self.benchmarks)]
        if plain and (named or len(plain) != len(self.benchmarks)):
            raise ValueError(f"{len(plain)} --data file(s) for {len(self.benchmarks)} benchmark(s): pass one "
                             "--data FILE per --benchmark name in the same order, or --data NAME=FILE")
        return named or dict(zip(self.benchmarks, plain))

    @property
    def sequential_max_tokens(self) -> int:
        return self.max_tokens or 2 * self.max_path_tokens

    @property
    def vote_max_tokens(self) -> int:
        return self.majority_max_tokens or self.max_path_tokens

    @property
    def vote_sizes(self) -> tuple[int, ...]:
        return self.majority_n or self.paths

    @property
    def backend(self) -> str:
        return "endpoint" if self.endpoint else "engine"

    def configurations(self) -> list[tuple[str, int]]:
        """(mode, num_paths) in the order they run."""
        out: list[tuple[str, int]] = []
        for mode in self.modes:
            sizes = self.paths if mode == "parathinker" else self.vote_sizes if mode == "majority" else (1,)
            out += [(mode, n) for n in dict.fromkeys(sizes)]
        return out

    def rope_for(self, mode: str) -> dict[str, Any] | None:
        """The rope-scaling override of the engine that runs `mode` (None: the checkpoint's own):
        the reference's YaRN for ParaThinker paths above 8192 tokens (SPEC §5.6)."""
        if self.rope_scaling == "checkpoint" or (self.rope_scaling == "auto" and mode != "parathinker"):
            return None
        return reference_yarn(self.max_path_tokens)

    def settings(self, mode: str, num_paths: int) -> dict[str, Any]:
        """What shaped a sample besides its seed: stored with it, compared on --resume."""
        out: dict[str, Any] = {"model": self.model, "backend": self.backend, "temperature": self.temperature,
                               "top_p": self.top_p, "top_k": self.top_k, "base_seed": self.seed}
        if mode == "parathinker":
            out.update(max_path_tokens=self.max_path_tokens, max_summary_tokens=self.max_summary_tokens,
                       min_finished_paths=min(self.min_finished_paths, num_paths),
                       rope_scaling=self.rope_for(mode))
        else:
            out.update(max_tokens=self.sequential_max_tokens if mode == "sequential" else self.vote_max_tokens,
                       rope_scaling=self.rope_for(mode) if self.backend == "engine" else None)
        return out

    def public_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("api_key")
        d.update(resolved_max_tokens=self.sequential_max_tokens,
                 resolved_majority_max_tokens=self.vote_max_tokens, resolved_majority_n=list(self.vote_sizes))
        return d


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any JSON-able parts (stable across runs, machines and Python versions)."""
    digest = hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class Unit:
    """One sample to produce."""

    benchmark: str
    problem: dict[str, Any]
    mode: str
    num_paths: int
    sample: int

    @property
    def key(self) -> SampleKey:
        return (self.benchmark, self.mode, self.num_paths, str(self.problem["id"]), self.sample)

    def seed(self, base_seed: int) -> int:
        return derive_seed(base_seed, *self.key)


def plan(cfg: EvalConfig, problems: dict[str, list[dict[str, Any]]]) -> list[Unit]:
    """Every sample of the run: by configuration, then benchmark, then sample index, then problem
    (so an interrupted run has whole sweeps over the problems first)."""
    return [Unit(bench, p, mode, n, s) for mode, n in cfg.configurations() for bench in cfg.benchmarks
            for s in range(cfg.samples) for p in problems[bench]]


def request_params(cfg: EvalConfig, unit: Unit) -> tuple[SamplingParams | PlainParams, ...]:
    seed = unit.seed(cfg.seed)
    common = {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k}
    if unit.mode == "parathinker":
        return (SamplingParams(num_paths=unit.num_paths, max_path_tokens=cfg.max_path_tokens,
                               max_summary_tokens=cfg.max_summary_tokens,
                               min_finished_paths=min(cfg.min_finished_paths, unit.num_paths),
                               seed=seed, **common),)
    if unit.mode == "sequential":
        return (PlainParams(max_tokens=cfg.sequential_max_tokens, seed=seed, **common),)
    return tuple(PlainParams(max_tokens=cfg.vote_max_tokens, seed=derive_seed(seed, j), **common)
                 for j in range(unit.num_paths))


# ----- grading a finished sample into its record
def is_correct(gold: str, answer: str | None) -> bool:
    return answer is not None and grade(gold, f"\\boxed{{{answer}}}")


def _vote(gold: str, answers: list[str | None]) -> dict[str, Any]:
    """Each answer's correctness, the any-answer oracle and the majority vote."""
    path_correct = [is_correct(gold, a) for a in answers]
    voted = majority_vote(answers)
    return {"path_answers": answers, "path_correct": path_correct, "any_path_correct": any(path_correct),
            "majority_answer": voted, "majority_over_paths_correct": is_correct(gold, voted)}


def build_record(cfg: EvalConfig, unit: Unit, outputs: Sequence[Any]) -> dict[str, Any]:
    """The samples.jsonl line of a finished sample (field list in docs/EVAL.md)."""
    from parathinker.eval.grade import extract_boxed

    gold = str(unit.problem["answer"])
    rec: dict[str, Any] = {"benchmark": unit.benchmark, "id": str(unit.problem["id"]), "mode": unit.mode,
                           "num_paths": unit.num_paths, "sample": unit.sample, "seed": unit.seed(cfg.seed),
                           "gold": gold}
    if unit.mode == "parathinker":
        (out,) = outputs
        answer = extract_boxed(out.summary.text)
        rec.update(answer=answer, correct=is_correct(gold, answer), summary=out.summary.text,
                   summary_finish=out.summary.finish_reason)
        rec.update(_vote(gold, [extract_boxed(p.text) for p in out.paths]))
        path_tokens = [len(p.token_ids) for p in out.paths]
        rec.update(path_tokens=path_tokens, path_finish=[p.finish_reason for p in out.paths],
                   prompt_tokens=len(out.prompt_token_ids), summary_tokens=len(out.summary.token_ids),
                   total_tokens=sum(path_tokens) + len(out.summary.token_ids),
                   latency_s=out.metrics.get("latency_s"), error=out.error)
        if cfg.save_text:
            rec["path_texts"] = [p.text for p in out.paths]
    else:
        traces: list[Trace] = list(outputs)
        counts = [t.num_tokens for t in traces]
        total = None if any(c is None for c in counts) else sum(c for c in counts if c is not None)
        common = {"prompt_tokens": traces[0].num_prompt_tokens, "total_tokens": total,
                  "latency_s": max(t.latency_s for t in traces),
                  "error": "; ".join(t.error for t in traces if t.error) or None}
        if unit.mode == "sequential":
            (t,) = traces
            rec.update(answer=t.answer, correct=is_correct(gold, t.answer), finish_reason=t.finish_reason,
                       **common)
            rec["response" if cfg.save_text else "response_tail"] = t.text if cfg.save_text \
                else t.text[-TAIL_CHARS:]
        else:  # majority: the N traces play the part of paths, the vote is the answer
            vote = _vote(gold, [t.answer for t in traces])
            rec.update(answer=vote["majority_answer"], correct=vote["majority_over_paths_correct"])
            rec.update({k: v for k, v in vote.items() if k not in ("majority_answer",
                                                                     "majority_over_paths_correct")})
            rec.update(path_tokens=counts, path_finish=[t.finish_reason for t in traces], **common)
            if cfg.save_text:
                rec["responses"] = [t.text for t in traces]
    rec["settings"] = cfg.settings(unit.mode, unit.num_paths)
    return rec


# ----- provenance
def git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head or "unknown"


def _redacted_command(argv: list[str]) -> str:
    """The command line as typed, without the value of --api-key."""
    out: list[str] = []
    for i, a in enumerate(argv):
        if i and argv[i - 1] == "--api-key":
            a = "***"
        elif a.startswith("--api-key="):
            a = "--api-key=***"
        out.append(a)
    return " ".join(out)


def engine_info(llm: Any) -> dict[str, Any]:
    import torch

    return {"model_dir": str(llm.model_dir), "device": str(llm.device),
            "dtype": str(llm.dtype).removeprefix("torch."), "linear": getattr(llm, "linear_backend", None),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(llm.device) if llm.device.type == "cuda" else None}


def provenance(cfg: EvalConfig, engines: dict[str, dict[str, Any]], num_planned: int, num_run: int,
               num_failed: int, status: str) -> dict[str, Any]:
    """One line of runs.jsonl: who ran what, where, with which code and settings."""
    import parathinker

    return {
        "status": status, "config": cfg.public_dict(), "command": _redacted_command(sys.argv),
        "parathinker_version": parathinker.__version__, "git_commit": git_commit(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "python": platform.python_version(), "backend": cfg.backend,
        "endpoint": cfg.endpoint, "engines": engines,
        "rope_scaling": {mode: cfg.rope_for(mode) for mode in cfg.modes},
        "prompt_template": DEFAULT_PROMPT_TEMPLATE, "summary_template": DEFAULT_SUMMARY_TEMPLATE,
        "sequential_template": SEQUENTIAL_PROMPT_TEMPLATE,
        "num_samples_planned": num_planned, "num_samples_run": num_run, "num_samples_failed": num_failed,
    }


# ----- the run
def _check_resume(cfg: EvalConfig, store: SampleStore, units: list[Unit]) -> None:
    """Stored samples that this run would otherwise make must have been made the same way."""
    by_key = {(r["benchmark"], r["mode"], int(r["num_paths"]), str(r["id"]), int(r["sample"])): r
              for r in store.records()}
    for unit in units:
        stored = by_key.get(unit.key)
        if stored is None or "settings" not in stored:
            continue
        want = json.loads(json.dumps(cfg.settings(unit.mode, unit.num_paths)))
        diff = {k: (stored["settings"].get(k), v) for k, v in want.items() if stored["settings"].get(k) != v}
        if diff:
            what = "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{store.path}: sample {unit.key} was made with other settings ({what}). "
                             "Resume with the original settings, or choose another --output")


class _Progress:
    def __init__(self, total: int, resumed: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="sample", desc="eval", file=sys.stderr, dynamic_ncols=True,
                        mininterval=0.5)
        self.num_correct = 0
        self.num_done = 0
        self.num_failed = 0
        if resumed:
            self.bar.write(f"resuming: {resumed} samples already stored, {total} to run", file=sys.stderr)

    def update(self, record: dict[str, Any]) -> None:
        self.num_done += 1
        self.num_correct += bool(record["correct"])
        self.num_failed += record.get("error") is not None
        label = f"{record['benchmark']} {config_label(record['mode'], record['num_paths'])}"
        self.bar.set_postfix_str(f"{label} | acc {100 * self.num_correct / self.num_done:.1f}%", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class _Grader:
    """Grades finished samples on a few threads while the engine keeps decoding (math-verify runs
    in worker processes, so the threads mostly wait on pipes), and stores each record from the
    calling thread as soon as its grading is done."""

    def __init__(self, cfg: EvalConfig, store: SampleStore, progress: _Progress) -> None:
        self.cfg, self.store, self.progress = cfg, store, progress
        self.pool = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="eval-grade")
        self.pending: set[cf.Future[dict[str, Any]]] = set()

    def submit(self, unit: Unit, outputs: Sequence[Any]) -> None:
        self.pending.add(self.pool.submit(build_record, self.cfg, unit, outputs))

    def store_finished(self, wait: bool = False) -> None:
        if not self.pending:
            return
        done, self.pending = cf.wait(self.pending, timeout=None if wait else 0,
                                     return_when=cf.ALL_COMPLETED)
        for fut in done:
            record = fut.result()
            self.store.append(record)
            self.progress.update(record)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _load_llm(cfg: EvalConfig, rope: dict[str, Any] | None) -> Any:
    from parathinker.llm import LLM

    return LLM(cfg.model, device=cfg.device, dtype=cfg.dtype, rope_scaling=rope, linear=cfg.linear)


def _groups(cfg: EvalConfig, units: list[Unit]) -> Iterator[list[Unit]]:
    """Runs of consecutive units that share one engine (the same rope scaling)."""
    group: list[Unit] = []
    key = ""
    for u in units:
        k = json.dumps(cfg.rope_for(u.mode)) if cfg.backend == "engine" else "endpoint"
        if group and k != key:
            yield group
            group = []
        key = k
        group.append(u)
    if group:
        yield group


def _release_memory() -> None:
    """After the last reference to an LLM is dropped: give its weights and KV pool back."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def print_table(summary: dict[str, dict[str, dict[str, Any]]], file: Any = sys.stdout) -> None:
    for bench, by_config in summary.items():
        for label, s in by_config.items():
            extra = "".join(f" | {name} {100 * s[f'{name}_accuracy']:.1f} ± {100 * s[f'{name}_accuracy_se']:.1f}"
                            for name in ("majority", "oracle") if f"{name}_accuracy" in s)
            print(f"{bench:>10} {label:>12}: {100 * s['accuracy']:5.1f} ± {100 * s['accuracy_se']:4.1f} "
                  f"({s['num_problems']} problems, {s['num_samples']} samples){extra}", file=file)


def _validate(backend: EngineBackend, cfg: EvalConfig, units: list[Unit]) -> None:
    """Every request that cannot run (too long for the context, ...) fails before any runs."""
    for u in units:
        try:
            backend.encode(Job(0, u.problem["problem"], request_params(cfg, u)))
        except ValueError as e:
            raise ValueError(f"{u.benchmark} problem {u.problem['id']!r} ({u.mode}): {e}") from None


def run(cfg: EvalConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """Run the eval; returns the summary of everything in the output's samples file."""
    out_dir = Path(cfg.output)
    samples_file = out_dir / "samples.jsonl"
    if not cfg.resume and samples_file.exists() and samples_file.stat().st_size > 0:
        raise ValueError(f"{samples_file} already holds samples: pass --resume to continue that run, "
                         "or choose another --output (nothing is ever overwritten)")
    files = cfg.data_files()
    problems = {b: load_benchmark(b, files.get(b), cfg.limit) for b in cfg.benchmarks}
    units = plan(cfg, problems)
    if cfg.temperature == 0 and cfg.samples > 1:
        warnings.warn("--temperature 0 is greedy: every --samples repetition is the same", stacklevel=2)
    endpoint = None
    if cfg.endpoint:  # before anything is written: an unreachable URL fails here
        endpoint = EndpointBackend(cfg.endpoint, cfg.model, cfg.request_timeout, cfg.api_key)
        endpoint.check()
    runs_file = out_dir / "runs.jsonl"
    with SampleStore(out_dir) as store:
        _check_resume(cfg, store, units)
        done = store.done_keys()
        todo = [u for u in units if u.key not in done]
        engines: dict[str, dict[str, Any]] = {}
        progress = _Progress(len(todo), len(units) - len(todo))
        grader = _Grader(cfg, store, progress)
        status = "failed"
        try:
            for group in _groups(cfg, todo):
                llm = None
                if endpoint is None:
                    llm = _load_llm(cfg, cfg.rope_for(group[0].mode))
                    backend: EngineBackend | EndpointBackend = EngineBackend(llm)
                    _validate(backend, cfg, group)
                    engines.update({u.mode: engine_info(llm) for u in group})
                else:
                    backend = endpoint
                jobs = (Job(i, u.problem["problem"], request_params(cfg, u)) for i, u in enumerate(group))
                for job, outputs in backend.run(jobs, cfg.batch_size):
                    grader.submit(group[job.index], outputs)
                    grader.store_finished()
                grader.store_finished(wait=True)
                if llm is not None:  # the next group may need a differently configured engine
                    backend = llm = None  # type: ignore[assignment]
                    _release_memory()
            status = "finished"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        except BaseException:
            grader.store_finished(wait=True)  # what was generated before the failure is kept
            raise
        finally:
            grader.close()
            progress.close()
            info = provenance(cfg, engines, len(units), progress.num_done, progress.num_failed, status)
            if progress.num_failed:
                print(f"warning: {progress.num_failed} sample(s) could not be generated (see their 'error' "
                      "field in samples.jsonl); they count as wrong", file=sys.stderr)
            with runs_file.open("a", encoding="utf-8") as f:
                f.write(json.dumps(info, default=str) + "\n")
        summary = summarize(store.records())
    runs = [json.loads(line) for line in runs_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    history = [{k: r.get(k) for k in ("timestamp", "status", "git_commit", "backend", "num_samples_run")}
               | {"model": r.get("config", {}).get("model"), "modes": r.get("config", {}).get("modes")}
               for r in runs]
    write_report(summary, {**info, "invocations": history}, out_dir)  # this one in full, all in brief
    return summary
