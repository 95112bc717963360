"""Each command's optional dependencies: in its extra, checked before it starts, and enough.

Without its extra a command exits 2 with the pip command to run (no traceback). With only its
extra (every other extra's packages made unimportable in the command's process) it runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
import urllib.request

import pytest

from parathinker.testing.servers import free_port
from tests import ROOT

# every optional package a command may import, by extra, typed in from pyproject's intent
OPTIONAL = {"fastapi", "uvicorn", "accelerate", "openai"}
ONLY = {"base": set(), "serve": {"fastapi", "uvicorn"}, "train": {"accelerate", "openai"},
        "eval": {"openai"}}
# python code run as `python -c BLOCK MODULES... -- ARGS...`: MODULES cannot be imported, then the CLI
BLOCK = ("import sys; i = sys.argv.index('--'); [sys.modules.__setitem__(m, None) for m in "
         "sys.argv[1:i]]; from parathinker.cli import main; sys.exit(main(sys.argv[i + 1:]))")


def extras() -> dict[str, set[str]]:
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {name: {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in reqs}
            for name, reqs in table.items()}


def cli(blocked: set[str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", BLOCK, *sorted(blocked), "--", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def only(extra: str) -> set[str]:
    """The packages to block for a process that has `extra` installed and nothing else optional."""
    return OPTIONAL - ONLY[extra]


def test_every_extra_lists_what_its_commands_import():
    from parathinker.extras import FEATURES

    table = extras()
    assert {name: table[name] for name in ONLY if name != "base"} == {
        name: mods for name, mods in ONLY.items() if name != "base"}
    for what, modules, extra in FEATURES.values():
        assert set(modules) <= table[extra], (what, extra)
    assert OPTIONAL <= table["test"]  # the test extra runs every command


@pytest.mark.parametrize("blocked, args, extra", [
    ({"fastapi"}, ["serve", "--model", "m"], "serve"),
    ({"uvicorn"}, ["serve", "--model", "m"], "serve"),
    ({"accelerate"}, ["train", "--model", "m", "--data", "d.jsonl", "--output", "o"], "train"),
    ({"openai"}, ["build-data", "--teacher", "http://127.0.0.1:9/v1", "--problems", "p.jsonl",
                  "--output", "o.jsonl"], "train"),
    ({"openai"}, ["eval", "--model", "m", "--endpoint", "http://127.0.0.1:9/v1", "--mode",
                  "sequential", "--output", "o"], "eval"),
])
def test_a_command_without_its_extra_names_the_pip_command(blocked, args, extra, tmp_path):
    r = cli(blocked, *args)
    assert r.returncode == 2, r.stderr
    assert f'pip install "parathinker[{extra}]"' in r.stderr
    assert "Traceback" not in r.stderr
    assert not (ROOT / "o").exists() and not (ROOT / "o.jsonl").exists()


# a module's main run as `python -m MODULE ARGS...`, MODULES blocked as in BLOCK
MODULE_BLOCK = ("import runpy, sys; i = sys.argv.index('--'); [sys.modules.__setitem__(m, None) for m in "
                "sys.argv[1:i]]; sys.argv = sys.argv[i + 1:]; "
                "runpy.run_module(sys.argv[0], run_name='__main__')")


@pytest.mark.parametrize("blocked, module, args, extra", [
    ({"fastapi"}, "parathinker.serve.cli", ["--model", "m"], "serve"),
    ({"openai"}, "parathinker.eval.cli", ["--model", "m", "--endpoint", "http://127.0.0.1:9/v1",
                                          "--mode", "sequential", "--output", "o"], "eval"),
    ({"accelerate"}, "parathinker.train.cli", ["train", "--model", "m", "--data", "d.jsonl",
                                               "--output", "o"], "train"),
    ({"openai"}, "parathinker.train.cli", ["build-data", "--teacher", "http://127.0.0.1:9/v1",
                                           "--problems", "p.jsonl", "--output", "o.jsonl"], "train"),
    ({"accelerate"}, "parathinker.demo", ["--output", "o"], "train"),
])
def test_a_module_main_without_its_extra_names_the_pip_command(blocked, module, args, extra):
    """`python -m parathinker.serve.cli` and the other module mains check their extras as the
    `parathinker` entry point does, before anything runs."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", MODULE_BLOCK, *sorted(blocked), "--", module, *args],
                       capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert f'pip install "parathinker[{extra}]"' in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (ROOT / "o").exists() and not (ROOT / "o.jsonl").exists()


def test_base_install_runs_generate(ckpt_dir):
    r = cli(only("base"), "generate", "--model", ckpt_dir, "--device", "cpu", "--paths", "2",
            "--max-path-tokens", "12", "--max-summary-tokens", "90", "--temperature", "0", "--json", "2+2")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["paths"]) == 2


def test_train_extra_alone_trains(ckpt_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "paths": [" two", " 2"], "summary": " \\boxed{2}."})
                    + "\n")
    r = cli(only("train"), "train", "--model", ckpt_dir, "--data", data, "--output", tmp_path / "out",
            "--cpu", "--max-steps", "1", "--grad-accum", "1", "--save-steps", "1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "metrics.jsonl").read_text().strip()


def _wait_healthy(port: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else "server exited"
            assert time.time() < deadline, "server did not start"
            time.sleep(0.3)


def test_serve_extra_alone_serves_and_the_client_extras_reach_it(ckpt_dir, tmp_path):
    """The server runs with only [serve]; build-data --teacher URL with only [train] and
    eval --endpoint with only [eval] each run against it."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", BLOCK, *sorted(only("serve")), "--", "serve",
                             "--model", str(ckpt_dir), "--port", str(port), "--device", "cpu",
                             "--num-paths", "2", "--max-path-tokens", "12", "--max-summary-tokens",
                             "90", "--log-level", "warning"], env=env, cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_healthy(port, proc)
        url = f"http://127.0.0.1:{port}/v1"
        problems = tmp_path / "problems.jsonl"
        problems.write_text(json.dumps({"id": "a", "problem": "1+1?", "answer": "2"}) + "\n")
        r = cli(only("train"), "build-data", "--teacher", url, "--problems", problems,
                "--output", tmp_path / "data.jsonl", "--traces-per-problem", "1", "--paths", "1")
        assert "Traceback" not in r.stderr and "needs openai" not in r.stderr, r.stderr
        traces = tmp_path / "data.jsonl.traces" / "samples.jsonl"
        assert len(traces.read_text().splitlines()) == 1  # the teacher answered
        r = cli(only("eval"), "eval", "--model", ckpt_dir, "--endpoint", url, "--mode", "parathinker",
                "--paths", "2", "--max-path-tokens", "12", "--max-summary-tokens", "90", "--data", problems,
                "--output", tmp_path / "ev")
        assert r.returncode == 0, r.stderr
        assert len((tmp_path / "ev" / "samples.jsonl").read_text().splitlines()) == 1
    finally:
        proc.terminate()
        proc.wait(30)
