"""The eval loop: plan every sample, run them batched, grade and store each one as it finishes.

    cfg = EvalConfig(model="Leslie04/ParaThinker-1.5B", benchmarks=("aime24",), modes=("parathinker",),
                     paths=(2, 4, 8), layouts=("native", "reference"), output="runs/aime24")
    run(cfg)   # samples.jsonl (append-only, resumable), runs.jsonl, summary.json, report.md, the plot

The jobs around it live in their own files: configuration (eval/config.py), planning and seeds
(eval/plan.py), record building (eval/records.py), provenance (eval/provenance.py), the progress bar
(eval/progress.py) and the grading thread pool (eval/pool.py). The backends sample each request from
its own generator: a sample's tokens do not depend on batching, on what else ran, or on where a run
was interrupted, so a resumed run stores exactly what an uninterrupted one would have (up to float
non-associativity of batched kernels). Each (rope scaling, layout) gets its own engine, in turn.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from parathinker.eval.backends import EndpointBackend, EngineBackend, Job
from parathinker.eval.config import EvalConfig
from parathinker.eval.data import benchmark_source, load_benchmark
from parathinker.eval.fit import fit_to_context
from parathinker.eval.plan import Unit, plan, request_params
from parathinker.eval.pool import GradingPool
from parathinker.eval.progress import Progress
from parathinker.eval.provenance import engine_info, provenance
from parathinker.eval.report import mean_se_text, server_table, summarize, write_report
from parathinker.eval.results import SampleStore, sample_key


def _check_resume(cfg: EvalConfig, store: SampleStore, units: list[Unit]) -> None:
    """Stored samples that this run would otherwise make must have been made the same way."""
    by_key = {sample_key(r): r for r in store.records()}
    for unit in units:
        stored = by_key.get(unit.key)
        if stored is None or "settings" not in stored:
            continue
        want = json.loads(json.dumps(cfg.settings(unit.mode, unit.num_paths, unit.gate)))
        diff = {k: (stored["settings"].get(k), v) for k, v in want.items() if stored["settings"].get(k) != v}
        if diff:
            what = "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{store.path}: sample {unit.key} was made with other settings ({what}). "
                             "Resume with the original settings, or choose another --output")


def _load_llm(cfg: EvalConfig, rope: dict[str, Any] | None, layout: str) -> Any:
    from parathinker.cli_args import PLAIN_ROPE
    from parathinker.llm import LLM

    return LLM(cfg.model, device=cfg.device, dtype=cfg.dtype, linear=cfg.linear, attention=cfg.attention,
               compile=cfg.compile, layout=layout, allow_pickle=cfg.allow_pickle,
               rope_scaling=PLAIN_ROPE if rope is None else rope)


def _engine_key(cfg: EvalConfig, unit: Unit) -> tuple[str, str]:
    """Units with the same key share one engine: the same rope scaling and layout (with
    --endpoint: the same kind of server, parathinker serve of that layout or a plain one)."""
    if cfg.backend != "engine":
        return ("endpoint", unit.key[5] or "plain")
    return (json.dumps(cfg.rope_for(unit.mode)), unit.key[5] or "native")


def _engine_name(unit: Unit) -> str:
    """runs.jsonl's name of a unit's engine: its mode, and a layout other than native."""
    layout = unit.key[5]
    return unit.mode if layout in (None, "native") else f"{unit.mode} ({layout})"


def _groups(cfg: EvalConfig, units: list[Unit]) -> Iterator[list[Unit]]:
    """Runs of consecutive units that share one engine."""
    group: list[Unit] = []
    for u in units:
        if group and _engine_key(cfg, u) != _engine_key(cfg, group[0]):
            yield group
            group = []
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


def print_table(summary: dict[str, dict[str, dict[str, Any]]], file: Any = None) -> None:
    file = file or sys.stdout  # looked up now: a default bound at import would outlive a redirect
    for bench, by_config in summary.items():
        for label, s in by_config.items():
            extra = "".join(f" | {name} {mean_se_text(s[f'{name}_accuracy'], s[f'{name}_accuracy_se'])}"
                            for name in ("majority", "oracle") if f"{name}_accuracy" in s)
            print(f"{bench:>10} {label:>16}: {mean_se_text(s['accuracy'], s['accuracy_se']):>12} "
                  f"({s['num_problems']} problems, {s['num_samples']} samples){extra}", file=file)


def _validate(backend: EngineBackend, cfg: EvalConfig, units: list[Unit]) -> None:
    """Every request that cannot run (too long for the context, ...) fails before any runs."""
    for u in units:
        try:
            backend.encode(Job(0, u.problem["problem"], request_params(cfg, u)))
        except ValueError as e:
            raise ValueError(f"{u.benchmark} problem {u.problem['id']!r} ({u.mode}): {e}") from None


def _served_settings(cfg: EvalConfig) -> dict[str, Any]:
    """What a `parathinker serve` of --model must report in /v1/models when --model is a local
    checkpoint: its context, and the rope scaling of an explicit --rope-scaling ("auto" and
    "reference" depend on the server's own path budget: any is accepted)."""
    if not Path(cfg.model).is_dir():
        return {}
    from parathinker.cli_args import checkpoint_config
    from parathinker.config import resolve_rope_scaling
    from parathinker.spec.budgets import DEFAULT_CONTEXT

    ckpt = checkpoint_config(cfg.model)
    out: dict[str, Any] = {"max_model_len": int(ckpt.get("max_position_embeddings", DEFAULT_CONTEXT))}
    if cfg.rope_scaling not in ("auto", "reference"):
        out["rope_scaling"] = resolve_rope_scaling(cfg.rope_scaling, ckpt, cfg.max_path_tokens)
    return out


def run(cfg: EvalConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """Run the eval; returns the summary of everything in the output's samples file."""
    out_dir = Path(cfg.output)
    samples_file = out_dir / "samples.jsonl"
    if not cfg.resume and samples_file.exists() and samples_file.stat().st_size > 0:
        raise ValueError(f"{samples_file} already holds samples: pass --resume to continue that run, "
                         "or choose another --output (nothing is ever overwritten)")
    files = cfg.data_files()
    problems = {b: load_benchmark(b, files.get(b), cfg.limit) for b in cfg.benchmarks}
    sources = {b: benchmark_source(b, files.get(b)) for b in cfg.benchmarks}
    if cfg.backend == "engine" and not cfg.checkpoint:  # --rope-scaling auto reads the model type
        from parathinker.cli_args import checkpoint_config

        cfg = dataclasses.replace(cfg, checkpoint=checkpoint_config(cfg.model))
    endpoint = None
    if cfg.endpoint:  # before anything is written: an unreachable URL fails here
        endpoint = EndpointBackend(cfg.endpoints, cfg.model, cfg.request_timeout, cfg.api_key,
                                   cfg.endpoint_concurrency, cfg.server_retries)
        endpoint.check()
        endpoint.check_cards(cfg.layouts, _served_settings(cfg), "parathinker" in cfg.modes)
    # budgets the context (with --endpoint: the servers') cannot hold are lowered, with a note
    cfg = fit_to_context(cfg, problems, endpoint.contexts(cfg.layouts) if endpoint else None)
    units = plan(cfg, problems)
    if cfg.temperature == 0 and cfg.samples > 1:
        warnings.warn("--temperature 0 is greedy: every --samples repetition is the same", stacklevel=2)
    if endpoint is not None:
        stored: set[Any] = set()
        if cfg.resume and samples_file.exists():  # a mode whose samples are all stored needs no server
            with SampleStore(out_dir) as store:
                stored = store.done_keys()
        for group in _groups(cfg, [u for u in units if u.key not in stored]):
            endpoint.validate(group[0].key[5], max(u.num_paths for u in group))
    runs_file = out_dir / "runs.jsonl"
    with SampleStore(out_dir) as store:
        _check_resume(cfg, store, units)
        done = store.done_keys()
        todo = [u for u in units if u.key not in done]
        engines: dict[str, dict[str, Any]] = {}
        progress = Progress(len(todo), len(units) - len(todo))
        grader = GradingPool(cfg, store, progress)
        status = "failed"
        try:
            for group in _groups(cfg, todo):
                llm = None
                if endpoint is None:
                    llm = _load_llm(cfg, cfg.rope_for(group[0].mode), _engine_key(cfg, group[0])[1])
                    backend: EngineBackend | EndpointBackend = EngineBackend(llm)
                    _validate(backend, cfg, group)
                    engines.update({_engine_name(u): engine_info(llm) for u in group})
                else:
                    backend = endpoint
                jobs = (Job(i, u.problem["problem"], request_params(cfg, u)) for i, u in enumerate(group))
                results = (backend.run(jobs, group[0].key[5]) if isinstance(backend, EndpointBackend)
                           else ((j, o, None)
                                 for j, o in backend.run(jobs, cfg.batch_size, progress.add_tokens)))
                for job, outputs, server in results:
                    grader.submit(group[job.index], outputs, server)
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
            info = provenance(cfg, engines, len(units), progress.num_done, progress.num_failed, status,
                              sources, endpoint.stats() if endpoint else None)
            if progress.num_failed:
                print(f"warning: {progress.num_failed} sample(s) could not be generated (see their 'error' "
                      "field in samples.jsonl); they count as wrong", file=sys.stderr)
            with runs_file.open("a", encoding="utf-8") as f:
                f.write(json.dumps(info, default=str) + "\n")
        records = store.records()
        summary = summarize(records)
    runs = [json.loads(line) for line in runs_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    history = [{k: r.get(k) for k in ("timestamp", "status", "command", "git_commit", "backend",
                                       "num_samples_run")}
               | {"model": r.get("config", {}).get("model"), "modes": r.get("config", {}).get("modes"),
                  "layouts": r.get("config", {}).get("layouts")}
               for r in runs]
    extra: dict[str, Any] = {"invocations": history}
    if endpoint is not None or any("server" in r for r in records):
        extra["servers"] = server_table(records, info.get("servers") or {})
    write_report(summary, {**info, **extra}, out_dir)  # this one in full, all in brief
    return summary
