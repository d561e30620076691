#!/usr/bin/env bash
# Speed on one GPU (issue 14): the MMDiT at SD3-medium size against diffusers, and the training step at the released
# widths and token counts (--full-size, depth / 2 on a 141 GB GPU, / 8 on a smaller one, so that both variants fit
# at once) against the reference assembly trained as DeepSpeed's bf16 mode does; each without and with --compile,
# in bf16.
#   bash benchmarks/gpu_bench.sh [dit] [training]      # default: both parts
# Prints each benchmark's ratio lines. Measured on a fresh H200: 6 min 45 s (DiT 40 + 106 s, training 88 + 168 s).
set -uo pipefail
PY="${PYTHON:-python3}"  # the interpreter of the project's environment (PYTHON=... to choose another)
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONHASHSEED=0 PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "benchmarks/gpu_bench.sh: no CUDA device; run it on a GPU machine" >&2; exit 2; }
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(dit training)
status=0
for part in "${parts[@]}"; do
  case "$part" in
    dit)
      # SD3-medium MMDiT: 24 blocks x 24 heads x 64, 64x64 latents (512^2 images), image2image (target + 2 conditions).
      DIT=(--device cuda --dtype bf16 --batch-size 8 --latent-size 64 --num-layers 24 --num-heads 24 --head-dim 64
           --joint-attention-dim 4096 --pooled-dim 2048 --num-conds 2 --repeats 5 --warmup 2)
      for compile in "" "--compile"; do
        echo "== bench_dit.py SD3-medium bf16 ${compile:-eager} ($(date -Is))"
        timeout 150 "$PY" benchmarks/bench_dit.py "${DIT[@]}" $compile || status=1
      done ;;
    training)
      # Both variants are held at once: depth / 2 peaked at 126 GiB on a 140 GiB H200; a smaller GPU (an 80 GB H100)
      # gets depth / 8 (about 60 GiB by the same measure; DEPTH_DIVISOR=N to choose).
      gib=$("$PY" -c "import torch; print(torch.cuda.mem_get_info()[1] // 2**30)")
      depth="${DEPTH_DIVISOR:-$([ "$gib" -ge 135 ] && echo 2 || echo 8)}"
      # Levers off, then on (host-malloc-cache is a CPU lever: not used here).
      for levers in none compile,cached-latents; do
        echo "== bench_training.py --full-size --depth-divisor $depth --bf16 --levers $levers (${gib} GiB GPU; $(date -Is))"
        timeout "$([ "$levers" = none ] && echo 190 || echo 230)" "$PY" benchmarks/bench_training.py --full-size --depth-divisor "$depth" --bf16 --levers "$levers" \
          --threads 16 --num-samples 16 --blocks 3 --steps-per-block 2 --warmup-steps 2 --loss-tolerance 0.1 || status=1
      done ;;
    *) echo "benchmarks/gpu_bench.sh: unknown part '$part' (give dit and/or training)" >&2; exit 2 ;;
  esac
done
exit "$status"
