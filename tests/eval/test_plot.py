"""The accuracy plot, read back from matplotlib's objects: axis limits inside 0-100 % and the path
majority and any-path oracle series telling apart when they coincide."""

from __future__ import annotations

import pytest

from parathinker.eval.report import accuracy_figure, plot_accuracy


def _par(num_paths: int, acc: float, majority: float, oracle: float, se: float = 0.0) -> dict:
    return {"mode": "parathinker", "num_paths": num_paths, "layout": "native", "accuracy": acc,
            "accuracy_se": se, "majority_accuracy": majority, "majority_accuracy_se": se,
            "oracle_accuracy": oracle, "oracle_accuracy_se": se}


def _summary(acc: float, se: float = 0.0) -> dict:
    return {"aime24": {"sequential": {"mode": "sequential", "num_paths": 1, "accuracy": acc,
                                      "accuracy_se": se},
                       "P=2": _par(2, acc, acc, acc, se), "P=4": _par(4, acc, acc, acc, se),
                       "majority@4": {"mode": "majority", "num_paths": 4, "accuracy": acc,
                                      "accuracy_se": se}}}


def _series(ax) -> dict:
    """legend label -> the data line of that errorbar series."""
    return {c.get_label(): c.lines[0] for c in ax.containers}


@pytest.mark.parametrize("acc,se", [(0.0, 0.0), (1.0, 0.0), (0.0, 0.3), (1.0, 0.3)])
def test_y_axis_stays_within_0_and_100_percent(acc, se):
    ax = accuracy_figure(_summary(acc, se)).axes[0]
    lo, hi = ax.get_ylim()
    assert 0.0 <= lo < hi <= 100.0, (lo, hi)
    assert hi - lo >= 10.0  # a readable axis, not a sliver around one value
    assert lo <= 100 * acc <= hi  # the points themselves are on the axis


def test_y_axis_follows_the_data_between():
    ax = accuracy_figure({"b": {"P=2": _par(2, 0.40, 0.45, 0.50, se=0.02)}}).axes[0]
    lo, hi = ax.get_ylim()
    assert 30.0 < lo <= 38.0 and 52.0 <= hi < 60.0, (lo, hi)


def test_oracle_and_majority_are_told_apart_when_equal():
    ax = accuracy_figure(_summary(0.5)).axes[0]
    lines = _series(ax)
    majority, oracle = lines["aime24 path majority"], lines["aime24 any-path oracle"]
    assert list(majority.get_ydata()) == list(oracle.get_ydata()) == [50.0, 50.0]  # coincide
    assert majority.get_linestyle() != oracle.get_linestyle()
    assert majority.get_marker() != oracle.get_marker()
    # the oracle is drawn above, with hollow markers larger than the majority's: both stay visible
    assert oracle.get_zorder() > majority.get_zorder()
    assert oracle.get_markerfacecolor() == "none"
    assert oracle.get_markersize() > majority.get_markersize()
    # every series of a benchmark has its own (line style, marker)
    styles = [(ln.get_linestyle(), ln.get_marker()) for ln in lines.values()]
    assert len(lines) == 5 and len(set(styles)) == len(styles), styles
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "aime24 path majority" in legend and "aime24 any-path oracle" in legend


def test_legend_is_kept_in_the_png(tmp_path):
    """The legend sits right of the axes; the saved image is widened to hold it."""
    path = tmp_path / "acc.png"
    plot_accuracy(_summary(0.5), path)
    from matplotlib.image import imread

    height, width = imread(path).shape[:2]
    fig = accuracy_figure(_summary(0.5))
    assert width > fig.get_figwidth() * 120  # 9 in at 120 dpi, plus the legend beyond the figure


def test_title_names_model_benchmark_samples_and_budgets_and_the_legend_lists_every_series():
    """From records as eval stores them: 2 problems x 3 samples, every curve at the same accuracy."""
    from parathinker.eval.report import summarize

    par = {"model": "docs/demo/model", "max_path_tokens": 48, "max_summary_tokens": 32}
    recs = [{"benchmark": "modeq", "mode": "parathinker", "num_paths": n, "id": q, "sample": i, "answer": "1",
             "correct": q == "a", "majority_over_paths_correct": q == "a", "any_path_correct": q == "a",
             "settings": par} for n in (1, 2, 4) for q in ("a", "b") for i in range(3)]
    recs += [{"benchmark": "modeq", "mode": "sequential", "num_paths": 1, "id": q, "sample": i, "answer": "1",
              "correct": q == "a", "settings": {"model": "docs/demo/model", "max_tokens": 96}}
             for q in ("a", "b") for i in range(3)]
    ax = accuracy_figure(summarize(recs)).axes[0]
    assert ax.get_title() == ("Accuracy vs parallel paths: docs/demo/model\n"
                              "modeq (2 problems × 3 samples); tokens: paths ≤ 48, summary ≤ 32, traces ≤ 96")
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["modeq summary", "modeq path majority", "modeq any-path oracle", "modeq sequential"]
    assert {tuple(ln.get_ydata()) for ln in _series(ax).values()} == {(50.0, 50.0, 50.0), (50.0,)}  # equal
