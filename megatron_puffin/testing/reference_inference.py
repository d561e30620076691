"""Inference the reference's way on the reference assembly (:mod:`.reference_puffin`), for parity checks.

* Understanding (docs/puffin.md §6.1): ``transformers`` ``Qwen2Model`` called with ``inputs_embeds``, the 2-D key-padding
  mask and explicit position ids, its own KV cache (``past_key_values``), greedy argmax of the tied head on the last
  position; next position = max(previous) + 1, mask extended by 1; a finished sequence keeps emitting the end token.
* Generation (docs/puffin.md §6.2): the query states of the ``[negatives; positives]`` prompt batch through the plain-PyTorch
  connectors, diffusers' SD3 modules run the reference's dynamic way, CFG ``v_neg + g (v_pos - v_neg)``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch

from megatron_puffin.testing.reference_dit import reference_dynamic_forward
from megatron_puffin.testing.reference_puffin import ReferencePuffin, _to


@torch.no_grad()
def reference_greedy_decode(reference: ReferencePuffin, batch: Dict[str, Any], end_token_id: int,
                            max_new_tokens: int) -> torch.Tensor:
    """Generated ids ``[b, n]`` (the end token repeats after a sequence ends)."""
    batch = {key: _to(value, reference.device) for key, value in batch.items()}
    model, head = reference.llm.model, reference.llm.lm_head
    mask = batch["attention_mask"].long()
    positions = batch["position_ids"]
    out = model(inputs_embeds=reference._embeddings(batch), attention_mask=mask, position_ids=positions,
                use_cache=True)
    done = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    tokens: List[torch.Tensor] = []
    for step in range(max_new_tokens):
        logits = head(out.last_hidden_state[:, -1])[:, : reference.puffin_config.llm.vocab_size]
        next_ids = torch.where(done, torch.full_like(done, end_token_id, dtype=torch.long), logits.argmax(-1))
        tokens.append(next_ids)
        done |= next_ids == end_token_id
        if bool(done.all()) or step + 1 == max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions.max(dim=1, keepdim=True).values + 1
        out = model(inputs_embeds=model.embed_tokens(next_ids[:, None]), attention_mask=mask,
                    position_ids=positions, past_key_values=out.past_key_values, use_cache=True)
    return torch.stack(tokens, dim=1).cpu()


@torch.no_grad()
def reference_guided_velocity(reference: ReferencePuffin, batch: Dict[str, Any], latents: torch.Tensor,
                              timestep: torch.Tensor, conds: Sequence[Sequence[torch.Tensor]],
                              guidance_scale: float) -> torch.Tensor:
    """One CFG velocity of ``latents`` ``[b, C, h, w]`` at ``timestep``; ``batch`` holds ``[negatives; positives]``
    prompts (2b rows), ``conds`` the b samples' condition latents (given to both branches)."""
    batch = {key: _to(value, reference.device) for key, value in batch.items()}
    states = reference._llm_states(batch)[:, -reference.puffin_config.connector.num_queries:]
    pooled, context = reference.query_path(states)
    count = latents.shape[0]
    velocity = reference_dynamic_forward(reference.transformer, torch.cat([latents, latents]), context, pooled,
                                         timestep.reshape(1).expand(2 * count), list(conds) * 2)
    velocity = torch.stack(list(velocity)) if not isinstance(velocity, torch.Tensor) else velocity
    uncond, cond = velocity[:count], velocity[count:]
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def reference_generate(reference: ReferencePuffin, batch: Dict[str, Any], camera_maps: Sequence[torch.Tensor],
                       init_images, seeds: Sequence[int], size: int, num_steps: int,
                       guidance_scale: float) -> torch.Tensor:
    """Images the reference's way (docs/puffin.md §6.2): ``batch`` holds ``[negatives; positives]`` prompts; each camera map
    (and initial view) VAE-encoded one sample at a time with a posterior sample; diffusers'
    ``FlowMatchEulerDiscreteScheduler`` steps over the reference dynamic MMDiT forward; VAE decode one sample at a time.
    Returns uint8 ``[b, H, W, 3]``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    batch = {key: _to(value, reference.device) for key, value in batch.items()}
    vae, count = reference.vae, len(seeds)
    shift, scale = float(vae.config.shift_factor or 0.0), float(vae.config.scaling_factor)
    states = reference._llm_states(batch)[:, -reference.puffin_config.connector.num_queries:]
    pooled, context = reference.query_path(states)

    def encode(image, seed):
        generator = torch.Generator().manual_seed(seed)
        return (vae.encode(image[None].to(reference.device)).latent_dist.sample(generator=generator)[0] - shift) * scale

    conds = [[encode(camera_maps[i], seeds[i])] + ([] if init_images is None else [encode(init_images[i], seeds[i])])
             for i in range(count)]
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = torch.stack([torch.randn(vae.config.latent_channels, size // factor, size // factor,
                                       generator=torch.Generator().manual_seed(seed)) for seed in seeds])
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=reference.puffin_config.flow.num_train_timesteps,
                                                shift=reference.puffin_config.flow.shift)
    scheduler.set_timesteps(num_steps)
    for timestep in scheduler.timesteps:
        velocity = reference_dynamic_forward(reference.transformer, torch.cat([latents, latents]), context, pooled,
                                             timestep.expand(2 * count), conds * 2)
        velocity = torch.stack(list(velocity)) if not isinstance(velocity, torch.Tensor) else velocity
        guided = velocity[:count] + guidance_scale * (velocity[count:] - velocity[:count])
        latents = scheduler.step(guided, timestep, latents).prev_sample
    images = torch.cat([vae.decode(latent[None] / scale + shift).sample for latent in latents])
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
