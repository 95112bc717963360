"""Optional dependencies: which extra each command needs, checked before the command starts.

    need("serve")   # raises MissingExtra: `serve` needs fastapi, uvicorn: pip install "parathinker[serve]"

`pip install parathinker` runs `generate` and `eval` on the engine; the rest need an extra
(pyproject.toml's [project.optional-dependencies], kept in step by tests/cli/test_extras.py).
"""

from __future__ import annotations

import importlib.util

# feature -> (the command line it names, the modules it imports, the extra that installs them)
FEATURES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "serve": ("parathinker serve", ("fastapi", "uvicorn"), "serve"),
    "train": ("parathinker train", ("accelerate",), "train"),
    "teacher": ("parathinker build-data --teacher URL", ("openai",), "train"),
    "endpoint": ("parathinker eval --endpoint URL", ("openai",), "eval"),
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
