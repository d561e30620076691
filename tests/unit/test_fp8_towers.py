"""FP8 per tower: flags and validation, each tower's precision in the dry run, token counts padded for FP8 GEMMs.

(FP8 itself needs Transformer Engine on a GPU: tests/gpu.)"""
import pytest
import torch

import megatron_puffin.distributed as mpd
from megatron_puffin.config import parse_args
from megatron_puffin.models.fp8 import (
    FP8_TOWERS,
    fp8_token_multiple,
    fp8_tower_problems,
    round_up,
    tower_fp8,
    tower_precisions,
)

STAGE = "@examples/stages/stage2_sft.args"


def test_token_multiples_and_rounding():
    assert fp8_token_multiple("delayed") == fp8_token_multiple("tensorwise") == 16
    assert fp8_token_multiple("mxfp8") == 32
    assert [round_up(n, 16) for n in (1, 16, 17, 330)] == [16, 16, 32, 336]
    assert round_up(17, 1) == 17


def test_each_tower_gets_its_own_fp8_setting():
    assert tower_fp8("hybrid", FP8_TOWERS, "dit") == "hybrid"
    assert tower_fp8("hybrid", ["llm"], "dit") is None and tower_fp8(None, FP8_TOWERS, "llm") is None
    text = tower_precisions("bf16", "hybrid", "delayed", ["llm", "dit"], {"dit": True})
    assert text == {"llm": "FP8 hybrid (delayed) GEMMs, bf16 elsewhere", "vision": "bf16", "connector": "bf16",
                    "dit": "FP8 hybrid (delayed) GEMMs, bf16 elsewhere, frozen layers (forward only)"}
    with pytest.raises(ValueError, match="unknown tower"):
        tower_fp8("hybrid", FP8_TOWERS, "vae")


def test_mxfp8_is_refused_before_blackwell_and_towers_are_checked():
    assert fp8_tower_problems("hybrid", "mxfp8", FP8_TOWERS, (10, 0)) == []
    (problem,) = fp8_tower_problems("hybrid", "mxfp8", FP8_TOWERS, (9, 0))
    assert "--fp8-recipe mxfp8 needs a Blackwell GPU" in problem and "this one is 9.0" in problem
    assert fp8_tower_problems("hybrid", "delayed", FP8_TOWERS, (9, 0)) == []
    (problem,) = fp8_tower_problems(None, "delayed", ["llm", "vae"], None)
    assert problem.startswith("--fp8-tower (vae) must be among llm, vision, connector, dit")


def test_flags_default_to_every_tower_and_bad_towers_fail_validation():
    args = parse_args([STAGE], validate=False)
    assert args.precision.fp8_tower == list(FP8_TOWERS)
    args = parse_args([STAGE, "--fp8-tower", "llm", "--fp8-tower", "dit"], validate=False)
    assert args.precision.fp8_tower == ["llm", "dit"]
    with pytest.raises(ValueError, match=r"--fp8-tower \(vea\)"):
        parse_args([STAGE, "--fp8-tower", "vea"])


def test_dry_run_reports_precision_per_tower():
    from megatron_puffin.training.layout import _precision_lines

    args = parse_args([STAGE, "--fp8-format", "hybrid", "--fp8-tower", "llm"], validate=False)
    lines = _precision_lines(args, "bf16")
    assert "  llm: FP8 hybrid (delayed) GEMMs, bf16 elsewhere" in lines
    assert "  dit: bf16" in lines and "  vae: bf16, frozen (never FP8)" in lines


@pytest.fixture()
def single_process():
    mpd.initialize(seed=0)
    yield
    mpd.destroy()


