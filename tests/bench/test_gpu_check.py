"""bench/gpu_check.sh, the one call that runs every GPU check on a borrowed machine: its test list
names every test file that holds the `gpu` mark, and those files collect where only the core
dependencies are installed (a GPU image has torch and transformers, not the server's or the
grader's packages: collecting the whole of tests/ there stops at tests/serve)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.sh"
EXTRAS = ("openai", "fastapi", "uvicorn", "math_verify", "lm_eval", "accelerate")


def gpu_tests_in_script() -> list[str]:
    m = re.search(r'^GPU_TESTS="([^"]*)"', SCRIPT.read_text(), re.M)
    assert m, "no GPU_TESTS=\"...\" in bench/gpu_check.sh"
    return m.group(1).split()


def test_the_script_names_every_file_with_the_gpu_mark():
    mark = re.compile(r"^(@pytest\.mark\.gpu\b|pytestmark = .*\bpytest\.mark\.gpu\b)", re.M)
    marked = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                    if mark.search(p.read_text()))
    assert len(marked) >= 4
    assert sorted(gpu_tests_in_script()) == marked
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_the_gpu_files_collect_without_the_extras():
    """Collected in a child where importing any optional extra raises ImportError."""
    block = ("import sys, pytest\n"
             "class Block:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             f"        if name.split('.')[0] in {EXTRAS!r}:\n"
             "            raise ImportError('blocked: ' + name)\n"
             "sys.meta_path.insert(0, Block())\n"
             "sys.exit(pytest.main(sys.argv[1:]))\n")
    args = ["--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu"]
    files = subprocess.run([sys.executable, "-c", block, *args, *gpu_tests_in_script()],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert files.returncode == 0, files.stdout[-3000:] + files.stderr[-3000:]
    m = re.search(r"(\d+)/\d+ tests collected", files.stdout)
    assert m and int(m.group(1)) >= len(gpu_tests_in_script()), files.stdout[-3000:]
    # the blocker works: the whole suite does not collect without the extras
    whole = subprocess.run([sys.executable, "-c", block, *args, "tests/serve"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert whole.returncode != 0 and "blocked: " in whole.stdout + whole.stderr
