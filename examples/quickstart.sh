#!/usr/bin/env bash
# The main job of megatron_puffin on one small machine (CPU, 2 processes): the four Puffin training stages of the
# tiny configuration (examples/tiny/*.args), each handed to the next, with torchrun.
#
#   1. render a synthetic Puffin-4M dataset with known cameras (+ a SentencePiece tokenizer trained on it)
#   2. preprocess it into indexed shards
#   3. make the LLM's base checkpoint: a tiny Hugging Face Qwen2 converted to a TP=2 megatron-core checkpoint
#   4. stage 1 alignment   DP=2                       (LLM from the converted checkpoint, other towers random)
#   5. stage 2 SFT         TP=2                       (from stage 1)
#   6. stage 3 thinking    PP=2                       (from stage 2)
#   7. stage 4 instruction DP=2, distributed optimizer (from stage 2, as in the reference)
#   8. loss plots per stage, and a full-scale configuration check (stage 2 on 64 GPUs, --dry-run)
#   9. camera evaluation of the stage 2 and stage 3 checkpoints on the held-out split (errors, AUC table, plot)
#  10. generation: a contact sheet for 4 cameras (stage 2) and one world-exploration view (stage 4)
# Every stage also validates on the held-out split (losses; camera errors in stages 1-2).
# Outputs go to runs/quickstart/ (override with QUICKSTART_DIR).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source "$ROOT/examples/bootstrap_env.sh"
OUT="${QUICKSTART_DIR:-$ROOT/runs/quickstart}"
rm -rf "$OUT/tiny"
mkdir -p "$OUT/tiny" "$OUT/logs" "$OUT/plots"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
# torchrun through megatron_puffin.launch: a failed stage ends with its rank's exit status and one line
TORCHRUN=(python -m megatron_puffin.launch --standalone --nproc-per-node 2)
TINY=(@"$ROOT/examples/tiny/model.args")

echo "== 1/10 synthetic Puffin-4M dataset (+ a held-out split) -> $OUT/tiny/raw"
python tools/make_synthetic_dataset.py --output "$OUT/tiny/raw" --num-samples 64 --num-heldout 16 --image-size 96 \
    --seed 0 --tokenizer-out "$OUT/tiny/tokenizer.model" --workers 2
cp "$ROOT/examples/tiny/vae_config.json" "$OUT/tiny/vae_config.json"

echo "== 2/10 preprocessing into indexed shards -> $OUT/tiny/data"
python tools/preprocess_data.py --input "$OUT/tiny/raw" --output-prefix "$OUT/tiny/data" --workers 2 --no-progress
python tools/preprocess_data.py --input "$OUT/tiny/raw/heldout" --output-prefix "$OUT/tiny/heldout" --workers 2 \
    --no-progress  # the held-out split: validation during training and the camera evaluation
python tools/check_data.py --data "$OUT/tiny/data" "$OUT/tiny/heldout" --workers 2 --no-progress  # every sample
    # read as training reads it (per-sample checksums, images decoded): one line per damaged one, exit 1 if any

echo "== 3/10 base LLM: Hugging Face Qwen2 (tiny, random) -> TP=2 megatron-core checkpoint"
python - "$OUT/tiny/qwen_hf" <<'PY'
import sys, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
torch.manual_seed(0)
config = Qwen2Config(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                     num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048, rope_theta=1e6,
                     rms_norm_eps=1e-6, tie_word_embeddings=True)
Qwen2ForCausalLM(config).save_pretrained(sys.argv[1], safe_serialization=True)
PY
"${TORCHRUN[@]}" tools/convert_checkpoint.py hf-to-mcore --hf-dir "$OUT/tiny/qwen_hf" \
    --output "$OUT/tiny/qwen_tp2" --tensor-model-parallel-size 2 2>&1 | tail -n 2

