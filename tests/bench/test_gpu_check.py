"""bench/gpu_check.sh, the one call that runs every GPU check on a borrowed machine: its test list
names every test file that holds the `gpu` mark, and those files collect where only the core
dependencies are installed (a GPU image has torch and transformers, not the server's or the
grader's packages: collecting the whole of tests/ there stops at tests/serve)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests import ROOT
from tests.cli.test_extras import MODULE_BLOCK, OPTIONAL

SCRIPT = ROOT / "bench" / "gpu_check.sh"
# the extras' packages, and the grader's and lm-eval's (not on a GPU image either)
ABSENT = sorted(OPTIONAL | {"math_verify", "lm_eval"})


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
    """pytest run as tests/cli/test_extras.py runs a module's main, every package in ABSENT
    unimportable."""
    def collect(*paths: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", MODULE_BLOCK, *ABSENT, "--", "pytest",
                               "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                               *paths], cwd=ROOT, capture_output=True, text=True, timeout=300)

    files = collect(*gpu_tests_in_script())
    assert files.returncode == 0, files.stdout[-3000:] + files.stderr[-3000:]
    m = re.search(r"(\d+)/\d+ tests collected", files.stdout)
    assert m and int(m.group(1)) >= len(gpu_tests_in_script()), files.stdout[-3000:]
    # the blocking works: tests/serve does not collect without them
    whole = collect("tests/serve")
    assert whole.returncode != 0 and "None in sys.modules" in whole.stdout + whole.stderr
