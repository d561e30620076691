"""Our vision tower against a plain-PyTorch reading of the reference (docs/puffin.md §1.3-1.4): RADIO's CPE patch generator
(Im2Patches + linear embedder, eval-mode position grid resized to max(h, w)^2 and cropped, class/register tokens),
timm ViT blocks with the fused [q; k; v] projection, the [-1, 1] -> CLIP input conditioning, the 2x2 fold written
as an index gather, the gradient scale as a hook and the ``projector.{0,2}`` MLP. The reference's parameters carry
Puffin's checkpoint names (``visual_encoder.radio_model.*``, ``projector.*``) and reach our tower through the
converter. Forward outputs and every parameter gradient are compared in fp32."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import megatron_puffin.distributed as dist_utils
from megatron_puffin.convert.radio import (
    load_vision_state_dict,
    mcore_to_projector,
    mcore_to_radio,
    projector_to_mcore,
    radio_to_mcore,
)
from megatron_puffin.models.vision import CLIP_MEAN, CLIP_STD, VisionConfig, build_vision

REL_TOLERANCE = 1e-5
CONFIG = VisionConfig(patch_size=4, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                      max_image_size=32, class_token_len=3, vision_grad_scale=0.1)
LLM_HIDDEN = 24


class RefAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        weights = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), RefAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), RefMlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefClsToken(nn.Module):
    def __init__(self, tokens, dim):
        super().__init__()
        self.token = nn.Parameter(torch.randn(tokens, dim) * dim ** -0.5)


class RefPatchGenerator(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.patch, self.grid = config.patch_size, config.max_grid_size
        dim = config.hidden_size
        self.embedder = nn.Linear(3 * self.patch ** 2, dim, bias=False)
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid ** 2, dim) * dim ** -0.5)
        self.cls_token = RefClsToken(config.class_token_len, dim)

    def position(self, rows, cols):
        """CPE in eval mode: bilinear resize (align_corners) to max(rows, cols)^2, top-left crop."""
        pos = self.pos_embed.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        if (rows, cols) != (self.grid, self.grid):
            side = max(rows, cols)
            pos = F.interpolate(pos, size=(side, side), mode="bilinear", align_corners=True)[:, :, :rows, :cols]
        return pos.flatten(2).transpose(1, 2)

    def forward(self, x):
        patches = F.unfold(x, kernel_size=self.patch, stride=self.patch).transpose(1, 2)  # (c, y, x) order
        tokens = self.embedder(patches) + self.position(x.shape[2] // self.patch, x.shape[3] // self.patch)
        return torch.cat([self.cls_token.token.expand(x.shape[0], -1, -1), tokens], dim=1)


class RefViT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.patch_generator = RefPatchGenerator(config)
        self.blocks = nn.ModuleList(RefBlock(config.hidden_size, config.num_attention_heads, config.ffn_hidden_size)
                                    for _ in range(config.num_layers))

    def forward(self, x):
        x = self.patch_generator(x)
        for block in self.blocks:
            x = block(x)
        return x


class RefRADIO(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_conditioner = nn.Module()
        self.input_conditioner.register_buffer("norm_mean", torch.tensor(CLIP_MEAN).view(3, 1, 1))
        self.input_conditioner.register_buffer("norm_std", torch.tensor(CLIP_STD).view(3, 1, 1))
        self.model = RefViT(config)
        self.skip = config.class_token_len

    def forward(self, x01):
        x = (x01 - self.input_conditioner.norm_mean) / self.input_conditioner.norm_std
        return self.model(x)[:, self.skip:]


class RefVisualEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.radio_model = RefRADIO(config)


class RefPuffinVision(nn.Module):
    """``extract_visual_features`` + fold + gradient scale + projector of the reference."""

    def __init__(self, config, llm_hidden):
        super().__init__()
        self.config = config
        self.visual_encoder = RefVisualEncoder(config)
        folded = 4 * config.hidden_size
        self.projector = nn.Sequential(nn.Linear(folded, llm_hidden), nn.SiLU(), nn.Linear(llm_hidden, llm_hidden))

    def forward(self, images):
        features = self.visual_encoder.radio_model((images + 1) / 2)
        rows, cols = images.shape[2] // self.config.patch_size, images.shape[3] // self.config.patch_size
        index = torch.tensor([[(2 * i + p) * cols + 2 * j + q for p in range(2) for q in range(2)]
                              for i in range(rows // 2) for j in range(cols // 2)])
        folded = features[:, index].flatten(2)  # [b, n, 4, c] -> [b, n, 4c]
        if folded.requires_grad:
            folded.register_hook(lambda grad: grad * self.config.vision_grad_scale)
        return self.projector(folded)


@pytest.fixture(scope="module")
def towers():
    dist_utils.initialize(seed=0)
    torch.manual_seed(123)
    reference = RefPuffinVision(CONFIG, LLM_HIDDEN)
    with torch.no_grad():
        reference.visual_encoder.radio_model.input_conditioner.norm_std.mul_(1.5)  # not just the defaults
        for block in reference.visual_encoder.radio_model.model.blocks:
            for norm in (block.norm1, block.norm2):
                norm.weight.normal_(1.0, 0.1)
                norm.bias.normal_(0.0, 0.1)
    state = reference.state_dict()
    radio = {k: v for k, v in state.items() if k.startswith("visual_encoder.")}
    ours = radio_to_mcore(radio, CONFIG, prefix="visual_encoder.radio_model.")
    ours.update(projector_to_mcore({k: v for k, v in state.items() if k.startswith("projector.")}, CONFIG, LLM_HIDDEN))
    model = build_vision(CONFIG, LLM_HIDDEN, pg_collection=dist_utils.process_groups())
    load_vision_state_dict(model, ours)
    yield reference.eval(), model.eval()
    dist_utils.destroy()


def _max_rel(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.mark.parametrize("size", [(32, 32), (16, 24), (24, 8)], ids=["full-grid", "landscape", "portrait"])
def test_forward_and_gradients_match_the_reference(towers, size):
    reference, model = towers
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(size[0] + size[1])) * 2 - 1
    reference.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    expected, ours = reference(images), model(images)
    assert _max_rel(ours, expected) < REL_TOLERANCE, _max_rel(ours, expected)
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(9))
    (expected * weights).sum().backward()
    (ours * weights).sum().backward()
    our_grads = {name: param.grad for name, param in model.named_parameters()}
    buffers = {name: buffer for name, buffer in model.state_dict().items() if name.startswith("input_conditioner.")}
    mapped = mcore_to_radio({**our_grads, **buffers}, CONFIG, prefix="visual_encoder.radio_model.")
    mapped.update(mcore_to_projector(our_grads, CONFIG, LLM_HIDDEN))
    for name, param in reference.named_parameters():
        assert _max_rel(mapped[name], param.grad) < REL_TOLERANCE, (name, _max_rel(mapped[name], param.grad))