cd "$OUT"  # the tiny flag files name tiny/... relative to the working directory
stage() {  # stage NAME LAYOUT-FLAGS...
    local name="$1"; shift
    echo "== $name ($*); log: $OUT/logs/$name.log"
    if ! "${TORCHRUN[@]}" "$ROOT/pretrain_puffin.py" "${TINY[@]}" @"$ROOT/examples/tiny/$name.args" "$@" \
            > "$OUT/logs/$name.log" 2>&1; then
        tail -n 40 "$OUT/logs/$name.log" >&2
        echo "stage $name failed; full log: $OUT/logs/$name.log" >&2
        exit 1
    fi
    grep -E "weights of|iter [0-9]+/|validation iter|saved tiny|finished" "$OUT/logs/$name.log" | sed -E 's/^[0-9-]+ [0-9:,]+ //'
}
stage stage1_alignment --llm-checkpoint tiny/qwen_tp2
stage stage2_sft --tensor-model-parallel-size 2
stage stage3_thinking --pipeline-model-parallel-size 2
stage stage4_instruction --use-distributed-optimizer
cd "$ROOT"

echo "== 8/10 loss plots and a full-scale configuration check"
for name in stage1_alignment stage2_sft stage3_thinking stage4_instruction; do
    python tools/plot_metrics.py --tensorboard-dir "$OUT/tiny/tensorboard/$name" --output "$OUT/plots/$name.png"
done
python pretrain_puffin.py --dry-run @examples/stages/stage2_sft.args --world-size 64

python - "$OUT/tiny/metrics" <<'PY'
import json, pathlib, sys
print("\nper-task losses, training (first logged interval -> last) and held-out validation (first -> last):")
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.jsonl")):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for kind, prefix in (("train", "loss/"), ("valid", "valid_loss/")):
        rows = [r for r in records if any(k.startswith(prefix) for k in r)]
        if not rows:
            continue
        first, last = rows[0], rows[-1]
        losses = ", ".join(f"{k[len(prefix):]} {first[k]:.3f} -> {last[k]:.3f}" for k in sorted(last)
                           if k.startswith(prefix))
        print(f"  {path.stem:<20} {kind} iter {last['iteration']:>3}: {losses}")
PY

cd "$OUT"
echo
echo "== 9/10 camera evaluation of the stage 2 and stage 3 checkpoints on the held-out split -> $OUT/eval"
for name in stage2_sft stage3_thinking; do
    mode=(--max-new-tokens 96); [ "$name" = stage3_thinking ] && mode=(--thinking --max-new-tokens 256)
    python "$ROOT/tools/understand.py" --checkpoint "tiny/checkpoints/$name" --images tiny/raw/heldout/local_folder/000000 \
        --output "eval/$name/predictions.json" --overwrite --no-progress "${mode[@]}"  # a re-run replaces its own
    python "$ROOT/tools/evaluate_camera.py" --predictions "eval/$name/predictions.json" \
        --ground-truth tiny/raw/heldout/cameras.csv --output-dir "eval/$name" \
        --title "$name on the 16 held-out images" | grep -v "^wrote"
done

echo "== 10/10 generation: 4 cameras (stage 2, cameras re-estimated by the model) and one world-exploration view (stage 4)"
python "$ROOT/tools/generate.py" --checkpoint tiny/checkpoints/stage2_sft --output-dir generated/cameras \
    --prompts "$ROOT/examples/tiny/generation_requests.json" --evaluate-cameras --max-new-tokens 96 --steps 30 \
    --overwrite --no-progress | tail -n 7  # 30 Euler steps to keep the quickstart short (Puffin: 50)
python "$ROOT/tools/generate.py" --checkpoint tiny/checkpoints/stage4_instruction --output-dir generated/world_exploration \
    --init-image tiny/raw/heldout/cross_view/local_folder_init/000000/00000000.jpg \
    --caption "" --roll 0.0 --pitch 0.0 --yaw 0.7854 --steps 30 --overwrite --no-progress | tail -n 1
cd "$ROOT"

echo
echo "quickstart finished. The tiny model trains for minutes on a CPU: its images and camera estimates are poor (most"
echo "answers may hold no camera and score as the fallback); the numbers are measured on the real paths, not quality."
echo "  checkpoints: $OUT/tiny/checkpoints/<stage>/iter_*   (resume: --load DIR; next stage: --pretrained-checkpoint DIR)"
echo "  logs:        $OUT/logs/<stage>.log   TensorBoard: $OUT/tiny/tensorboard   metrics: $OUT/tiny/metrics"
echo "  loss plots:  $OUT/plots/<stage>.png"
echo "  camera eval: $OUT/eval/<stage>/metrics.json, errors.csv, errors.png   (predictions.json from tools/understand.py)"
echo "  generated:   $OUT/generated/cameras/contact_sheet.png (+ camera_faithfulness/), $OUT/generated/world_exploration/"
