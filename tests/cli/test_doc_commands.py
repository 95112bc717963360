"""Every command in README.md and docs/*.md runs as written, offline, against docs/demo/model.

Each document's ```bash and ```python blocks become one bash script, run in a scratch directory
(with `docs` and `tests` linked in, so relative paths resolve as from the repository root). The
only changes made to a command are the substitutions in SUBSTITUTIONS (hub models -> the demo
model, cuda -> cpu, port 8000 -> a free port, /tmp -> the scratch directory) and, to keep the
suite short, `--limit 1 --samples 1` on eval. `parathinker serve` (and `vllm serve`, whose place
it takes) starts in the background; the commands after it in that document reach it. A command
no rule in RULES knows fails the test: a new doc command must be run here or listed as not run,
with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tests import ROOT

DEMO = ROOT / "docs" / "demo" / "model"
DOCS = ["README.md", "docs/EVAL.md", "docs/SERVE.md", "docs/TRAINING.md", "docs/demo/README.md"]
HUB_MODELS = r"Leslie04/ParaThinker-1\.5B|deepseek-ai/DeepSeek-R1-Distill-Qwen-(?:1\.5|7)B"
PLACEHOLDER_MODELS = r"\./my-checkpoint|\./checkpoint\b|BASE_OR_CHECKPOINT|runs/pt-1\.5b|\bBASE\b"
SUBSTITUTIONS = [  # (pattern, replacement): applied to every runnable line
    (HUB_MODELS, str(DEMO)),
    (PLACEHOLDER_MODELS, str(DEMO)),
    (r"--device cuda\b", "--device cpu"),
    (r'device="cuda"', 'device="cpu"'),
    (r"--dtype bfloat16", "--dtype float32"),
    (r'dtype="bfloat16"', 'dtype="float32"'),
    (r"--samples \d+", "--samples 1"),
    (r"^curl ", "curl -sS --fail-with-body "),  # an HTTP error fails the command
]
# (pattern on one command, reason it is not run; None: run it). The first match decides.
RULES: list[tuple[str, str | None]] = [
    (r"^pip install", "installation: CI's own install step runs it"),
    (r"python -m pytest", "the test suite itself"),
    (r"^python -m parathinker\.demo --output docs/demo$",
     "the 30-minute demo run; `pytest -m slow tests/demo/test_demo.py` runs it"),
    (r"(^| )\.\.\.( |$)|\[options\]", "a placeholder, not a command"),
    (r"^accelerate launch --config_file ddp4\.yaml|--multi_gpu --num_processes 4 (?!.*--cpu)",
     "needs 4 GPUs"),
    (r"^accelerate launch --multi_gpu --num_processes 2 .*--cpu",
     "the same 2-process CPU launch runs in tests/train/test_train_launch.py"),
    (r"vllm serve", "vLLM needs a GPU and is not installed here"),
    (r"^for i in|^done$|^CUDA_VISIBLE_DEVICES=|--endpoint \$\(|:8001",
     "one server per GPU: the 8-GPU recipe"),
    (r"--mode (sequential|majority)\b.*--endpoint|--endpoint.*--mode (sequential|majority)\b",
     "plain traces from a vLLM/SGLang server (parathinker serve refuses them: it thinks in parallel)"),
    (r"^lm-eval run|^export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1$",
     "lm-evaluation-harness against the server: tests/serve/test_lm_eval.py runs it"),
    (r"^(parathinker|python -m parathinker|python -c|accelerate launch|curl|OUT=)", None),
]
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def blocks(doc: str) -> list[tuple[str, int, str]]:
    """(language, line number, text) of every bash and python block of a document."""
    text = (ROOT / doc).read_text()
    return [(m.group(1), text[:m.start()].count("\n") + 1, m.group(2))
            for m in re.finditer(r"^```(bash|python)\n(.*?)^```", text, re.M | re.S)]


def bash_commands(text: str) -> list[str]:
    """One string per command: continuation lines joined (a quoted string may span lines),
    comments and blank lines dropped, each step of an `a && b` chain on its own."""
    out, buf = [], ""
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        buf = f"{buf}\n{line}" if buf else line
        try:
            words = shlex.split(buf, comments=True)
        except ValueError:  # inside a quoted string that goes on
            continue
        if words:
            command = re.sub(r"\s+#[^'\"\n]*$", "", buf).strip()
            out += [part.strip() for part in command.split(" && ")]
        buf = ""
    assert not buf, f"unclosed quote in {buf!r}"
    return out


def rule(command: str) -> str | None:
    for pattern, reason in RULES:
        if re.search(pattern, command):
            return reason
    raise AssertionError(f"no rule for the doc command {command!r}: run it or list it in RULES")


def substitute(text: str, port: int, scratch: Path) -> str:
    text = re.sub(r"\b8000\b", str(port), text)  # on the doc's text, before any path is put in
    text = re.sub(r"(?<![\w.])/tmp/", f"{scratch}/tmp/", text)  # then paths (maybe in /tmp)
    for pattern, repl in SUBSTITUTIONS:
        text = re.sub(pattern, repl, text, flags=re.M)
    return text


def script(doc: str, port: int, scratch: Path) -> tuple[str, list[str]]:
    """The bash script of a document's runnable commands, and the commands not run (with why)."""
    lines = ["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT",
             f"wait_health() {{ {sys.executable} -c \"import sys,time,urllib.request as u\n"
             "for _ in range(600):\n    try: u.urlopen('http://127.0.0.1:'+sys.argv[1]+'/health'); sys.exit(0)\n"
             "    except OSError: time.sleep(0.2)\nsys.exit(1)\" \"$1\"; }"]
    skipped, server_up = [], False

    def start_server(run: str, line_no: int) -> None:
        nonlocal server_up
        if "--port" not in run:  # the default port is the doc's 8000
            run += f" --port {port}"
        lines.extend([f"echo {shlex.quote(f'+ {doc}:{line_no} {run}')}", f"{run} > serve.log 2>&1 &",
                      f"wait_health {port} || {{ cat serve.log; exit 1; }}"])
        server_up = True

    for lang, line_no, text in blocks(doc):
        if lang == "python":
            lines += [f"echo '+ {doc}:{line_no} python block'", f"{sys.executable} - <<'PYTHON_BLOCK'",
                      substitute(text, port, scratch).rstrip(), "PYTHON_BLOCK"]
            continue
        for command in bash_commands(text):
            reason = rule(command)
            if reason:
                skipped.append(f"{doc}:{line_no}: {command} -- {reason}")
                continue
            run = substitute(command, port, scratch)
            if re.match(r"^(parathinker|python -m parathinker\.serve\.cli) serve|^vllm serve", run) or \
                    run.startswith("python -m parathinker.serve"):
                run = re.sub(r"^vllm serve \S+.*?(--port \d+).*?&?$",
                             rf"parathinker serve --model {DEMO} --device cpu \1", run).rstrip(" &")
                start_server(run, line_no)
                continue
            if f":{port}/" in run and not server_up:  # the doc assumes a server (e.g. vLLM's) here
                start_server(f"parathinker serve --model {DEMO} --device cpu --port {port}", line_no)
            if re.match(r"^(parathinker|python -m parathinker\.eval\.cli) eval", run):
                run += " --limit 1"
            lines += [f"echo {shlex.quote(f'+ {doc}:{line_no} {run[:160]}')}", run]
    return "\n".join(lines) + "\n", skipped


@pytest.mark.parametrize("doc", DOCS)
def test_doc_commands_run_on_the_demo_model(doc, tmp_path):
    assert DEMO.joinpath("config.json").exists()
    for name in ("docs", "tests"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "tmp").mkdir()
    from parathinker.demo.task import all_problems  # problems the demo model was trained on

    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(p) + "\n" for p in all_problems()[:2]))
    (tmp_path / "data.jsonl").write_text(json.dumps(  # a sample the doc's `train` lines read
        {"question": "Solve 2x + 0 = 1 modulo 13.", "paths": [" 2*7 1 yes 7. \\boxed{7}"],
         "summary": " \\boxed{7}."}) + "\n")
    port = free_port()
    text, skipped = script(doc, port, tmp_path)
    (tmp_path / "doc.sh").write_text(text)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PARATHINKER_DATA_DIR":
           str(ROOT.parent / "shared" / "benchmarks"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(tmp_path / "doc.sh")], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=900)
    print("\n".join(["not run:", *skipped]))
    assert r.returncode == 0, f"{doc}: exit {r.returncode}\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
