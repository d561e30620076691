#!/usr/bin/env bash
# Speed levers on one GPU (issue 14): the MMDiT at SD3-medium size and the training step at Puffin's real
# proportions, each without and with --compile, against diffusers / the reference assembly in the same process.
# Prints each benchmark's ratio lines. Budget: under 8 minutes on one H100/H200 (compile warm-up included).
#   bash benchmarks/gpu_bench.sh [extra bench_training.py flags]
# Not yet run: no GPU machine was available when it was written (the numbers in docs/performance.md are CPU).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "benchmarks/gpu_bench.sh: no CUDA device; run it on a GPU machine" >&2; exit 2; }

# SD3-medium MMDiT: 24 blocks x 24 heads x 64, 64x64 latents (512^2 images), image2image (target + 2 conditions).
DIT=(--device cuda --dtype bf16 --batch-size 8 --latent-size 64 --num-layers 24 --num-heads 24 --head-dim 64
     --joint-attention-dim 4096 --pooled-dim 2048 --num-conds 2 --repeats 5 --warmup 2)
for compile in "" "--compile"; do
  echo "== bench_dit.py SD3-medium bf16 ${compile:-eager}"
  timeout 150 python benchmarks/bench_dit.py "${DIT[@]}" $compile | tail -n 8
done

# Training at real proportions on the GPU (fp32 reference assembly vs ours), levers off then on.
for levers in none all; do
  echo "== bench_training.py --real-proportions --levers $levers"
  timeout 150 python benchmarks/bench_training.py --real-proportions --levers "$levers" --blocks 3 "$@" | tail -n 20
done
