"""The test suite: one folder per package, CPU by default (`gpu` tests skip without CUDA).

`tests/oracle.py` and `tests/oracle_reference.py` are the independent oracles (a naive dense
generator, and the reference layout's), written from SPEC/REFERENCE without the package's engine.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout
SHARED = ROOT.parent / "shared"  # ../shared: benchmarks, SPEC, REFERENCE (never committed here)
# the KV pool of a GPU test that is not about the pool's size: the default is 90 % of the GPU less
# what the process holds, so a second live LLM (or one a failed test's traceback keeps) gets none
GPU_KV_BYTES = 1 << 28
