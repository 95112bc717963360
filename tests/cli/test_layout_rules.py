"""The package's shape, as issue 21's "done when" states it, checked from the source with ast:
few loose top-level modules, "reference" only for the released engine's layout, no import cycle
between parathinker's modules, short files in serve/."""

import ast
from pathlib import Path


from tests import ROOT

PACKAGE = ROOT / "parathinker"
MAX_TOP_LEVEL_MODULES = 6  # besides __init__ and __main__
# The only modules named for "reference": the released vLLM fork's layout (REFERENCE.md).
REFERENCE_MODULES = {"spec/reference_layout.py", "engine/reference_request.py"}
MAX_SERVE_LINES = 300


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """parathinker modules that `path` (module `name`) imports anywhere: at the top, inside
    functions, under TYPE_CHECKING. `from a import b` counts as importing a.b when b is a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb from this module's package
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a name in a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_the_cycle_finder_finds_cycles_and_only_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"f"}, "f": {"e"}, "g": set()}
    assert import_cycles(graph) == [["a", "b", "c"], ["e", "f"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_sees_every_kind_of_import(tmp_path):
    (tmp_path / "m.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import parathinker.spec.tokens\n"
        "from parathinker.attention import paged\n"
        "from . import config\n"
        "from .demo.task import build\n"
        "if TYPE_CHECKING:\n    from parathinker.llm import LLM\n"
        "def f():\n    import parathinker.engine.sampler as s\n")
    known = set(modules())
    got = imported(tmp_path / "m.py", "parathinker.m", known)
    assert got == {"parathinker.spec.tokens", "parathinker.attention.paged", "parathinker.config",
                   "parathinker.demo.task", "parathinker.llm", "parathinker.engine.sampler"}


def test_few_top_level_modules():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert len(loose) <= MAX_TOP_LEVEL_MODULES, loose


def test_reference_names_only_the_released_engines_layout():
    named = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
             if "reference" in p.stem}
    assert named == REFERENCE_MODULES


def test_no_import_cycle():
    found = modules()
    known = set(found)
    graph = {name: imported(path, name, known) for name, path in found.items()}
    assert import_cycles(graph) == []


def test_serve_files_are_short():
    long = {p.name: n for p in sorted((PACKAGE / "serve").glob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_SERVE_LINES}
    assert long == {}
