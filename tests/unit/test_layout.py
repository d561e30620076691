"""The --dry-run's analytic parameter counts: equal to the real modules for every tower, config variant and pipeline
position (tensor-parallel split included), equal to the reference implementations at full size, and within the
sizes docs/puffin.md states; the memory estimate honours placement, freezing and the distributed optimizer."""
import dataclasses
import json

import pytest
import torch

import megatron_puffin.distributed as mpd
from helpers.puffin import TINY_VAE, make_tiny_dataset, tiny_puffin_config
from megatron_puffin.config import parse_args
from megatron_puffin.models.connector.config import ConnectorConfig
from megatron_puffin.models.dit.config import DiTConfig
from megatron_puffin.models.llm.config import LLMConfig
from megatron_puffin.models.puffin_config import PuffinModelConfig
from megatron_puffin.models.vision.config import VisionConfig
from megatron_puffin.training import layout
from megatron_puffin.training import parameter_counts as counts

from megatron_puffin.training.towers import TOWERS

# Module name prefix of the composed model -> tower of the dry run (the VAE is not a submodule).
TOWER_OF_PREFIX = {spec.module + ".": spec.label for spec in TOWERS if spec.module}
VARIANTS = {
    "reference-shapes": {},
    "untied-no-qkv-bias-padded-vocab-vit-extras": dict(
        llm=dict(tie_word_embeddings=False, add_qkv_bias=False, make_vocab_size_divisible_by=7),
        vision=dict(final_norm=True, feature_normalizer=True, class_token_len=0, fold_size=1),
    ),
    "frozen-deeper-connectors-single-block-dit": dict(
        connector=dict(num_layers=2, num_queries=3, pooled_projection_dim=12),
        dit=dict(num_layers=1, pooled_projection_dim=12, patch_size=1, sample_size=12),
        model=dict(freeze_llm=True, freeze_vision=True, freeze_dit=True),
    ),
}
PLACEMENTS = {"one-stage": (True, True), "first-stage": (True, False), "last-stage": (False, True)}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    paths = make_tiny_dataset(tmp_path_factory.mktemp("layout"), num_samples=4)
    mpd.initialize(seed=0)
    yield paths
    mpd.destroy()


def _variant_config(paths, variant):
    config = tiny_puffin_config(paths)
    changes = {name: dataclasses.replace(getattr(config, name), **fields) for name, fields in variant.items()}
    return dataclasses.replace(config, **changes)


def _module_counts(model):
    """tower -> {"split", "replicated", "requires_grad": set of flags} of the real module."""
    counts = {}
    for name, param in model.named_parameters():
        tower = next(t for prefix, t in TOWER_OF_PREFIX.items() if name.startswith(prefix))
        entry = counts.setdefault(tower, {"split": 0, "replicated": 0, "requires_grad": set()})
        entry["split" if getattr(param, "tensor_model_parallel", False) else "replicated"] += param.numel()
        entry["requires_grad"].add(param.requires_grad)
    return counts


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_analytic_tower_counts_equal_the_real_modules(paths, variant, placement):
    from megatron_puffin.models.puffin import build_puffin
    from megatron_puffin.training.towers import freeze_towers

    pre_process, post_process = PLACEMENTS[placement]
    config = _variant_config(paths, VARIANTS[variant])
    model = build_puffin(config, pre_process, post_process, pg_collection=mpd.process_groups())
    freeze_towers(model, config.model)
    real = _module_counts(model)
    towers = layout.build_towers(config.llm, config.vision, config.connector, config.dit, config.model)
    assert [t.name for t in towers] == ["LLM", "vision encoder", "vision projector", "query path", "MMDiT", "VAE"]
    for tower in towers[:-1]:
        entry = real.get(tower.name, {"split": 0, "replicated": 0, "requires_grad": set()})
        assert tower.rank_parameters(1, pre_process, post_process) == entry["split"] + entry["replicated"], tower.name
        if pre_process and post_process:
            assert tower.parameters == entry["split"] + entry["replicated"], tower.name
            split = sum(p.params.split for p in tower.parts if p.placement != counts.TIED_COPY)
            assert split == entry["split"], f"{tower.name}: tensor-parallel split"
            assert entry["requires_grad"] == {tower.trainable}, f"{tower.name}: trainable"
    vae = towers[-1]
    assert vae.trainable is False and vae.unknown is None
    if post_process:
        assert vae.parameters == sum(p.numel() for p in model.vae.parameters())


def test_tied_output_layer_is_a_last_stage_copy_not_a_new_parameter():
    tied, untied = LLMConfig(), LLMConfig(tie_word_embeddings=False)
    tower = counts.Tower("LLM", True, counts.llm_parts(tied))
    embedding = tied.vocab_size * tied.hidden_size
    assert tower.parameters == counts.llm_parameter_count(tied)
    assert counts.llm_parameter_count(untied) == tower.parameters + embedding
    # PP = 2: the first stage holds the embedding, the last one a copy of it as output layer.
    first = tower.rank_parameters(1, True, False, layer_shards=2)
    last = tower.rank_parameters(1, False, True, layer_shards=2)
    assert first + last == tower.parameters + embedding


def _meta_count(module_factory):
    with torch.device("meta"):
        module = module_factory()
    return sum(p.numel() for p in module.parameters())


SD3_MEDIUM_VAE = dict(  # stabilityai/stable-diffusion-3-medium-diffusers vae/config.json
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32,
    act_fn="silu", sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
    use_post_quant_conv=False, force_upcast=True,
)


