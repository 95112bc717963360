"""`parathinker generate` runs offline on a tiny checkpoint directory."""

import json
import os
import subprocess
import sys


def run(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "parathinker.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_generate_prints_paths_summary_answer(ckpt_dir):
    r = run("generate", "--model", str(ckpt_dir), "--device", "cpu", "--paths", "3",
            "--max-path-tokens", "12", "--max-summary-tokens", "80", "--temperature", "0",
            "What is 2+3?")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for k in (1, 2, 3):
        assert f"===== path {k} (" in out
    assert "===== summary" in out and "===== answer:" in out
    assert "tokens/s" in out.strip().splitlines()[-1]


def test_generate_json(ckpt_dir):
    r = run("generate", "--model", str(ckpt_dir), "--device", "cpu", "--paths", "2",
            "--max-path-tokens", "10", "--max-summary-tokens", "80", "--seed", "1", "--json", "q")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert len(data["paths"]) == 2 and data["summary"]["token_ids"]
    # --attention picks the backend; seeded outputs do not depend on it
    r = run("generate", "--model", str(ckpt_dir), "--device", "cpu", "--paths", "2",
            "--max-path-tokens", "10", "--max-summary-tokens", "80", "--seed", "1", "--json",
            "--attention", "gathered", "q")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["paths"] == data["paths"]
    r = run("generate", "--model", str(ckpt_dir), "--attention", "dense", "q")
    assert r.returncode == 2 and "--attention" in r.stderr


def test_generate_bad_input_is_a_clear_error(ckpt_dir, tmp_path):
    r = run("generate", "--model", str(ckpt_dir), "--device", "cpu", "--paths", "0", "q")
    assert r.returncode == 2 and "num_paths must be >= 1" in r.stderr
    r = run("generate", "--model", str(tmp_path / "nope"), "--device", "cpu", "q")
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_every_subcommand_is_reachable_from_the_umbrella_command():
    for command in ("generate", "eval", "build-data", "train", "convert-reference", "serve"):
        r = run(command, "--help")
        assert r.returncode == 0 and "usage: parathinker " + command in r.stdout, (command, r.stderr)


def test_eval_through_the_umbrella_reports_a_missing_data_file(ckpt_dir, tmp_path):
    missing = tmp_path / "missing.jsonl"
    r = run("eval", "--model", str(ckpt_dir), "--device", "cpu", "--data", str(missing),
            "--output", str(tmp_path / "out"))
    assert r.returncode == 2 and str(missing) in r.stderr, r.stderr


def test_min_finished_paths_above_paths_is_capped_as_eval_and_serve_do(ckpt_dir):
    common = ("generate", "--model", str(ckpt_dir), "--device", "cpu", "--paths", "2",
              "--max-path-tokens", "10", "--max-summary-tokens", "80", "--seed", "1",
              "--temperature", "0", "--json")
    capped = run(*common, "--min-finished-paths", "5", "q")
    assert capped.returncode == 0, capped.stderr
    every = run(*common, "--min-finished-paths", "2", "q")
    assert json.loads(capped.stdout)["paths"] == json.loads(every.stdout)["paths"]


def test_generate_caps_a_path_budget_the_context_cannot_hold(ckpt_dir):
    """The default --max-path-tokens (16384) exceeds the tiny model's 4096 positions: lowered to
    what the prompt and the summary budget leave, said once."""
    r = run("generate", "--model", str(ckpt_dir), "--device", "cpu", "--paths", "2",
            "--max-summary-tokens", "90", "--temperature", "0", "--json", "What is 2+3?")
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if line.startswith("note: --max-path-tokens 16384")]
    assert len(notes) == 1, r.stderr
    used = int(notes[0].rsplit("using ", 1)[1])
    context = json.loads((ckpt_dir / "config.json").read_text())["max_position_embeddings"]
    prompt_len = len(json.loads(r.stdout)["prompt_token_ids"])
    assert used == context - prompt_len - 90


def test_generate_checks_its_flags_before_loading_anything(tmp_path, capsys):
    """A bad flag is reported at once, not after the tokenizer loads (or the hub model downloads):
    the model here does not exist, so an error about it means the flags were checked too late."""
    from parathinker.cli import main

    missing = str(tmp_path / "no-such-model")
    for flags, message in ((["--paths", "0"], "num_paths must be >= 1, got 0"),
                           (["--min-finished-paths", "0"], "min_finished_paths must be in 1..num_paths"),
                           (["--max-summary-tokens", "0"], "max_summary_tokens must be >= 1, got 0"),
                           (["--max-path-tokens", "1"], "max_path_tokens=1 cannot hold"),
                           (["--min-path-tokens", "-1"], "min_path_tokens must be in 0..max_path_tokens"),
                           (["--temperature", "-1"], "temperature must be 0 (greedy) or in"),
                           (["--top-p", "0"], "top_p must be in (0, 1]")):
        assert main(["generate", "--model", missing, *flags, "q"]) == 2
        err = capsys.readouterr().err
        assert message in err and "no-such-model" not in err, (flags, err)
    assert main(["generate", "--model", missing, "q"]) == 2  # good flags: now the model is the error
    assert "no-such-model" in capsys.readouterr().err
