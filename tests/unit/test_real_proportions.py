"""The real-proportion benchmark's scaling rule (``benchmarks/real_proportions.py``): attention width / 8 taken as
heads / 4 x head dim / 2, so the FLOP shares are those of width / 8 while head sizes stay realistic."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import real_proportions as rp  # noqa: E402

TOWERS = {"llm": 128, "vision": 80, "connector": 64}
"""Full-size head dims of the towers whose head dim is hidden / heads (the MMDiT states its own)."""


def test_heads_quartered_head_dims_halved_width_divided_by_eight():
    full, scaled = rp.FULL_SIZES, rp.scaled_sizes()
    for tower, full_head_dim in TOWERS.items():
        heads, hidden = scaled[f"{tower}_heads"], scaled[f"{tower}_hidden"]
        assert full[f"{tower}_hidden"] // full[f"{tower}_heads"] == full_head_dim
        assert heads == full[f"{tower}_heads"] // 4 and hidden == full[f"{tower}_hidden"] // 8
        assert heads * (full_head_dim // 2) == hidden, tower
    assert scaled["dit_heads"] * scaled["dit_head_dim"] == full["dit_heads"] * full["dit_head_dim"] // 8
    assert scaled["dit_head_dim"] == full["dit_head_dim"] // 2
    assert scaled["llm_kv_heads"] == 1 and scaled["llm_heads"] % scaled["llm_kv_heads"] == 0
    assert "LLM 3 x 64, RADIO 4 x 40, connectors 4 x 32, MMDiT 6 x 32" in rp.describe()


def test_full_size_keeps_the_released_widths_and_divides_depth_only():
    halved = rp.full_sizes(2)
    assert [halved[f"{tower}_layers"] for tower in ("llm", "vision", "connector", "dit")] == [14, 16, 3, 12]
    assert {k: v for k, v in halved.items() if not k.endswith("_layers")} == \
        {k: v for k, v in rp.FULL_SIZES.items() if not k.endswith("_layers")}
    assert rp.full_sizes(1) == rp.FULL_SIZES and rp.full_sizes(100)["connector_layers"] == 1
    assert "depth / 2: 14 / 16 / 3 / 12 layers" in rp.describe_full(2)


def test_host_bound_keeps_the_full_size_layers_at_tiny_widths():
    """--host-bound measures the host cost of the operators --full-size issues: same depths, queries and VAE levels;
    every width small enough that no kernel matters (attention heads still divide their widths)."""
    full, tiny = rp.full_sizes(2), rp.host_bound_sizes(2)
    layers = [key for key in full if key.endswith("_layers")] + ["vae_layers_per_block"]
    assert {key: tiny[key] for key in layers} == {key: full[key] for key in layers}
    assert len(tiny["vae_blocks"]) == len(full["vae_blocks"]) and max(tiny["vae_blocks"]) <= 32
    for tower in ("llm", "vision", "connector"):
        assert tiny[f"{tower}_hidden"] <= 32 and tiny[f"{tower}_hidden"] % tiny[f"{tower}_heads"] == 0, tower
    assert tiny["dit_heads"] * tiny["dit_head_dim"] <= 32 and tiny["llm_vocab"] is None
    assert "14 / 16 / 3 / 12 layers" in rp.describe_host_bound(2)
