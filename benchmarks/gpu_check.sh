#!/usr/bin/env bash
# The GPU check (one GPU, under 8 minutes on an H100/H200): fused SDPA kernels really selected for our local bf16
# attention, speed and memory at real sizes (benchmarks/gpu_check.py), then the GPU test suite (tests/gpu; its
# Transformer Engine cases skip themselves when TE is not usable, the two-GPU case when one GPU is visible).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, with the project's environment active
#
# Exit status: non-zero when a fused attention backend is missing or a GPU test fails.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONHASHSEED=0 PYTHONWARNINGS=ignore

status=0
echo "== benchmarks/gpu_check.py ($(date -Is))"
timeout 300 python benchmarks/gpu_check.py "$@" || status=1
echo "== tests/gpu ($(date -Is))"
timeout 420 python -m pytest tests/gpu -q -rs || status=1
echo "== done ($(date -Is)), status $status"
exit "$status"
