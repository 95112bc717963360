"""`--help` explains every flag of every command and shows its default."""

import argparse
import os
import subprocess
import sys

import pytest

from parathinker.cli import COMMANDS, build_parser
from tests import ROOT



def subparsers() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def flag_lines(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The lines --help prints for one action."""
    formatter = parser._get_formatter()
    formatter.add_argument(action)
    return formatter.format_help()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_has_help_and_a_shown_default(command):
    parser = subparsers()[command]
    parser.format_help()  # a stray % in a help text raises here
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), f"{command} {action.option_strings or action.dest}"
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            shown = flag_lines(parser, action)
            assert "default" in shown.lower(), f"{command}: {shown}"


def test_demo_help_describes_its_options():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "parathinker.demo", "--help"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0
    assert "pipeline.py" not in r.stdout
    for option in ("--output", "--preset", "full", "quick", "default: docs/demo"):
        assert option in r.stdout


# Each command's required arguments, `--path 4`, and a prefix of one of its own long flags that
# only that flag has (argparse would once have taken it for the whole flag).
ABBREVIATED = {
    "generate": (["--model", "m", "q"], "--max-path", "--max-path-tokens"),
    "eval": (["--model", "m", "--output", "o"], "--sample", "--samples"),
    "build-data": (["--teacher", "m", "--problems", "p", "--output", "o"], "--samples-per", "--samples-per-problem"),
    "train": (["--model", "m", "--data", "d", "--output", "o"], "--epoch", "--epochs"),
    "convert-reference": (["--input", "i", "--output", "o", "--tokenizer", "t"], "--skip", "--skip-invalid"),
    "serve": (["--model", "m"], "--num-path", "--num-paths"),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_abbreviated_flags_are_refused_naming_the_flag(command, capsys):
    required, prefix, full = ABBREVIATED[command]
    flags = [o for a in subparsers()[command]._actions for o in a.option_strings]
    assert full in flags and [f for f in flags if f.startswith(prefix)] == [full]  # a unique prefix
    for flag in ("--path", prefix):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([command, *required, flag, "4"])
        assert e.value.code == 2
        assert f"unrecognized arguments: {flag} 4" in capsys.readouterr().err


def test_standalone_entry_points_refuse_abbreviated_flags(monkeypatch, capsys):
    import parathinker.demo.__main__ as demo
    import parathinker.eval.cli as eval_cli
    import parathinker.serve.cli as serve_cli
    import parathinker.train.cli as train_cli

    def must_not_run(*args, **kwargs):
        raise AssertionError("an abbreviated flag was accepted")

    for module, name in ((eval_cli, "run_eval"), (serve_cli, "run_serve"), (train_cli, "run_train"),
                         (demo, "run_demo")):
        monkeypatch.setattr(module, name, must_not_run)
    for main, argv, flag in ((eval_cli.main, ["--model", "m", "--output", "o", "--path", "4"], "--path"),
                             (serve_cli.main, ["--model", "m", "--num-path", "4"], "--num-path"),
                             (train_cli.main, ["train", "--model", "m", "--data", "d", "--output", "o",
                                               "--epoch", "4"], "--epoch"),
                             (demo.main, ["--out", "x"], "--out")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and f"unrecognized arguments: {flag}" in capsys.readouterr().err
