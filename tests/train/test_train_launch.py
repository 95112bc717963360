"""`accelerate launch` of the trainer on CPU, as docs/TRAINING.md writes it: two real processes
(`--multi_gpu --num_processes 2`, gloo) train exactly as one process with twice the gradient
accumulation, and print `done:` once; the launches that silently start one process
(`--cpu --num_processes 2`, a MULTI_CPU config) are warned about."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from parathinker.train.cli import main
from parathinker.train.launch import single_process_launch_warning

QUESTIONS = ["What is 2+3?", "Find x if 2x + 3 = 11.", "What is 6 * 7?", "What is 1+1?",
             "What is the sum of the first 10 positive integers?", "What is 9 - 4?",
             "Compute 1/2 + 1/3.", "What is 7 * 3 mod 10?"]
STEPS = 3
# 8 rows (one sample each), 4 rows per optimizer step: 2 steps per epoch, the third in epoch 2
COMMON = ["--max-steps", str(STEPS), "--no-pack", "--cpu", "--seed", "0", "--learning-rate",
          "3e-3", "--save-steps", "100"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]  # the `accelerate` CLI's launch
QUIET = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("launch") / "data.jsonl"
    rows = [{"question": q, "paths": [f"Path one of {q} We try it.", f"Another path: {q[::-1]}"],
             "summary": f" \\boxed{{{k}}}."} for k, q in enumerate(QUESTIONS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def launch(launcher: list[str], ckpt_dir, data, out, *train_args: str, timeout: float = 240):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [*ACCELERATE, *launcher, "-m", "parathinker.train.cli", "train", "--model", str(ckpt_dir),
           "--data", str(data), "--output", str(out), *train_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_as_one_with_twice_the_accumulation(ckpt_dir, data, tmp_path, capsys):
    two = launch(["--multi_gpu", "--num_processes", "2", "--main_process_port", "0", *QUIET],
                 ckpt_dir, data, tmp_path / "two", *COMMON, "--grad-accum", "2")
    assert "2 process(es)" in two.stdout
    assert two.stdout.count("done: ") == 1 and two.stdout.count("final model written") == 1
    assert "warning" not in two.stderr.lower()

    assert main(["train", "--model", str(ckpt_dir), "--data", str(data), "--output",
                 str(tmp_path / "one"), *COMMON, "--grad-accum", "4"]) == 0
    assert "1 process(es)" in capsys.readouterr().out

    m2, m1 = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert [m["step"] for m in m2] == [m["step"] for m in m1] == list(range(1, STEPS + 1))
    for a, b in zip(m2, m1):
        assert (a["epoch"], a["num_tokens"], a["learning_rate"]) == (b["epoch"], b["num_tokens"],
                                                                     b["learning_rate"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert m1[0]["loss"] != pytest.approx(m1[-1]["loss"], rel=1e-3)  # it did train
    w2 = load_file(tmp_path / "two" / "model.safetensors")
    w1 = load_file(tmp_path / "one" / "model.safetensors")
    assert w2.keys() == w1.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6, msg=k)


MULTI_CPU_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_CPU
num_machines: 1
num_processes: 2
mixed_precision: 'no'
use_cpu: true
"""


@pytest.mark.parametrize("how", ["cpu-flag", "multi-cpu-config"])
def test_launch_that_starts_one_of_two_processes_warns(how, ckpt_dir, data, tmp_path):
    if how == "cpu-flag":
        launcher = ["--cpu", "--num_processes", "2", *QUIET]
    else:
        config = tmp_path / "multi_cpu.yaml"
        config.write_text(MULTI_CPU_CONFIG)
        launcher = ["--config_file", str(config)]
    proc = launch(launcher, ckpt_dir, data, tmp_path / "out", "--max-steps", "1", "--grad-accum",
                  "1", "--cpu")
    assert "1 process(es)" in proc.stdout  # what accelerate really started
    assert "but this run has 1 process" in proc.stderr
    assert "accelerate launch --multi_gpu --num_processes N" in proc.stderr
    assert proc.stdout.count("done: ") == 1


def test_launch_warning_reads_the_environment():
    launched = {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no"}
    assert single_process_launch_warning({**launched, "MASTER_ADDR": "127.0.0.1"}, 1) is not None
    assert single_process_launch_warning(launched, 1) is None  # asked for one process
    assert single_process_launch_warning({"MASTER_ADDR": "10.0.0.1"}, 1) is None  # not accelerate
    ok = {**launched, "MASTER_ADDR": "127.0.0.1"}
    assert single_process_launch_warning({**ok, "WORLD_SIZE": "2"}, 2) is None
    assert single_process_launch_warning({**ok, "PMI_SIZE": "4"}, 1) is None  # mpirun: its world