def test_full_size_counts_equal_the_reference_implementations():
    """Qwen2.5-1.5B against transformers, SD3-medium's MMDiT and VAE against diffusers (on the meta device)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import Qwen2Config, Qwen2ForCausalLM

    llm, dit = LLMConfig(), DiTConfig()
    assert counts.llm_parameter_count(llm) == _meta_count(lambda: Qwen2ForCausalLM(Qwen2Config(**llm.to_hf())))
    mmdit = counts.Tower("MMDiT", True, counts.dit_parts(dit)).parameters
    assert mmdit == _meta_count(lambda: SD3Transformer2DModel.from_config(dit.to_diffusers()))
    assert counts.vae_parameter_count(SD3_MEDIUM_VAE) == _meta_count(lambda: AutoencoderKL.from_config(SD3_MEDIUM_VAE))
    tiny_vae = dict(TINY_VAE, mid_block_add_attention=False, use_quant_conv=False)
    assert counts.vae_parameter_count(tiny_vae) == _meta_count(lambda: AutoencoderKL.from_config(tiny_vae))


def test_full_size_counts_match_the_sizes_the_spec_states():
    towers = {t.name: t for t in layout.build_towers(LLMConfig(), VisionConfig(), ConnectorConfig(), DiTConfig(),
                                                     PuffinModelConfig())}
    # Qwen2.5-1.5B (tied): 1543.71 M; docs/puffin.md §1.11 "LLM 1.54 B".
    assert round(towers["LLM"].parameters / 1e6, 2) == 1543.71
    # SD3-medium MMDiT: 2.03 B; docs/puffin.md §1.11 "MMDiT ≈ 2 B".
    assert round(towers["MMDiT"].parameters / 1e9, 2) == 2.03 and round(towers["MMDiT"].parameters / 1e9) == 2
    # SD3 VAE: spec "≈ 84 M".
    assert round(counts.vae_parameter_count(SD3_MEDIUM_VAE) / 1e6) == 84
    # Connectors: "each ≈ 76 M (6 x 12.6 M)"; projector "≈ 10.2 M".
    layer = counts.encoder_layer_count(1024, 4096).total
    assert round(layer / 1e6, 1) == 12.6 and round(6 * layer / 1e6) == 76
    assert round(towers["vision projector"].parameters / 1e6, 1) == 10.2
    query_parts = {p.name: p.params.total for p in towers["query path"].parts}
    assert query_parts == {"meta queries": 64 * 1536, "connectors": 12 * layer,
                           "projections": 2 * (1536 * 1024 + 1024) + (1024 * 2048 + 2048) + (1024 * 4096 + 4096)}
    # RADIO-H: spec "≈ 0.6 B" is the ViT-H/16 trunk (patch embedder, 8 class/register tokens, 32 blocks, 0.63 B);
    # the tower also holds the CPE position grid of 128 x 128 x 1280 = 21.0 M (docs/puffin.md §1.3), 651.64 M in all.
    vision = towers["vision encoder"].parameters
    grid = 128 * 128 * 1280
    assert round((vision - grid) / 1e9, 1) == 0.6
    assert vision == 16 * 16 * 3 * 1280 + 8 * 1280 + grid + 32 * counts.encoder_layer_count(1280, 5120).total


DATA = ["--dry-run", "--task-stream", "image2text:/data/und:4", "--tokenizer", "/tokenizer"]


def test_memory_estimate_follows_placement_freezing_and_the_distributed_optimizer(tmp_path):
    vae_config = tmp_path / "vae.json"
    vae_config.write_text(json.dumps(SD3_MEDIUM_VAE))
    flags = DATA + ["--world-size", "32", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "4",
                    "--bf16", "--freeze-vision", "--vae-config", str(vae_config)]
    args = parse_args(flags)
    towers = {t.name: t for t in layout.towers(args)}
    assert towers["VAE"].parameters == counts.vae_parameter_count(SD3_MEDIUM_VAE)
    stages = layout.memory_estimate(args, list(towers.values()))
    assert len(stages) == 4
    # Every parameter sits on exactly one stage (the tied output copy adds one embedding on the last stage), split
    # parameters once per TP rank.
    embedding = towers["LLM"].parts[0].params
    total_split = sum(p.params.split for t in towers.values() for p in t.parts if p.placement != counts.TIED_COPY)
    total = sum(t.parameters for t in towers.values())
    per_rank_sum = sum(s.parameters for s in stages)
    assert per_rank_sum == total - total_split // 2 + embedding.split // 2
    assert stages[0].parameters - stages[0].trainable == towers["vision encoder"].rank_parameters(2, True, False, 4)
    assert stages[3].parameters - stages[3].trainable == towers["VAE"].parameters  # the frozen VAE, replicated
    for s in stages:
        assert s.weights == 2 * s.parameters and s.gradients == 4 * s.trainable and s.optimizer == 12 * s.trainable
    sharded = layout.memory_estimate(parse_args(flags + ["--use-distributed-optimizer"]), list(towers.values()))
    assert [s.optimizer for s in sharded] == [12 * s.trainable / 4 for s in stages]  # DP = 32 / (2 x 4)
    text = layout.describe(parse_args(flags + ["--use-distributed-optimizer"]))
    assert "world size 32 = TP 2 x PP 4 x DP 4" in text and "stages 1-2:" in text and "peak: stage" in text


def test_vae_size_is_unknown_without_a_readable_config(tmp_path):
    assert counts.vae_parts(PuffinModelConfig()) == ((), "no --vae-path or --vae-config")
    parts, unknown = counts.vae_parts(PuffinModelConfig(vae_path=str(tmp_path / "vae")))
    assert parts == () and "not readable" in unknown
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(TINY_VAE))
    parts, unknown = counts.vae_parts(PuffinModelConfig(vae_path=str(tmp_path / "vae")))
    assert unknown is None and sum(p.params.total for p in parts) == counts.vae_parameter_count(TINY_VAE)
