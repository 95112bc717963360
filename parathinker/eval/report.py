"""Eval report: accuracy with standard errors per benchmark and configuration, tables and a plot.

    from parathinker.eval.report import summarize, write_report
    summary = summarize(store.records())
    write_report(summary, config, out_dir)   # summary.json, report.md, accuracy_vs_paths.png

A configuration is a mode, a path count, a layout and a gate: "sequential", "P=4" (parathinker,
native layout), "P=4 (reference)" (the reference layout, next to its native twin), "P=8 agree=2",
"P=8 prune<1.5" (a gated request, eval/config.py `Gate`), "majority@8", or "<mode>@<n>" for any
other mode. pass@1 is the mean over problems of the mean over samples of
`correct`; its standard error is the sample std (ddof=1) of the per-problem means over sqrt(n), None
(undefined: shown "n/a") for n < 2. The path-majority (`majority_over_paths_correct`) and any-path oracle (`any_path_correct`)
accuracies of parathinker records are averaged the same way, over the records that have the field,
and so is the confidence-weighted path majority (`confidence_majority_correct`, records with path
confidences). Generated tokens per problem (paths, summary, both) are averaged the same way, so
report.md puts them next to accuracy, and `accuracy_vs_tokens.png` plots one against the other.
A configuration's `settings` are the distinct `settings` its samples were made with (the budgets as
fitted to the model's context, the rope scaling as resolved): report.md shows them per column, so a
report over several invocations says what each column ran with, not only what the last one did.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from parathinker.eval.config import Gate
from parathinker.eval.data import BENCHMARKS
from parathinker.eval.results import gate_of, layout_of

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TOKEN_FIELDS = ("total_tokens", "path_tokens", "summary_tokens")
# summary name -> record field: the votes over a sample's paths, averaged like accuracy
_VOTES = (("majority", "majority_over_paths_correct"), ("oracle", "any_path_correct"),
          ("confidence_majority", "confidence_majority_correct"))
# tokens_per_problem name -> record field (a per-path list counts as its sum)
_GENERATED = (("paths", "path_tokens"), ("summary", "summary_tokens"), ("total", "total_tokens"))
_MODE_ORDER = {"sequential": 0, "parathinker": 1, "majority": 2}


def config_label(mode: str, num_paths: int, layout: str | None = None,
                 gate: tuple[int, float | None] = (0, None)) -> str:
    if mode == "sequential":
        return "sequential"
    if mode == "parathinker":
        name = f"P={num_paths}{Gate(*gate).label}"
        return name if layout in (None, "native") else f"{name} ({layout})"
    return f"{mode}@{num_paths}"


def _mean_se(per_problem: Sequence[float]) -> tuple[float, float | None]:
    n = len(per_problem)
    mean = float(np.mean(per_problem)) if n else 0.0
    se = float(np.std(per_problem, ddof=1) / math.sqrt(n)) if n >= 2 else None  # one problem: no spread
    return mean, se


def mean_se_text(mean: float, se: float | None) -> str:
    """A fraction and its standard error in percent: "50.0 ± 2.9", or "100.0 ± n/a" when the s.e.
    is undefined (one problem)."""
    return f"{100 * mean:.1f} ± " + ("n/a" if se is None else f"{100 * se:.1f}")


def _problem_means(records: Sequence[dict[str, Any]], field: str) -> list[float]:
    """Per problem (in first-seen order), the mean of `field` over its samples that have it (a
    list, e.g. per-path token counts, counts as its sum)."""
    by_id: dict[str, list[float]] = defaultdict(list)
    for r in records:
        v = r.get(field)
        if isinstance(v, (list, tuple)):
            v = None if any(x is None for x in v) else sum(v)
        if v is not None:
            by_id[str(r["id"])].append(float(v))
    return [sum(v) / len(v) for v in by_id.values()]


def _values(records: Sequence[dict[str, Any]], field: str) -> list[float]:
    """Values of a numeric field; a list (e.g. per-path token counts) contributes each element."""
    out: list[float] = []
    for r in records:
        v = r.get(field)
        if isinstance(v, (list, tuple)):
            out.extend(float(x) for x in v)
        elif v is not None:
            out.append(float(v))
    return out


def _stats(values: list[float], quantiles: tuple[str, ...]) -> dict[str, float]:
    out = {"mean": float(np.mean(values))}
    for q in quantiles:
        out[q] = float(np.max(values)) if q == "max" else float(np.percentile(values, int(q[1:])))
    return out


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{benchmark: {configuration: stats}}, benchmarks and configurations in a stable, readable order."""
    groups: dict[tuple[str, str, int, str | None, tuple[int, float | None]], list[dict[str, Any]]] = \
        defaultdict(list)
    for r in records:
        mode = str(r["mode"])
        groups[(str(r["benchmark"]), mode, int(r["num_paths"]), layout_of(mode, r.get("layout")),
                gate_of(r))].append(r)

    def order(key: tuple[str, str, int, str | None, tuple[int, float | None]]) -> tuple[Any, ...]:
        bench, mode, n, layout, (agree, prune) = key
        rank = BENCHMARKS.index(bench) if bench in BENCHMARKS else len(BENCHMARKS)
        # each reference-layout configuration right after its native twin: side by side
        return (rank, bench, _MODE_ORDER.get(mode, 3), mode, n, agree, prune is not None, prune or 0.0,
                layout not in (None, "native"), layout or "")

    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for key in sorted(groups, key=order):
        bench, mode, num_paths, layout, gate = key
        rs = groups[key]
        acc, acc_se = _mean_se(_problem_means(rs, "correct"))
        stats: dict[str, Any] = {
            "mode": mode, "num_paths": num_paths, "layout": layout,
            "num_problems": len({str(r["id"]) for r in rs}), "num_samples": len(rs),
            "accuracy": acc, "accuracy_se": acc_se,
        }
        if gate != (0, None):
            stats["stop_on_agreement"], stats["prune_confidence"] = gate
        for name, field in _VOTES:
            means = _problem_means(rs, field)
            if means:
                stats[f"{name}_accuracy"], stats[f"{name}_accuracy_se"] = _mean_se(means)
        stats["tokens"] = {f: _stats(v, ("p50", "max")) for f in TOKEN_FIELDS if (v := _values(rs, f))}
        per_problem = {what: _mean_se(means)[0] for what, field in _GENERATED
                       if (means := _problem_means(rs, field))}
        if per_problem:
            stats["tokens_per_problem"] = per_problem
        distinct = {json.dumps(r["settings"], sort_keys=True): r["settings"] for r in rs if r.get("settings")}
        stats["settings"] = list(distinct.values())
        if latency := _values(rs, "latency_s"):
            stats["latency_s"] = _stats(latency, ("p50", "p90"))
        summary.setdefault(bench, {})[config_label(mode, num_paths, layout, gate)] = stats
    return summary


