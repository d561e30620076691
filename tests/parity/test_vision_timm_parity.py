"""The RADIO ViT body against timm's ``VisionTransformer`` (the backbone RADIO wraps) at a tiny config.

timm is configured as C-RADIO's backbone after CPE: class token + register tokens prepended *after* the position
embedding (``no_embed_class``), position grid = the CPE grid (at the full grid CPE uses it unchanged), patch
embedding without bias (RADIO's ``ViTPatchLinear``), no final norm (C-RADIOv3-H's ``model.norm`` is Identity).
Its weights are renamed to the published RADIO names (``model.blocks.{i}.attn.qkv``, ``patch_generator.*``) and
reach our tower through :func:`megatron_puffin.convert.radio.radio_to_mcore`, so the test also checks the
converter against a real timm model. Patch features (class/register tokens stripped) and every parameter
gradient are compared in fp32 on the CPU, and on CUDA when present (TF32 off).

timm needs torchvision, which has no CPU build on PyPI: ``torchvision==0.28.0`` installs beside this project's CPU
torch 2.13 without replacing it, but its import then fails (``operator torchvision::nms does not exist``: its compiled
operators need a CUDA torch). The test skips when ``import timm`` fails and runs on a machine that has timm (the GPU
image).
"""
import pytest
import torch
from torch import nn

try:
    import timm  # noqa: F401
    from timm.models.vision_transformer import VisionTransformer
except Exception as exc:  # noqa: BLE001 - ImportError, or torchvision/torch mismatch errors at import
    pytest.skip(
        f"timm is not importable ({type(exc).__name__}: {exc}); it needs torchvision, which has no CPU build in "
        "this environment. Run this test where timm is installed (e.g. the GPU machine's image).",
        allow_module_level=True,
    )

import megatron_puffin.distributed as dist_utils  # noqa: E402
from megatron_puffin.convert.radio import load_vision_state_dict, mcore_to_radio, radio_to_mcore  # noqa: E402
from megatron_puffin.models.vision import VisionConfig, build_vision  # noqa: E402

REL_TOLERANCE = 1e-5
LLM_HIDDEN = 24
CONFIG = VisionConfig(patch_size=4, hidden_size=48, num_layers=3, num_attention_heads=4, ffn_hidden_size=96,
                      max_image_size=32, class_token_len=4)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _timm_backbone() -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=CONFIG.max_image_size, patch_size=CONFIG.patch_size, in_chans=3, num_classes=0, global_pool="",
        embed_dim=CONFIG.hidden_size, depth=CONFIG.num_layers, num_heads=CONFIG.num_attention_heads,
        mlp_ratio=CONFIG.ffn_hidden_size / CONFIG.hidden_size, qkv_bias=True, class_token=True,
        reg_tokens=CONFIG.class_token_len - 1, no_embed_class=True,
    )
    model.norm = nn.Identity()
    with torch.no_grad():
        model.patch_embed.proj.bias.zero_()
        model.patch_embed.proj.bias.requires_grad_(False)
        for name, param in model.named_parameters():  # timm's init leaves biases 0 and norms 1/0: perturb
            if param.requires_grad and (name.endswith("bias") or ".norm" in name):
                param.add_(torch.randn_like(param) * 0.1)
        model.cls_token.normal_()
        model.reg_token.normal_()
    return model.eval()


def _radio_names(timm_state: dict) -> dict:
    """timm's parameters under the published RADIO names (RADIO's ViT is timm's with a CPE patch generator)."""
    radio = {f"model.{name}": tensor for name, tensor in timm_state.items() if name.startswith("blocks.")}
    radio["model.patch_generator.embedder.weight"] = timm_state["patch_embed.proj.weight"].flatten(1)
    radio["model.patch_generator.pos_embed"] = timm_state["pos_embed"]
    radio["model.patch_generator.cls_token.token"] = torch.cat([timm_state["cls_token"][0], timm_state["reg_token"][0]])
    radio["input_conditioner.norm_mean"] = torch.zeros(3, 1, 1)
    radio["input_conditioner.norm_std"] = torch.ones(3, 1, 1)
    return radio


@pytest.fixture(scope="module", autouse=True)
def single_process():
    dist_utils.initialize(seed=0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    dist_utils.destroy()


def _max_rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max()).item()


@pytest.mark.parametrize("device", DEVICES)
def test_radio_encoder_matches_timm_vision_transformer(device):
    reference = _timm_backbone().to(device)
    model = build_vision(CONFIG, LLM_HIDDEN, device=device, pg_collection=dist_utils.process_groups()).eval()
    load_vision_state_dict(model, {**radio_to_mcore(_radio_names(reference.state_dict()), CONFIG),
                                   **{k: v for k, v in model.state_dict().items() if k.startswith("projector.")}})
    pixels = torch.randn(2, 3, CONFIG.max_image_size, CONFIG.max_image_size,
                         generator=torch.Generator().manual_seed(1)).to(device)
    expected = reference.forward_features(pixels)[:, CONFIG.class_token_len:]
    ours = model.encoder(pixels)
    forward_error = _max_rel(ours, expected)
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2)).to(device)
    (expected * weights).sum().backward()
    (ours * weights).sum().backward()
    grads = {name: param.grad for name, param in model.named_parameters() if name.startswith("encoder.")}
    buffers = {name: buf for name, buf in model.state_dict().items() if name.startswith("input_conditioner.")}
    mapped = mcore_to_radio({**grads, **buffers}, CONFIG, prefix="")
    expected_grads = _radio_names({name: p.grad for name, p in reference.named_parameters() if p.grad is not None})
    grad_errors = {name: _max_rel(mapped[name], grad) for name, grad in expected_grads.items()
                   if not name.startswith("input_conditioner.")}
    worst = max(grad_errors, key=grad_errors.get)
    print(f"[timm parity {device}] forward max rel error {forward_error:.3e}; "
          f"gradient max rel error {grad_errors[worst]:.3e} ({worst})")
    assert forward_error < REL_TOLERANCE
    assert grad_errors[worst] < REL_TOLERANCE, worst
