"""What `parathinker train` tells a new user: every flag's help with its default, a warning when
tiny data makes every optimizer step repeat rows, and a problems file pointed to build-data."""

from __future__ import annotations

import argparse
import json

import pytest

from parathinker.cli import main as parathinker_main
from parathinker.train.cli import add_train_args
from parathinker.train.cli import main as train_main


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parathinker train")
    add_train_args(p)
    return p


def test_every_train_flag_has_help():
    actions = [a for a in _train_parser()._actions if not isinstance(a, argparse._HelpAction)]
    assert len(actions) > 30
    missing = [a.option_strings[0] for a in actions if not (a.help or "").strip()]
    assert missing == []


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        parathinker_main(["train", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    for a in _train_parser()._actions:
        if a.option_strings[0] == "-h" or a.default is None or a.default is False:
            continue
        assert f"(default: {a.default})" in text, a.option_strings[0]
    assert "--grad-accum GRAD_ACCUM micro-batches per optimizer step" in text
    assert "(default: 16)" in text and "(default: 1e-05)" in text and "(default: 0.0)" in text


def _write_samples(path, n):
    path.write_text("".join(json.dumps({"question": f"What is {k}+1?", "paths": [f"{k} and one.",
                                                                                 "Count up."],
                                        "summary": f" \\boxed{{{k + 1}}}."}) + "\n"
                            for k in range(n)))
    return path


def test_tiny_data_with_default_grad_accum_warns(ckpt_dir, tmp_path, capsys):
    data = _write_samples(tmp_path / "data.jsonl", 3)
    # --no-pack: one row per sample, so an epoch has 3 rows; the default --grad-accum is 16
    assert train_main(["train", "--model", str(ckpt_dir), "--data", str(data), "--output",
                       str(tmp_path / "out"), "--max-steps", "1", "--no-pack", "--cpu"]) == 0
    err = capsys.readouterr().err
    assert "an epoch has 3 row(s) but one optimizer step takes 16" in err
    assert "--grad-accum 16 x --batch-size 1" in err and "Pass --grad-accum 3 or less" in err


def test_enough_rows_for_a_step_do_not_warn(ckpt_dir, tmp_path, capsys):
    data = _write_samples(tmp_path / "data.jsonl", 3)
    assert train_main(["train", "--model", str(ckpt_dir), "--data", str(data), "--output",
                       str(tmp_path / "out"), "--max-steps", "1", "--no-pack", "--cpu",
                       "--grad-accum", "3"]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("skip_invalid", [False, True])
def test_problems_file_points_to_build_data(ckpt_dir, tmp_path, capsys, skip_invalid):
    """Rows of a benchmark / training problems file (the fields of /work/shared/benchmarks)."""
    problems = tmp_path / "aime24.jsonl"
    problems.write_text("".join(json.dumps({"id": f"aime24-I-0{k}", "problem": f"Find {k}.",
                                            "answer": str(k), "answer_raw": str(k),
                                            "dataset": "aime24"}) + "\n" for k in range(1, 4)))
    out = tmp_path / "out"
    args = ["train", "--model", str(ckpt_dir), "--data", str(problems), "--output", str(out), "--cpu"]
    assert parathinker_main(args + (["--skip-invalid"] if skip_invalid else [])) == 2
    err = capsys.readouterr().err
    assert f"{problems}:1: this is a problem" in err
    assert f"parathinker build-data --teacher MODEL_OR_URL --problems {problems}" in err
    assert not out.exists()  # nothing written
