#!/usr/bin/env bash
# The main job of megatron_puffin on one small machine.
#
# TODAY (the training loop is issue 7) this runs the most end-to-end path that exists:
#   1. render a synthetic Puffin-4M dataset with known cameras (+ a SentencePiece tokenizer trained on it)
#   2. preprocess it into indexed shards
#   3. read one task micro-batch of each task stream through the loader
#   4. convert a tiny random Qwen2 from Hugging Face to a TP=2 megatron-core checkpoint (torchrun, 2 ranks) and back
#   5. validate a full-scale Puffin configuration on 64 GPUs with --dry-run
# Outputs go to runs/quickstart/ (override with QUICKSTART_DIR).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source "$ROOT/examples/bootstrap_env.sh"
OUT="${QUICKSTART_DIR:-$ROOT/runs/quickstart}"
mkdir -p "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"

echo "== 1/5 synthetic Puffin-4M dataset -> $OUT/raw"
python tools/make_synthetic_dataset.py --output "$OUT/raw" --num-samples 200 --image-size 128 --seed 0 \
    --tokenizer-out "$OUT/tokenizer.model"

echo "== 2/5 preprocessing into indexed shards -> $OUT/data"
python tools/preprocess_data.py --input "$OUT/raw" --output-prefix "$OUT/data" --workers 2 --no-progress

echo "== 3/5 one micro-batch per task"
python examples/inspect_batches.py --tokenizer "$OUT/tokenizer.model" \
    --task-stream image2text:"$OUT/data/main":4 \
    --task-stream image2text_thinking:"$OUT/data/main":4 \
    --task-stream text2text:"$OUT/data/main":4 \
    --task-stream cam2image:"$OUT/data/main":4 \
    --task-stream image2text_cross_view:"$OUT/data/cross_view":2 \
    --task-stream image2image:"$OUT/data/cross_view":2

echo "== 4/5 Qwen2 weights: HF -> TP=2 distributed checkpoint -> HF"
rm -rf "$OUT/qwen_hf" "$OUT/qwen_tp2" "$OUT/qwen_back"
python - "$OUT/qwen_hf" <<'PY'
import sys, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
torch.manual_seed(0)
config = Qwen2Config(hidden_size=96, intermediate_size=160, num_hidden_layers=4, num_attention_heads=12,
                     num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
Qwen2ForCausalLM(config).save_pretrained(sys.argv[1], safe_serialization=True)
PY
python -m torch.distributed.run --standalone --nproc-per-node 2 tools/convert_checkpoint.py hf-to-mcore \
    --hf-dir "$OUT/qwen_hf" --output "$OUT/qwen_tp2" --tensor-model-parallel-size 2
python tools/convert_checkpoint.py mcore-to-hf --input "$OUT/qwen_tp2" --output "$OUT/qwen_back"
python - "$OUT/qwen_hf" "$OUT/qwen_back" <<'PY'
import sys, torch
from transformers import Qwen2ForCausalLM
a = Qwen2ForCausalLM.from_pretrained(sys.argv[1]).state_dict()
b = Qwen2ForCausalLM.from_pretrained(sys.argv[2]).state_dict()
same = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
print(f"round trip through a TP=2 checkpoint bit-exact: {same}")
sys.exit(0 if same else 1)
PY

echo "== 5/5 full-scale configuration check (64 GPUs, TP=2, bf16), nothing started"
python pretrain_puffin.py --dry-run --world-size 64 --tensor-model-parallel-size 2 --bf16 \
    --use-distributed-optimizer --task-stream image2text:/data/puffin/main:16 \
    --task-stream cam2image:/data/puffin/main:16 --tokenizer /models/Qwen2.5-1.5B-Instruct

echo
echo "quickstart finished. Dataset: $OUT/data  tokenizer: $OUT/tokenizer.model  checkpoint: $OUT/qwen_tp2"
echo "NOTE: training (pretrain_puffin.py without --dry-run) is not built yet (issue 7)."
