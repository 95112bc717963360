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
