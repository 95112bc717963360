#!/usr/bin/env bash
# Every GPU check in one call, for one H100/H200 with torch preinstalled and no network:
#   bash bench/gpu_check.sh [LOG_DIR]     (from anywhere; about 12 minutes on an H200)
# 1. the tests marked `gpu`, by file (GPU_TESTS below; tests/bench/test_gpu_check.py checks that
#    it names every file holding the mark): flex vs reference kernels, engine parity on CUDA,
#    the sampler on CUDA, CUDA graphs against eager and the slow twin;
# 2. bench/compile_step.py: the decode step with CUDA graphs (compile, the CUDA default) off/on;
# 3. bench/step_profile.py: that step's host time against its device time, and its top kernels;
# 4. bench/long_context.py: 8-path decode and summary steps vs the HBM floor at 2K and 16K/path;
# 5. bench/path_overhead.py: P = 1, 8, 16 paths of 4K tokens (paper: 8 paths +7.1% at 16K;
#    16K paths take ~3x longer: rerun with --tokens 16384 when there is time);
# 6. bench/prefill.py: prefill of 1K/4K/8K tokens against transformers' sdpa forward;
# 7. bench/flex_vs_runs.py: one layer's decode attention, flex vs runs, 8 x 16K.
# The package's core dependencies (transformers, tokenizers, safetensors, pytest, hypothesis)
# must be installed; the server, eval and grading ones (fastapi, openai, math-verify) need not
# be: only the GPU test files are collected. Without network, carry wheels along (pip download
# -d wheels ...; pip install --no-index --find-links wheels ...).
# Each step has a time limit (STEP_SCALE=200 doubles them) and its own log in LOG_DIR (default
# gpu_check/ in the repository); each benchmark's last line is one JSON result.
# ONLY="tests compile_step" runs just the steps named (by their log names), to split the whole
# into calls of a few minutes. Seen on an H200 (torch 2.11, 55fcb95): step 1 took 77 s of tests
# after ~15 s of start, step 2 about 150 s (two cold compiles of the 1.5B decode forward, ~40
# and ~60 s).
set -uo pipefail
LOG_DIR=$(realpath -m "${1:-$(dirname "$0")/../gpu_check}")  # before the cd: relative to the caller
cd "$(dirname "$0")/.."
GPU_TESTS="tests/engine/test_gpu_engine.py tests/attention/test_flex_paged.py
  tests/engine/test_sampler.py tests/engine/test_gpu_compile.py"
SCALE=${STEP_SCALE:-100}
mkdir -p "$LOG_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
# step NAME SECONDS CMD...: CMD under a time limit, its output on screen and in LOG_DIR/NAME.log
step() {
  local name=$1 limit=$(($2 * SCALE / 100)); shift 2
  [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $name "* ]] || return 0
  echo "=== $name ($(date +%T), limit ${limit} s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] && return 0
  echo "FAILED ($rc$([ "$rc" = 124 ] && echo ': time limit')): $name"
  status=1
}
python - <<'PY' 2>&1 | tee "$LOG_DIR/device.log" || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device"
print("device:", torch.cuda.get_device_name(), "torch", torch.__version__)
PY
# shellcheck disable=SC2086 # GPU_TESTS is a list of paths
step tests 240 python -m pytest -v -p no:cacheprovider -m gpu --tb=short --durations=0 $GPU_TESTS
step compile_step 240 python bench/compile_step.py --device cuda --dtype bfloat16 --model 1.5b \
  --attention flex --context 4096 --paths 1,8,16 --steps 20
step step_profile 150 python bench/step_profile.py --device cuda --dtype bfloat16 --model 1.5b \
  --attention flex --context 4096 --paths 1,16 --steps 10
step long_context 150 python bench/long_context.py --device cuda --dtype bfloat16 --attention flex \
  --sizes 2048,16384 --runs 2
step path_overhead 150 python bench/path_overhead.py --device cuda --dtype bfloat16 \
  --attention flex --tokens 4096 --paths 1,8,16 --rounds 1
step prefill 90 python bench/prefill.py --device cuda --dtype bfloat16 --sizes 1024,4096,8192
step flex_vs_runs 60 python bench/flex_vs_runs.py --device cuda --dtype bfloat16 --context 16384
echo "gpu_check: $([ $status = 0 ] && echo ok || echo FAILED) (logs in $LOG_DIR/)"
exit $status
