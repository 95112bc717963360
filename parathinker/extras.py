"""Optional dependencies: which extra each command needs, checked before the command starts.

    need("serve")   # raises MissingExtra: `serve` needs fastapi, uvicorn: pip install "parathinker[serve]"
    check_command("eval", args)   # the extras a command needs with these flags (--endpoint: openai)
    if exits_for_missing_extra("serve", args): return 2   # a module's main: python -m ...serve.cli

`pip install parathinker` runs `generate` and `eval` on the engine; the rest need an extra
(pyproject.toml's [project.optional-dependencies], kept in step by tests/cli/test_extras.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

# feature -> (the command line it names, the modules it imports, the extra that installs them)
FEATURES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "serve": ("parathinker serve", ("fastapi", "uvicorn"), "serve"),
    "train": ("parathinker train", ("accelerate",), "train"),
    "teacher": ("parathinker build-data --teacher URL", ("openai",), "train"),
    "endpoint": ("parathinker eval --endpoint URL", ("openai",), "eval"),
    "demo": ("python -m parathinker.demo", ("accelerate",), "train"),  # it runs parathinker train
}


class MissingExtra(ImportError):
    """An optional dependency of a command is not installed (the message says what to install)."""


def missing_modules(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def need(feature: str) -> None:
    """Raise MissingExtra naming the pip command when `feature`'s modules are not installed."""
    what, modules, extra = FEATURES[feature]
    missing = missing_modules(modules)
    if missing:
        raise MissingExtra(f"{what} needs {', '.join(missing)}, which is not installed: "
                           f'pip install "parathinker[{extra}]" (or, in a clone, '
                           f'pip install -e ".[{extra}]")')


def check_command(command: str, args: argparse.Namespace) -> None:
    """MissingExtra when `command` with these flags needs an extra that is not installed: what
    `parathinker COMMAND` and every module's main (python -m parathinker.serve.cli, eval.cli,
    train.cli, parathinker.demo) check before anything runs."""
    if command in ("serve", "train", "demo"):
        need(command)
    elif command == "build-data":
        from parathinker.train.build_data import is_endpoint_spec

        if is_endpoint_spec(args.teacher):
            need("teacher")
    elif command == "eval" and getattr(args, "endpoint", None):
        need("endpoint")


def exits_for_missing_extra(command: str, args: argparse.Namespace) -> bool:
    """check_command for a module's main: True, with `error: ...` on stderr, when it must exit 2."""
    try:
        check_command(command, args)
    except MissingExtra as e:
        print(f"error: {e}", file=sys.stderr)
        return True
    return False
