"""The composed Puffin model assembled from the reference's modules and run the reference's way (docs/puffin.md §1-§2).

* LLM: ``transformers`` ``Qwen2ForCausalLM``; ``llm.model`` is called with ``inputs_embeds``, the 2-D key-padding
  ``attention_mask`` and ``position_ids`` of the left-padded batch (docs/puffin.md §8); understanding logits come from the
  tied head applied to the supervised positions only, loss = token-mean cross-entropy (§2.1 step 6).
* Placeholders: visual tokens are written into the embeddings at the -200 (understanding) or ``<|image_pad|>``
  (image2image) positions, the meta queries at the -400 positions, by boolean-index assignment.
* Vision: **our** vision tower (RADIO + fold + projector) in both models, because the reference's RADIO needs
  ``timm``, which this CPU environment does not have. It gets the same weights and the same train-mode CPE
  generator as ours, so it contributes identical numbers and time to both sides.
* Query path: the plain-PyTorch connectors of :mod:`megatron_puffin.testing.reference_connector`.
* VAE: ``diffusers`` ``AutoencoderKL``, encoding each target image, camera map and initial view **one sample at a
  time** with a posterior sample (§1.9, §9.1).
* MMDiT: ``diffusers`` ``SD3Transformer2DModel`` modules with per-latent patch embedding and the dense
  ``[B, 1, L, L]`` mask in every block (:mod:`megatron_puffin.testing.reference_dit`).
* Flow matching: diffusers' ``compute_density_for_timestep_sampling`` and ``FlowMatchEulerDiscreteScheduler``
  tables; sigmas looked up per sample with a host sync, as the SD3 training scripts' ``get_sigmas`` (§2.3, §9.1).

Randomness: the reference draws from the global RNG; here every draw (posterior noise, noise level, Gaussian noise,
CPE window) comes from a per-sample generator keyed exactly as our model keys it (seed, purpose, task, stream
position, dataset index), so both models see the same noise and their losses can be compared. Text dropout is
decided by the data pipeline, so both see the same prompts. Truncation is the data pipeline's too.
"""
from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron_puffin.data import templates
from megatron_puffin.tasks import GENERATION_TASKS
from megatron_puffin.distributed.random import make_generator
from megatron_puffin.testing.reference_connector import ReferenceQueryPath
from megatron_puffin.testing.reference_dit import reference_dynamic_forward

if TYPE_CHECKING:
    from megatron_puffin.models.puffin import PuffinConfig, PuffinModel


