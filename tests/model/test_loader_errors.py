"""A checkpoint that cannot load says what is wrong with it, through the CLI as through the API."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tests import ROOT

TINY = ["--device", "cpu", "--paths", "2", "--max-path-tokens", "12", "--max-summary-tokens", "90",
        "--temperature", "0", "--json", "2+2"]


def generate(model, *flags):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "parathinker.cli", "generate", "--model", str(model),
                           *flags, *TINY], capture_output=True, text=True, env=env, timeout=300)


def pickled_copy(ckpt_dir, dest):
    shutil.copytree(ckpt_dir, dest)
    (dest / "model.safetensors").unlink()
    torch.save(load_file(ckpt_dir / "model.safetensors"), dest / "pytorch_model.bin")
    return dest


def test_missing_tokenizer_files_are_named(ckpt_dir, tmp_path):
    d = shutil.copytree(ckpt_dir, tmp_path / "no-tokenizer")
    for f in d.glob("tokenizer*"):
        f.unlink()
    r = generate(d)
    assert r.returncode == 2
    assert "has no tokenizer files" in r.stderr and "tokenizer.json" in r.stderr
    assert "base model" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("name", ["{tmp}/does-not-exist", "./no/such/checkpoint", "~/no-such-dir-xyz"])
def test_a_local_path_that_does_not_exist(name, tmp_path):
    r = generate(name.format(tmp=tmp_path))
    assert r.returncode == 2
    assert "does not exist" in r.stderr
    assert "Repo id" not in r.stderr and "HFValidation" not in r.stderr and "Traceback" not in r.stderr


def test_an_invalid_hub_id_is_not_validation_noise():
    r = generate("not a valid id")
    assert r.returncode == 2
    assert "not a local directory, nor a Hugging Face hub id" in r.stderr
    assert "Repo id must" not in r.stderr


def test_pickle_checkpoint_points_to_the_flag_and_the_converter(ckpt_dir, tmp_path):
    d = pickled_copy(ckpt_dir, tmp_path / "pickled")
    refused = generate(d)
    assert refused.returncode == 2
    assert "--allow-pickle" in refused.stderr and "parathinker.model.to_safetensors" in refused.stderr
    expected = json.loads(generate(ckpt_dir).stdout)
    allowed = generate(d, "--allow-pickle")
    assert allowed.returncode == 0, allowed.stderr
    assert "only do this for checkpoints you trust" in allowed.stderr
    assert json.loads(allowed.stdout)["summary"] == expected["summary"]  # greedy: same weights


def test_the_converter_writes_equal_safetensors(ckpt_dir, tmp_path):
    d = pickled_copy(ckpt_dir, tmp_path / "pickled")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "parathinker.model.to_safetensors", str(d)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    ours, original = load_file(d / "model.safetensors"), load_file(ckpt_dir / "model.safetensors")
    assert ours.keys() == original.keys()
    assert all(torch.equal(ours[k], original[k]) for k in original)
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 2 and "already has" in again.stderr  # nothing overwritten
    assert generate(d).returncode == 0


def test_allow_pickle_reaches_eval_and_build_data(ckpt_dir, tmp_path):
    d = pickled_copy(ckpt_dir, tmp_path / "pickled")
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"id": "a", "problem": "2+2?", "answer": "4"}) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    commands = {
        "eval": ["eval", "--model", str(d), "--data", str(problems), "--paths", "2",
                 "--max-path-tokens", "12", "--max-summary-tokens", "90", "--output", str(tmp_path / "ev")],
        "build-data": ["build-data", "--teacher", str(d), "--problems", str(problems), "--output",
                       str(tmp_path / "data.jsonl"), "--traces-per-problem", "1", "--paths", "1",
                       "--max-tokens", "8", "--select", "all", "--include-truncated"],
    }
    for name, args in commands.items():
        r = subprocess.run([sys.executable, "-m", "parathinker.cli", *args, "--device", "cpu",
                            "--allow-pickle"], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, (name, r.stderr)
        assert "only do this for checkpoints you trust" in r.stderr, name
