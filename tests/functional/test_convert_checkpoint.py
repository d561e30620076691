"""tools/convert_checkpoint.py end to end: HF -> distributed checkpoint written at TP=2 by torchrun -> HF,
loadable by transformers and bit-identical to the original."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from helpers.llm import hf_qwen2, tiny_llm_config

ROOT = Path(__file__).resolve().parents[2]
TOOL = str(ROOT / "tools" / "convert_checkpoint.py")


def _run(cmd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return result


def test_hf_round_trip_through_a_tp2_distributed_checkpoint(tmp_path):
    from transformers import Qwen2ForCausalLM

    config = tiny_llm_config(tied=True, num_attention_heads=12, num_query_groups=2, kv_channels=8)
    original = hf_qwen2(config, seed=4)
    original.save_pretrained(tmp_path / "hf_in", safe_serialization=True)

    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          TOOL, "hf-to-mcore", "--hf-dir", str(tmp_path / "hf_in"), "--output", str(tmp_path / "ckpt"),
          "--tensor-model-parallel-size", "2"])
    assert (tmp_path / "ckpt" / "puffin_meta.json").exists() and not (tmp_path / "ckpt.tmp").exists()
    _run([sys.executable, TOOL, "mcore-to-hf", "--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf_out")])

    restored = Qwen2ForCausalLM.from_pretrained(
        tmp_path / "hf_out", torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    original_state, restored_state = original.state_dict(), restored.state_dict()
    assert sorted(original_state) == sorted(restored_state)
    for name, tensor in original_state.items():
        assert torch.equal(restored_state[name], tensor), name
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(restored(ids).logits, original(ids).logits, rtol=0, atol=0)
