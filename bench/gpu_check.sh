#!/usr/bin/env bash
# Every GPU check in one call, for one H100/H200 with torch preinstalled and no network:
#   bash bench/gpu_check.sh            (from the repository root; about 8 minutes)
# 1. the tests marked `gpu` (flex vs reference kernels, engine parity on CUDA, sampler on CUDA);
# 2. bench/long_context.py: 8-path decode and summary steps vs the HBM floor at 2K and 16K/path;
# 3. bench/flex_vs_runs.py: one layer's decode attention, flex vs runs, 8 x 16K;
# 4. bench/path_overhead.py: P = 1, 8, 16 paths of 4K tokens (paper: 8 paths +7.1% at 16K;
#    16K paths take ~3x longer: rerun with --tokens 16384 when there is time);
# 5. bench/compile_step.py: the decode step with CUDA graphs (compile, the CUDA default) off/on.
# The package's Python dependencies (transformers, safetensors, pytest, hypothesis) must be
# installed; without network, install them first from wheels carried along
# (pip download -d wheels ...; pip install --no-index --find-links wheels ...).
# Each step's last line is one JSON result; the log is also written to gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee gpu_check.log) 2>&1
status=0
step() { echo "=== $*"; "$@" || { echo "FAILED ($?): $*"; status=1; }; }
python - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device"
print("device:", torch.cuda.get_device_name(), "torch", torch.__version__)
PY
step python -m pytest -q -p no:cacheprovider -m gpu tests
step python bench/long_context.py --device cuda --dtype bfloat16 --attention flex --sizes 2048,16384
step python bench/flex_vs_runs.py --device cuda --dtype bfloat16 --context 16384
step python bench/path_overhead.py --device cuda --dtype bfloat16 --attention flex --tokens 4096 --paths 1,8,16 --rounds 1
step python bench/compile_step.py --device cuda --dtype bfloat16 --model 1.5b --attention flex --context 4096 --paths 1,8,16 --steps 20
echo "gpu_check: $([ $status = 0 ] && echo ok || echo FAILED)"
exit $status
