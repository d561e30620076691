#!/usr/bin/env bash
# The GPU check (one GPU): fused SDPA kernels really selected for our local bf16 attention and the LLM's padding
# layout at Qwen2.5-1.5B size (benchmarks/gpu_check.py), the speed benchmarks at full widths against diffusers and
# the reference assembly, with and without --compile (benchmarks/gpu_bench.sh), then the GPU test suite (tests/gpu;
# its Transformer Engine cases skip themselves when TE is not usable, the two-GPU case when one GPU is visible).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, with the project's environment active
#
# Measured on one H200 (2026-12-04, in two calls): gpu_check.py 29 s, the DiT benchmark 46 s eager + 104 s compiled,
# the training benchmark 137 s levers off + 181 s on, tests/gpu 105 s without TE: about 10 minutes in all.
# Exit status: non-zero when a fused attention backend is missing, a benchmark fails or a GPU test fails.
set -uo pipefail
PY="${PYTHON:-python3}"  # the interpreter of the project's environment (PYTHON=... to choose another)
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONHASHSEED=0 PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1

status=0
echo "== benchmarks/gpu_check.py ($(date -Is))"
timeout 300 "$PY" benchmarks/gpu_check.py "$@" || status=1
echo "== benchmarks/gpu_bench.sh ($(date -Is))"
PYTHON="$PY" bash benchmarks/gpu_bench.sh dit training || status=1
echo "== tests/gpu ($(date -Is))"
timeout 420 "$PY" -m pytest tests/gpu -q -rs || status=1
echo "== done ($(date -Is)), status $status"
exit "$status"
