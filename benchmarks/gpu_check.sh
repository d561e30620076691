#!/usr/bin/env bash
# The GPU check (one GPU): fused SDPA kernels really selected for our local bf16 attention and the LLM's padding
# layout at Qwen2.5-1.5B size (benchmarks/gpu_check.py), then the speed benchmarks at full widths against diffusers
# and the reference assembly, with and without --compile (benchmarks/gpu_bench.sh). --with-tests also runs the GPU
# test suite (tests/gpu; its Transformer Engine cases skip themselves when TE is not usable, the two-GPU case when
# one GPU is visible).
#
#   bash benchmarks/gpu_check.sh [--with-tests] [gpu_check.py flags]   # from the repository root, environment active
#
# Measured on a fresh H200 in one call (2026-12-04): gpu_check.py 30 s, the DiT benchmark 40 s eager + 106 s
# compiled, the training benchmark 88 s levers off + 168 s on: 7 min 15 s; with --with-tests 2 min more (tests/gpu
# 120 s without TE). Exit status: non-zero when a fused attention backend is missing, a benchmark fails or (with
# --with-tests) a GPU test fails.
set -uo pipefail
PY="${PYTHON:-python3}"  # the interpreter of the project's environment (PYTHON=... to choose another)
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONHASHSEED=0 PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1

tests=0
check_args=()
for arg in "$@"; do
  if [ "$arg" = "--with-tests" ]; then tests=1; else check_args+=("$arg"); fi
done
status=0
echo "== benchmarks/gpu_check.py ($(date -Is))"
timeout 300 "$PY" benchmarks/gpu_check.py ${check_args[@]+"${check_args[@]}"} || status=1
echo "== benchmarks/gpu_bench.sh ($(date -Is))"
PYTHON="$PY" bash benchmarks/gpu_bench.sh dit training || status=1
if [ "$tests" = 1 ]; then
  echo "== tests/gpu ($(date -Is))"
  timeout 420 "$PY" -m pytest tests/gpu -q -rs || status=1
fi
echo "== done ($(date -Is)), status $status"
exit "$status"