class ReferencePuffin(nn.Module):
    """Puffin from reference modules (see the module docstring); ``forward(batch)`` returns ``{"loss": ...}``.

    Args:
        config: the :class:`~megatron_puffin.models.puffin.PuffinConfig` our model was built from.
        vision: a vision tower of our class (stands in for RADIO + projector).
        vae: a diffusers ``AutoencoderKL`` (frozen; kept out of ``state_dict``), or None without generation.
        attn_implementation: the Qwen2 attention (``sdpa`` or ``eager``; the reference uses flash-attention 2,
            unavailable on CPU).
        device: where the LLM, query path and MMDiT are created and randomly initialised (default: torch's default
            device, normally the CPU). On a GPU pass it: the host initialises about 100 M parameters/s (20 s for
            the LLM + MMDiT at half the released depth, measured), then copies them over.
    """

    def __init__(self, config: "PuffinConfig", vision: nn.Module, vae: Optional[nn.Module],
                 attn_implementation: str = "sdpa", device: Optional[torch.device] = None) -> None:
        super().__init__()
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import Qwen2Config, Qwen2ForCausalLM

        self.puffin_config = config
        dtype = config.params_dtype
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.llm = Qwen2ForCausalLM(Qwen2Config(**config.llm.to_hf(), attn_implementation=attn_implementation))
            self.llm.to(dtype)
            self.query_path = ReferenceQueryPath(config.connector, config.llm.hidden_size).to(dtype)
            self.transformer = SD3Transformer2DModel.from_config(config.dit.to_diffusers()).to(dtype)
        self.vision = vision
        self._vae = [vae]  # frozen and never trained: not a submodule
        self.scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=config.flow.num_train_timesteps, shift=config.flow.shift)

    @property
    def vae(self) -> Optional[nn.Module]:
        return self._vae[0]

    @property
    def device(self) -> torch.device:
        return self.llm.model.embed_tokens.weight.device

    def reference_state_dict(self) -> Dict[str, torch.Tensor]:
        """The trainable towers under the released checkpoints' names (docs/puffin.md §1.11), except the vision tower."""
        state = {f"llm.{name}": tensor for name, tensor in self.llm.state_dict().items()}
        state.update({f"transformer.{name}": tensor for name, tensor in self.transformer.state_dict().items()})
        state.update(self.query_path.state_dict())
        return state

    # -- inputs ---------------------------------------------------------------------------------------------
    def _generators(self, batch: Dict[str, Any], purpose: str) -> List[torch.Generator]:
        keys = zip(batch["positions"].tolist(), batch["sample_indices"].tolist())
        return [make_generator(self.puffin_config.seed, purpose, batch["task"], position, index, device=self.device)
                for position, index in keys]

    def _visual_tokens(self, images, batch: Dict[str, Any], grad_scale: bool) -> torch.Tensor:
        """``[n, tokens, llm_hidden]`` from the vision tower, with our model's CPE generator."""
        if isinstance(images, list):
            return torch.cat([self._visual_tokens(image[None], batch, grad_scale) for image in images])
        positions = tuple(batch["positions"].tolist())
        generator = make_generator(self.puffin_config.seed, "vision", batch["task"], positions, device=self.device)
        dtype = self.puffin_config.params_dtype
        return self.vision(images.to(dtype), apply_grad_scale=grad_scale, generator=generator)

    def _embeddings(self, batch: Dict[str, Any]) -> torch.Tensor:
        """``[b, s, h]`` token embeddings with visual tokens and meta queries written into their placeholders."""
        input_ids = batch["input_ids"]
        embeds = self.llm.model.embed_tokens(input_ids.clamp(min=0))
        generation = batch["task"] in GENERATION_TASKS
        image_slots = input_ids == (self.puffin_config.model.image_pad_token_id if generation
                                    else templates.INPUT_IMAGE_TOKEN_INDEX)
        if bool(image_slots.any()):
            visual = self._visual_tokens(batch["vision_images"], batch, grad_scale=not generation)
            embeds[image_slots] = visual.flatten(0, 1).to(embeds.dtype)
        query_slots = input_ids == templates.QUERY_TOKEN_INDEX
        if bool(query_slots.any()):
            queries = self.query_path.meta_queries[None].expand(input_ids.shape[0], -1, -1)
            embeds[query_slots] = queries.flatten(0, 1).to(embeds.dtype)
        return embeds

    def _llm_states(self, batch: Dict[str, Any]) -> torch.Tensor:
        """Final-normed last-layer states ``[b, s, h]`` of ``llm.model``."""
        out = self.llm.model(inputs_embeds=self._embeddings(batch), attention_mask=batch["attention_mask"].long(),
                             position_ids=batch["position_ids"], use_cache=False)
        return out.last_hidden_state

    # -- understanding --------------------------------------------------------------------------------------
    def understanding_loss(self, batch: Dict[str, Any]) -> torch.Tensor:
        """Token-mean cross-entropy over the supervised answer tokens (docs/puffin.md §2.1 step 6)."""
        hidden = self._llm_states(batch)[:, :-1]
        labels = batch["labels"][:, 1:]
        supervised = labels >= 0
        logits = self.llm.lm_head(hidden[supervised])
        return F.cross_entropy(logits.float(), labels[supervised])

    # -- generation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_each(self, images, purpose: str, batch: Dict[str, Any]) -> List[torch.Tensor]:
        """Normalised latents ``[C, h, w]``, one VAE call per image (the reference's loop)."""
        vae, sample = self.vae, self.puffin_config.model.vae_sample_posterior
        if vae is None:
            raise RuntimeError("generation tasks need a VAE")
        dtype = next(vae.parameters()).dtype
        shift, scale = float(vae.config.shift_factor or 0.0), float(vae.config.scaling_factor)
        latents = []
        for image, generator in zip(images, self._generators(batch, purpose)):
            posterior = vae.encode(image[None].to(dtype)).latent_dist
            raw = posterior.sample(generator=generator) if sample else posterior.mean
            latents.append(((raw - shift) * scale)[0])
        return latents

    def _condition_latents(self, batch: Dict[str, Any]) -> Optional[List[List[torch.Tensor]]]:
        if batch["task"] == "text2image":
            return None
        encoded = [self._encode_each(batch["camera_maps"], "vae_camera", batch)]
        if batch["task"] == "image2image":
            encoded.append(self._encode_each(batch["init_images"], "vae_init", batch))
        return [list(per_sample) for per_sample in zip(*encoded)]

    def _sigmas(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The SD3 training scripts' ``get_sigmas``: one table search (and host sync) per sample."""
        schedule = self.scheduler.timesteps.to(timesteps.device)
        indices = [(schedule == t).nonzero().item() for t in timesteps]
        return self.scheduler.sigmas.to(timesteps.device, dtype)[indices].flatten()

    def _flow_inputs(self, latents: Sequence[torch.Tensor], batch: Dict[str, Any]):
        """Per sample: noise level, then Gaussian noise, from that sample's generator (docs/puffin.md §2.3)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        flow = self.puffin_config.flow
        noisy, targets, timesteps = [], [], []
        for x0, generator in zip(latents, self._generators(batch, "flow")):
            u = compute_density_for_timestep_sampling(flow.weighting_scheme, 1, flow.logit_mean, flow.logit_std,
                                                      flow.mode_scale, device=x0.device, generator=generator)
            index = (u * flow.num_train_timesteps).long().clamp(0, flow.num_train_timesteps - 1)
            timestep = self.scheduler.timesteps.to(x0.device)[index]
            sigma = self._sigmas(timestep, x0.dtype)
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
            noisy.append((1.0 - sigma) * x0 + sigma * noise)
            targets.append(noise - x0)
            timesteps.append(timestep)
        return noisy, targets, torch.cat(timesteps)

    def generation_loss(self, batch: Dict[str, Any]) -> torch.Tensor:
        """Mean over samples of each sample's flow-matching MSE (docs/puffin.md §2.3)."""
        queries = self._llm_states(batch)[:, -self.puffin_config.connector.num_queries:]
        pooled, context = self.query_path(queries)
        latents = self._encode_each(batch["target_images"], "vae_target", batch)
        conds = self._condition_latents(batch)
        noisy, targets, timesteps = self._flow_inputs(latents, batch)
        dtype = self.puffin_config.params_dtype
        noisy = [x.to(dtype) for x in noisy]
        conds = None if conds is None else [[c.to(dtype) for c in sample] for sample in conds]
        velocity = reference_dynamic_forward(self.transformer, noisy, context, pooled, timesteps, conds)
        losses = [(v.float() - t.float()).pow(2).mean() for v, t in zip(velocity, targets)]
        return torch.stack(losses).mean()

    def forward(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        batch = {key: _to(value, self.device) for key, value in batch.items()}
        generation = batch["task"] in GENERATION_TASKS
        loss = self.generation_loss(batch) if generation else self.understanding_loss(batch)
        return {"loss": loss}


def _to(value, device: torch.device):
    """A batch entry on ``device`` (tensors and lists of tensors; everything else as is)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return [item.to(device) for item in value]
    return value


def _nontrivial_norms(module: nn.Module, generator: torch.Generator) -> None:
    """Affine norm weights 1 + N(0, 0.1^2) and biases N(0, 0.1^2), so a mix-up of norms is visible (AdaLN
    modulation linears, whose names also contain "norm", are left alone)."""
    with torch.no_grad():
        for module_ in module.modules():
            if not (isinstance(module_, nn.LayerNorm) or type(module_).__name__.endswith("RMSNorm")):
                continue
            for name, param in module_.named_parameters(recurse=False):
                base = 1.0 if name == "weight" else 0.0
                noise = torch.randn(param.shape, generator=generator).to(param)
                param.copy_(base + 0.1 * noise)


def build_puffin_pair(config: "PuffinConfig", seed: int = 0,
                      attn_implementation: str = "sdpa") -> Tuple["PuffinModel", ReferencePuffin]:
    """Our single-process (TP=1) Puffin and the reference assembly holding the same weights.

    The reference towers are randomly initialised (norms made non-trivial) and converted into our model with
    :func:`megatron_puffin.convert.puffin.puffin_to_mcore`; our vision tower is copied into the reference, and the
    reference shares a copy of our VAE. Needs ``megatron_puffin.distributed.initialize()`` first.

    Returns:
        ``(ours, reference)``, both in train mode.
    """
    from megatron_puffin.convert.puffin import load_puffin_state_dict, puffin_to_mcore
    from megatron_puffin.distributed import process_groups
    from megatron_puffin.models.puffin import build_puffin
    from megatron_puffin.models.vision import build_vision

    torch.manual_seed(seed)
    groups = process_groups()
    ours = build_puffin(config, pg_collection=groups)
    vision = build_vision(config.vision, config.llm.hidden_size, transformer_impl=config.transformer_impl,
                          params_dtype=config.params_dtype, device=ours.device, pg_collection=groups)
    vision.load_state_dict(ours.vision.state_dict())
    vae = copy.deepcopy(ours.vae.vae) if ours.vae is not None else None
    reference = ReferencePuffin(config, vision, vae, attn_implementation, device=ours.device).to(ours.device)
    _nontrivial_norms(reference.llm, torch.Generator().manual_seed(seed))
    _nontrivial_norms(reference.query_path, torch.Generator().manual_seed(seed + 1))
    _nontrivial_norms(reference.transformer, torch.Generator().manual_seed(seed + 2))
    state, _ = puffin_to_mcore(reference.reference_state_dict(), config)
    missing = load_puffin_state_dict(ours, state)
    unexpected = [name for name in missing if not name.startswith("vision.")]
    if unexpected:
        raise RuntimeError(f"reference assembly left our tensors unset: {', '.join(unexpected)}")
    return ours.train(), reference.train()