def test_llm_sequence_padded_for_fp8_leaves_every_real_token_unchanged(single_process):
    """More pads at the end (to a multiple of 16) change nothing a real token computes (fp32, local spec)."""
    from helpers.llm import left_padded_batch, tiny_llm_config
    from megatron_puffin.models.llm import RightPadding, build_llm, pad_sequences_to_multiple

    config = tiny_llm_config(num_layers=2)
    torch.manual_seed(0)
    model = build_llm(config, pg_collection=mpd.process_groups()).eval()
    input_ids, mask, position_ids, labels = left_padded_batch(config.vocab_size, [11, 7, 3], 11)
    batch = RightPadding.from_left_padded(mask).apply_to_batch(
        {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels})
    padded = pad_sequences_to_multiple(batch, 16)
    assert padded["input_ids"].shape == (3, 16) and not padded["attention_mask"][:, 11:].any()
    assert (padded["labels"][:, 11:] == -100).all()
    assert torch.equal(padded["position_ids"][0, 10:13], torch.tensor([10, 11, 12]))
    assert pad_sequences_to_multiple(padded, 16) is padded
    with torch.no_grad():
        short = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).transpose(0, 1)
        long = model(input_ids=padded["input_ids"], position_ids=padded["position_ids"]).transpose(0, 1)
    real = batch["attention_mask"]
    torch.testing.assert_close(long[:, :11][real], short[real], rtol=1e-6, atol=1e-6)


def test_dit_stream_padded_for_fp8_predicts_the_same_velocities(single_process):
    """The MMDiT image stream rounded up to 16 tokens (key-padded at the end) predicts what the unpadded one does,
    mixed sizes and a uniform batch (which then gets a mask), fp32 local spec within 1e-6."""
    from megatron_puffin.models.dit import DiTConfig, build_dit
    from megatron_puffin.models.dit.image_stream import build_layout

    torch.manual_seed(0)
    dit = build_dit(DiTConfig(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                              caption_projection_dim=16, pooled_projection_dim=12, pos_embed_max_size=24),
                    pg_collection=mpd.process_groups()).eval()
    gen = torch.Generator().manual_seed(1)
    context = dit.context_embedder(torch.randn(3, 5, 24, generator=gen)).transpose(0, 1)
    temb = dit.time_text_embed(torch.rand(3, generator=gen) * 1000, torch.randn(3, 12, generator=gen))
    mixed = [torch.randn(4, h, w, generator=gen) for h, w in [(8, 6), (4, 8), (8, 8)]]
    uniform = torch.randn(3, 4, 6, 6, generator=gen)
    for targets in (mixed, uniform):
        outputs = []
        for multiple in (1, 16):
            layout = build_layout(targets, None, 2, multiple)
            stream = dit.embed_image_stream(targets, None, layout)
            assert stream.shape[0] == layout.max_len and layout.max_len % multiple == 0
            with torch.no_grad():
                hidden = dit.run_blocks(stream, context, temb, layout.key_padding_mask(5, stream.device))
                outputs.append(dit.predict_targets(hidden, temb, layout))
        for plain, padded in zip(outputs[0], outputs[1]):
            torch.testing.assert_close(padded, plain, rtol=1e-6, atol=1e-6)


def test_fp8_vision_tower_refuses_token_counts_fp8_gemms_cannot_take(single_process):
    """The ViT's tokens are not padded yet: a clear error names the fix instead of Transformer Engine's assertion."""
    from megatron_puffin.models.vision import VisionConfig, build_vision

    tower = build_vision(VisionConfig(hidden_size=16, num_layers=1, num_attention_heads=2, ffn_hidden_size=32,
                                      max_image_size=96, class_token_len=2), 48, pg_collection=mpd.process_groups())
    tower.config.fp8 = "hybrid"  # what an FP8 vision tower's TransformerConfig holds (FP8 itself needs a GPU)
    tower._check_images(torch.zeros(16, 3, 96, 96))  # 16 x (2 + 36) ViT rows, 16 x 9 projector rows
    with pytest.raises(ValueError, match=r"1 image\(s\) of 96x96 give 38 ViT rows, not a multiple of 16"):
        tower._check_images(torch.zeros(1, 3, 96, 96))
    with pytest.raises(ValueError, match=r"give 72 projector rows"):
        tower._check_images(torch.zeros(8, 3, 96, 96))