def server_table(records: Iterable[dict[str, Any]],
                 this_run: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per endpoint URL: the samples it produced in the samples file (every invocation), and its
    share of this invocation (`samples_this_run`, generated tokens, seconds from its first request
    to its last answer, samples/min and tokens/s over them, status: up, down or dropped)."""
    counts = Counter(str(r["server"]) for r in records if r.get("server"))
    out = {}
    for url in dict.fromkeys([*this_run, *counts]):
        run = dict(this_run.get(url, {}))
        run["samples_this_run"] = run.pop("samples", 0)
        out[url] = {"samples": counts.get(url, 0), **run}
    return out


def _servers_section(servers: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["", "## Servers", "", "| server | samples (all runs) | this run: samples | generated tokens "
             "| active s | samples/min | tokens/s | status |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for url, s in servers.items():
        cells = [s.get("samples", 0), s.get("samples_this_run", 0), s.get("generated_tokens", "–"),
                 s.get("active_s", "–"), s.get("samples_per_min") or "–", s.get("tokens_per_s") or "–",
                 s.get("status", "–") + (f" ({s['last_error']})" if s.get("last_error") else "")]
        lines.append(f"| {url} | " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return lines


def _pct(stats: dict[str, Any] | None, name: str) -> str:
    if stats is None or name not in stats:
        return "–"
    return mean_se_text(stats[name], stats[name + "_se"])


def _table(summary: dict[str, dict[str, dict[str, Any]]], configs: list[str], name: str) -> list[str]:
    lines = ["| benchmark | " + " | ".join(configs) + " |", "|---|" + "---:|" * len(configs)]
    for bench, by_config in summary.items():
        lines.append(f"| {bench} | " + " | ".join(_pct(by_config.get(c), name) for c in configs) + " |")
    return lines


def _setting_text(key: str, value: Any) -> str:
    if value is None:
        return "none" if key == "rope_scaling" else "–"
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)


def _settings_section(summary: dict[str, dict[str, dict[str, Any]]], configs: list[str]) -> list[str]:
    """Per configuration column, each setting its samples were made with; a value that differs
    between benchmarks names them."""
    keys = list(dict.fromkeys(k for by_config in summary.values() for s in by_config.values()
                              for st in s.get("settings", ()) for k in st))
    if not keys:
        return []
    lines = ["", "## Settings of each configuration (as its samples were made)", "",
             "| setting | " + " | ".join(configs) + " |", "|---|" + "---|" * len(configs)]
    for key in keys:
        cells = []
        for c in configs:
            benches: dict[str, list[str]] = {}
            for bench, by_config in summary.items():
                for st in by_config.get(c, {}).get("settings", ()):
                    if key in st:
                        benches.setdefault(_setting_text(key, st[key]), []).append(bench)
            cells.append(" / ".join(v if len(benches) == 1 else f"{v} ({', '.join(dict.fromkeys(b))})"
                                    for v, b in benches.items()) or "–")
        lines.append(f"| {key} | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def _fmt(d: dict[str, float] | None, keys: tuple[str, ...], digits: int) -> str:
    return " / ".join(f"{d[k]:.{digits}f}" for k in keys) if d else "–"


def _accuracy_tokens_section(summary: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Accuracy next to what it cost: generated tokens per problem (paths, summary, both)."""
    votes = [(n, t) for n, t in (("majority", "path majority"),
                                 ("confidence_majority", "confidence-weighted majority"))
             if any(f"{n}_accuracy" in s for by_config in summary.values() for s in by_config.values())]
    rows = [(bench, c, s) for bench, by_config in summary.items() for c, s in by_config.items()
            if s.get("tokens_per_problem")]
    if not rows:
        return []
    lines = ["", "## Accuracy and generated tokens per problem", "",
             "| benchmark | configuration | accuracy | " + "".join(f"{t} | " for _, t in votes)
             + "path tokens | summary tokens | total tokens |", "|---|---|---:|" + "---:|" * (len(votes) + 3)]
    for bench, c, s in rows:
        tok = s["tokens_per_problem"]
        cells = [_pct(s, "accuracy"), *(_pct(s, f"{n}_accuracy") for n, _ in votes),
                 *(f"{tok[k]:.1f}" if k in tok else "–" for k in ("paths", "summary", "total"))]
        lines.append(f"| {bench} | {c} | " + " | ".join(cells) + " |")
    if any(_is_gated(s) for _, _, s in rows):
        lines += ["", "![accuracy against generated tokens](accuracy_vs_tokens.png)"]
    return lines


def render_markdown(summary: dict[str, dict[str, dict[str, Any]]], config: dict[str, Any]) -> str:
    configs = list(dict.fromkeys(c for by_config in summary.values() for c in by_config))
    lines = ["# Evaluation report", "", "## Accuracy (pass@1, %, mean ± s.e. over problems)", ""]
    lines += _table(summary, configs, "accuracy") if configs else ["(no samples)"]
    tables = (("Majority vote over paths", "majority_accuracy"),
              ("Confidence-weighted majority over paths (DeepConf: each path votes with its confidence)",
               "confidence_majority_accuracy"),
              ("Any path correct (oracle)", "oracle_accuracy"))
    for title, name in tables:
        having = [c for c in configs if any(name in by_config.get(c, {}) for by_config in summary.values())]
        if having:
            lines += ["", f"## {title} (%, mean ± s.e.)", ""] + _table(summary, having, name)
    lines += _accuracy_tokens_section(summary)
    lines += ["", "## Tokens and latency", "",
              ("| benchmark | configuration | problems | samples | total tokens (mean / p50 / max) "
               "| path tokens (mean / p50 / max) | summary tokens (mean / p50 / max) | latency s (mean / p50 / p90) |"),
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for bench, by_config in summary.items():
        for c, s in by_config.items():
            tok = [_fmt(s["tokens"].get(f), ("mean", "p50", "max"), 0) for f in TOKEN_FIELDS]
            lines.append(f"| {bench} | {c} | {s['num_problems']} | {s['num_samples']} | " + " | ".join(tok)
                         + f" | {_fmt(s.get('latency_s'), ('mean', 'p50', 'p90'), 2)} |")
    lines += _settings_section(summary, configs)
    if config.get("servers"):
        lines += _servers_section(config["servers"])
    lines += ["", "## Configuration", "", "The last invocation's flags, resolved, and provenance (runs.jsonl "
              "holds every invocation's; each column's own settings are in the table above).", "",
              "```json", json.dumps(config, indent=2, default=str), "```", ""]
    return "\n".join(lines)


# path majority and the any-path oracle often coincide: different dashes and markers, and the
# oracle's hollow, larger triangles drawn above the majority's squares keep both visible
_PATH_VOTES = (("majority", "path majority", dict(linestyle="--", marker="s", markersize=5, zorder=2.5)),
               ("oracle", "any-path oracle", dict(linestyle=":", marker="^", markersize=9, zorder=3,
                                                  markerfacecolor="none", markeredgewidth=1.5)))
_DASH_DOT_DOT = (0, (4, 1.5, 1, 1.5, 1, 1.5))


def _accuracy_ylim(values: list[tuple[float, float]]) -> tuple[float, float]:
    """y limits (percent) around (value, s.e.) pairs: inside 0..100, at least 10 points tall."""
    if not values:
        return 0.0, 100.0
    lo = max(0.0, min(v - e for v, e in values))
    hi = min(100.0, max(v + e for v, e in values))
    pad = max(1.0, 0.05 * (hi - lo))
    lo, hi = max(0.0, lo - pad), min(100.0, hi + pad)
    if hi - lo < 10.0:
        hi = min(100.0, lo + 10.0)
        lo = max(0.0, hi - 10.0)
    return lo, hi


def _span(values: Iterable[Any]) -> str:
    vs = sorted(set(values))
    return str(vs[0]) if len(vs) == 1 else f"{vs[0]}–{vs[-1]}"


def plot_title(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """What the plot shows: the model(s), each benchmark's problems x samples per problem, and the
    token budgets, from the summary (its samples' settings)."""
    stats = [s for by_config in summary.values() for s in by_config.values()]
    settings = [st for s in stats for st in s.get("settings", ())]
    models = list(dict.fromkeys(str(st["model"]) for st in settings if "model" in st))
    benches = []
    for bench, by_config in summary.items():
        counted = [s for s in by_config.values() if s.get("num_problems")]
        if not counted:
            benches.append(bench)
            continue
        problems = _span(s["num_problems"] for s in counted)
        per = _span(round(s["num_samples"] / s["num_problems"]) for s in counted)
        benches.append(f"{bench} ({problems} problems × {per} samples)")
    budgets = [f"{what} ≤ {_span(v)}" for what, key in (("paths", "max_path_tokens"),
                                                         ("summary", "max_summary_tokens"),
                                                         ("traces", "max_tokens"))
               if (v := [st[key] for st in settings if st.get(key) is not None])]
    first = "Accuracy vs parallel paths" + (f": {', '.join(models)}" if models else "")
    second = ", ".join(benches) + (f"; tokens: {', '.join(budgets)}" if budgets else "")
    return f"{first}\n{second}"


def accuracy_figure(summary: dict[str, dict[str, dict[str, Any]]]) -> Figure:
    """Accuracy vs number of paths, one colour per benchmark: the summary (solid; dash-dot for the
    reference layout), path majority (dashed, squares), any-path oracle (dotted, hollow
    triangles), sequential majority@N (dash-dot-dot, diamonds), sequential at P=1 (star); titled
    with `plot_title`. Every series has its own legend entry, also where curves coincide. Gated
    configurations are left out (they are points of `tokens_figure`, not of a curve over P)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs_all: set[int] = set()
    ys: list[tuple[float, float]] = []

    def series(xs: list[int], acc: list[float], se: list[float | None], **style: Any) -> None:
        xs_all.update(xs)
        err = [100 * (e or 0.0) for e in se]  # an undefined s.e. (one problem): no bar
        ys.extend(zip([100 * a for a in acc], err))
        # clip_on off: a point at 0 % or 100 % sits on the axis edge, drawn whole
        ax.errorbar(xs, [100 * a for a in acc], err, capsize=3, clip_on=False, **style)

    for k, (bench, by_config) in enumerate(summary.items()):
        color = f"C{k}"
        ungated = [s for s in by_config.values() if s["mode"] == "parathinker" and not _is_gated(s)]
        par = sorted((s for s in ungated if s.get("layout") in (None, "native")), key=lambda s: s["num_paths"])
        ref = sorted((s for s in ungated if s.get("layout") == "reference"), key=lambda s: s["num_paths"])
        for pts, style, what in ((par, "-", "summary"), (ref, "-.", "summary, reference layout")):
            if pts:
                series([s["num_paths"] for s in pts], [s["accuracy"] for s in pts],
                       [s["accuracy_se"] for s in pts], color=color, marker="o", linestyle=style,
                       label=f"{bench} {what}")
        for name, what, style in _PATH_VOTES:
            pts = [s for s in par if f"{name}_accuracy" in s]
            if pts:
                series([s["num_paths"] for s in pts], [s[f"{name}_accuracy"] for s in pts],
                       [s[f"{name}_accuracy_se"] for s in pts], color=color, label=f"{bench} {what}",
                       **style)
        maj = sorted((s for s in by_config.values() if s["mode"] == "majority"), key=lambda s: s["num_paths"])
        if maj:
            series([s["num_paths"] for s in maj], [s["accuracy"] for s in maj],
                   [s["accuracy_se"] for s in maj], color=color, marker="D", linestyle=_DASH_DOT_DOT,
                   label=f"{bench} sequential majority@N")
        if "sequential" in by_config:
            s = by_config["sequential"]
            series([1], [s["accuracy"]], [s["accuracy_se"]], color=color, marker="*", markersize=11,
                   linestyle="none", label=f"{bench} sequential")
    if xs_all:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(xs_all), [str(x) for x in sorted(xs_all)])
        ax.minorticks_off()
    ax.set_ylim(*_accuracy_ylim(ys))  # never below 0 % or above 100 %
    ax.set_xlabel("number of parallel paths P (sequential at 1)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.set_title(plot_title(summary), fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


def _is_gated(stats: dict[str, Any]) -> bool:
    return "stop_on_agreement" in stats


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (tokens, accuracy) points no other point beats: none has at most its tokens
    and at least its accuracy, one of them strictly; by tokens."""
    def beaten(i: int) -> bool:
        (t, a) = points[i]
        return any(u <= t and b >= a and (u < t or b > a) for u, b in points)
    return sorted((i for i in range(len(points)) if not beaten(i)), key=lambda i: points[i])


def tokens_figure(summary: dict[str, dict[str, dict[str, Any]]]) -> Figure:
    """Accuracy against generated tokens per problem: one labelled point per parathinker
    configuration (each benchmark its colour, s.e. bars), its Pareto front joined by a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ys: list[tuple[float, float]] = []
    for k, (bench, by_config) in enumerate(summary.items()):
        pts = [(c, s) for c, s in by_config.items()
               if s["mode"] == "parathinker" and "total" in s.get("tokens_per_problem", {})]
        if not pts:
            continue
        xy = [(s["tokens_per_problem"]["total"], 100 * s["accuracy"]) for _, s in pts]
        err = [100 * (s["accuracy_se"] or 0.0) for _, s in pts]
        ys.extend((y, e) for (_, y), e in zip(xy, err))
        ax.errorbar([x for x, _ in xy], [y for _, y in xy], err, color=f"C{k}", marker="o",
                    linestyle="none", capsize=3, clip_on=False, label=f"{bench} configurations")
        front = pareto_front(xy)
        ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], color=f"C{k}", linestyle="--",
                alpha=0.6, label=f"{bench} Pareto front")
        for i, ((c, _), (x, y)) in enumerate(sorted(zip(pts, xy), key=lambda p: p[1])):
            # neighbours by tokens take turns above and below their point: close labels stay apart
            ax.annotate(c, (x, y), textcoords="offset points", xytext=(4, 5 if i % 2 == 0 else -11),
                        fontsize=7)
    ax.set_ylim(*_accuracy_ylim(ys))
    ax.set_xlabel("generated tokens per problem (paths + summary, mean)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.set_title(plot_title(summary).replace("Accuracy vs parallel paths", "Accuracy vs generated tokens"),
                 fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


def plot_accuracy(summary: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    """Write `accuracy_figure(summary)` as a PNG (the legend outside the axes, kept in the image)."""
    accuracy_figure(summary).savefig(path, dpi=120, bbox_inches="tight")


def write_report(summary: dict[str, dict[str, dict[str, Any]]], config: Any, out_dir: str | Path) -> None:
    """Write summary.json, report.md and accuracy_vs_paths.png into out_dir, and
    accuracy_vs_tokens.png (`tokens_figure`) when a configuration is gated; `config` is a dict or
    dataclass."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = asdict(config) if is_dataclass(config) and not isinstance(config, type) else dict(config)
    (out_dir / "summary.json").write_text(
        json.dumps({"summary": summary, "config": config}, indent=2, default=str) + "\n", encoding="utf-8"
    )
    (out_dir / "report.md").write_text(render_markdown(summary, config), encoding="utf-8")
    plot_accuracy(summary, out_dir / "accuracy_vs_paths.png")
    if any(_is_gated(s) for by_config in summary.values() for s in by_config.values()):
        tokens_figure(summary).savefig(out_dir / "accuracy_vs_tokens.png", dpi=120, bbox_inches="tight")
