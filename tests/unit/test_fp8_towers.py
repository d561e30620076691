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


def test_vision_rows_are_padded_to_the_fp8_multiple_only_when_needed():
    from megatron_puffin.models.vision.token_padding import pad_rows_to_multiple, pad_token_rows, padded_sequence_length

    # images x tokens: 3 x 26 -> 3 x 32; 8 x 26 = 208 and 16 x 1028 are multiples of 16 already; MXFP8: 32.
    assert [padded_sequence_length(26, b, 16) for b in (3, 8, 16, 1)] == [32, 26, 26, 32]
    assert padded_sequence_length(1028, 16, 16) == 1028 and padded_sequence_length(26, 8, 32) == 28
    assert padded_sequence_length(26, 3, 1) == 26
    tokens = torch.randn(3, 26, 4)
    padded, mask = pad_token_rows(tokens, 16)
    assert padded.shape == (3, 32, 4) and torch.equal(padded[:, :26], tokens) and not padded[:, 26:].any()
    assert mask.shape == (3, 1, 1, 32) and mask[..., 26:].all() and not mask[..., :26].any()
    unchanged, mask = pad_token_rows(tokens[:2, :24], 16)  # 2 x 24 rows: a multiple already, no mask
    assert unchanged.shape == (2, 24, 4) and mask is None
    assert pad_rows_to_multiple(torch.ones(18, 1, 5), 16).shape == (32, 1, 5)


def test_vision_tokens_padded_for_fp8_leave_outputs_and_gradients_unchanged(single_process):
    """ViT tokens (3 images x (2 class + 24 patches) = 78 rows -> 96) and projector rows (18 -> 32) padded to a
    multiple of 16, the pads key-masked at the end of each image's tokens: the outputs and every parameter's
    gradient equal the unpadded computation (fp32, local spec, train mode with the CPE's randomness, 1e-6)."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_puffin.models.vision import VisionConfig, build_vision

    torch.manual_seed(0)
    tower = build_vision(VisionConfig(hidden_size=16, num_layers=2, num_attention_heads=2, ffn_hidden_size=32,
                                      max_image_size=96, class_token_len=2, final_norm=True), 48,
                         pg_collection=mpd.process_groups()).train()
    assert tower.row_multiple == 1  # FP8 off: nothing padded
    images = torch.rand(3, 3, 64, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1
    weights = torch.randn(3, 6, 48, generator=torch.Generator().manual_seed(2))
    seen = []
    tower.encoder.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0].shape[0], kwargs["attention_mask"])), with_kwargs=True)
    core_attention = tower.encoder.decoder.layers[0].self_attention.core_attention
    core_attention.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["attn_mask_type"]), with_kwargs=True)
    results = []
    for multiple in (1, 16):
        tower.row_multiple = multiple  # what an FP8 vision tower sets (FP8 itself needs a GPU)
        tower.zero_grad()
        pixels = images.clone().requires_grad_()
        output = tower(pixels, generator=torch.Generator().manual_seed(3))
        (output * weights).sum().backward()
        grads = {name: param.grad.clone() for name, param in tower.named_parameters()}
        results.append((output.detach(), pixels.grad, grads))
    (output, pixel_grad, grads), (padded_output, padded_pixel_grad, padded_grads) = results
    torch.testing.assert_close(padded_output, output, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(padded_pixel_grad, pixel_grad, rtol=1e-6, atol=1e-6)
    assert grads.keys() == padded_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(padded_grads[name], grad, rtol=1e-6, atol=1e-6, msg=name)
    (plain_len, plain_mask), plain_type, (padded_len, padded_mask), padded_type = seen
    assert (plain_len, plain_mask, plain_type) == (26, None, AttnMaskType.no_mask)
    assert padded_len == 32 and padded_type == AttnMaskType.padding
    assert padded_mask.shape == (3, 1, 1, 32) and padded_mask[..., 26:].all() and not padded_mask[..., :26].any()


TINY_MODEL = "@examples/tiny/model.args"


def test_fp8_gemm_widths_and_query_rows_are_checked_before_any_work():
    """Real sizes fit FP8 GEMMs at every TP size; the tiny model's 4 queries (connector and MMDiT text-stream rows,
    not padded) and a width that is not a multiple are reported with the flag and the fix, in the one validation."""
    from megatron_puffin.config import ConfigError
    from megatron_puffin.config.validate_fp8 import fp8_shape_problems

    for tp in ("1", "2", "4", "8"):
        args = parse_args([STAGE, "--fp8-format", "hybrid", "--tensor-model-parallel-size", tp], validate=False)
        assert fp8_shape_problems(args, FP8_TOWERS) == [], tp
    tiny = parse_args([TINY_MODEL, "--fp8-format", "hybrid"], validate=False)
    assert fp8_shape_problems(tiny, ["llm", "vision"]) == []  # what tests/gpu trains in FP8
    (problem,) = fp8_shape_problems(tiny, FP8_TOWERS)
    assert problem == ("--connector-num-queries (4) must be a multiple of 16 when --fp8-tower includes connector and "
                       "dit (the query tokens are FP8 GEMM rows and are not padded); use 16, or leave connector and "
                       "dit out of --fp8-tower")
    (problem,) = fp8_shape_problems(parse_args([TINY_MODEL, "--fp8-format", "hybrid", "--connector-num-queries", "70"],
                                               validate=False), ["dit"])
    assert "(70) must be a multiple of 16 when --fp8-tower includes dit" in problem and "use 64 or 80" in problem
    odd = parse_args([TINY_MODEL, "--fp8-format", "hybrid", "--fp8-recipe", "mxfp8", "--vision-hidden-size", "24",
                      "--vision-num-attention-heads", "2"], validate=False)
    problems = fp8_shape_problems(odd, ["vision"])
    assert "--fp8-tower vision: --vision-hidden-size (24) is an FP8 GEMM input width and must be a multiple of 32; " \
           "change the width or leave vision out of --fp8-tower" in problems
    assert fp8_shape_problems(odd, ["llm"]) == [
        f"--fp8-tower llm: {flag} ({value}) is an FP8 GEMM input width and must be a multiple of 32; change the width "
        "or leave llm out of --fp8-tower" for flag, value in [
            ("--hidden-size", 48), ("--num-attention-heads x --kv-channels / --tensor-model-parallel-size", 48)]
    ] + ["--fp8-tower llm: (--num-attention-heads + 2 x --num-query-groups) x --kv-channels / "
         "--tensor-model-parallel-size (80) is an FP8 GEMM output width and must be a multiple of 32; change the width "
         "or leave llm out of --fp8-tower"]
    with pytest.raises(ConfigError, match=r"--connector-num-queries \(4\) must be a multiple of 16"):
        parse_args([TINY_MODEL, "--fp8-format", "hybrid"])
