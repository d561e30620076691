"""An analytic estimate of the activation memory one training micro-batch keeps for its backward pass, per tower.

Counted: the tensors autograd saves during a forward pass (inputs of every linear layer, norm and activation
function, the attention inputs and output), in values per token and layer, times the tokens the tower sees.
Parameters, gradients and optimizer state are not activations (``training.layout`` counts them); nor are the
transient tensors of one operation. Derivation per layer (local specs, no dropout, fused SDPA attention that
keeps only a per-row log-sum-exp; ``h`` hidden size, ``f`` MLP size, ``g`` = query groups / heads):

* LLM decoder layer (RMSNorm, GQA with RoPE, SwiGLU): both norms' inputs and outputs (4 h), the fused q/k/v
  output ((1 + 2 g) h), the rotated q and k ((1 + g) h), the attention output and its reshaped copy (2 h), the
  gate-and-up output (2 f), SiLU output and product (2 f): ``(8 + 3 g) h + 4 f``;
* ViT / connector encoder layer (LayerNorm, full attention, GELU MLP): norms (4 h), q/k/v (3 h), attention output
  and copy (2 h), MLP input-side output and GELU output (2 f): ``9 h + 2 f``;
* MMDiT joint block, per token of either stream: the encoder layer's ``9 h + 2 f`` plus the two AdaLN modulated
  inputs, the two gated outputs and the joint attention's concatenated q/k/v: ``16 h + 2 f``; the last block keeps
  that for its query tokens (the targets' prefix of the image stream) and, for every other token, the first norm's
  input and output and its key and value (``4 h``);
* the output layer of understanding tasks on the supervised positions: logits and softmax, ``2 V`` per position.

A tower's activations are kept only when something before or in it trains (a frozen vision tower whose input
needs no gradient saves nothing); with ``recompute`` a tower keeps one layer input per layer plus one layer's
activations. ``benchmarks/bench_training.py`` prints this estimate next to the measured peak (distinct storages
saved for backward, parameters excluded) and their ratio.

Per GPU (:func:`stage_activation_bytes`, the dry run's memory table and the pipeline balance): every value is
either *split* over tensor-parallel ranks (the outputs of column-parallel linears, attention per head, the
vocabulary-parallel logits) or *replicated* on each of them (the norms' inputs and outputs, the residual-side
tensors, the layer inputs kept under recompute, the plain ``nn.Linear`` projections of the query path); sequence
parallelism splits the replicated ones too. Each pipeline stage holds the towers the model places on it: the
vision tower on the first, the LLM's decoder layers where the placement puts them, the output layer's logits, the
connectors and the MMDiT on the last; under 1F1B stage ``i`` of ``p`` holds up to ``p - i`` micro-batches
(:func:`pipeline_activation_bytes`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence, Tuple, TYPE_CHECKING

from megatron_puffin.tasks import GENERATION_TASKS, IMAGE_INPUT_TASKS, TASK_VARIANTS, UNDERSTANDING_TASKS
from megatron_puffin.training.flops import generation_images, supervised_positions
from megatron_puffin.training.parameter_counts import weight_bytes
from megatron_puffin.training.towers import trainable_towers

if TYPE_CHECKING:  # for annotations only
    from megatron_puffin.config import PuffinArguments

ACTIVATION_TOWERS = ("vision", "llm", "queries", "dit")


@dataclass
class MicroBatchShape:
    """What the estimate needs of a micro-batch: its task and the token counts each tower sees."""

    task: str
    batch_size: int
    llm_tokens: int
    """Padded LLM sequence length S (every row runs S positions)."""
    logit_rows: int
    """Supervised positions over the micro-batch (the output layer's rows; 0 for generation)."""
    vision_images: List[Tuple[int, int]] = field(default_factory=list)
    """(H, W) of every image the vision tower encodes."""
    dit_image_tokens: int = 0
    """Image-stream tokens of the MMDiT summed over samples (target plus condition latents, patchified)."""
    dit_query_tokens: int = 0
    """Image-stream tokens the MMDiT's last block makes queries for, summed over samples (the stream's targets
    prefix, :mod:`megatron_puffin.models.dit.attention`)."""


@dataclass(frozen=True)
class Values:
    """Saved values: ``replicated`` on every tensor-parallel rank (split too under sequence parallelism) and
    ``split`` over the ranks; at TP 1 a tower holds their sum."""

    replicated: float = 0.0
    split: float = 0.0

    @property
    def total(self) -> float:
        return self.replicated + self.split

    def per_rank(self, tensor_model_parallel_size: int, sequence_parallel: bool) -> float:
        """Values one tensor-parallel rank holds."""
        if sequence_parallel:
            return self.total / tensor_model_parallel_size
        return self.replicated + self.split / tensor_model_parallel_size

    def __add__(self, other: "Values") -> "Values":
        return Values(self.replicated + other.replicated, self.split + other.split)

    def __mul__(self, times: float) -> "Values":
        return Values(self.replicated * times, self.split * times)


def _layer_values(kind: str, h: int, f: int, groups: float = 1.0) -> Values:
    """Saved values per token of one layer (see the module docstring): the norms' (and in the MMDiT the AdaLN-modulated
    and gated) tensors are replicated over TP, the rest is split."""
    return {"llm": Values(4 * h, (4 + 3 * groups) * h + 4 * f), "encoder": Values(4 * h, 5 * h + 2 * f),
            "dit": Values(8 * h, 8 * h + 2 * f)}[kind]


def _stack_values(kind: str, layers: int, tokens: int, h: int, f: int, recompute: bool,
                  groups: float = 1.0) -> Values:
    """``layers`` layers over ``tokens`` tokens; under recompute one input per layer plus one layer's activations."""
    if layers == 0:
        return Values()
    per_layer = _layer_values(kind, h, f, groups) * tokens
    return (Values(layers * tokens * h) + per_layer) if recompute else per_layer * layers


def _vision_values(config, shape: MicroBatchShape, encoder: bool) -> Values:
    """The ViT's layers (when ``encoder``: it trains) and the projector (which always trains)."""
    vision, llm_h = config.vision, config.llm.hidden_size
    total = Values()
    for height, width in shape.vision_images:
        tokens = (height // vision.patch_size) * (width // vision.patch_size) + vision.class_token_len
        if encoder:
            total += _stack_values("encoder", vision.num_layers, tokens, vision.hidden_size,
                                   vision.ffn_hidden_size, bool(vision.recompute))
        total += Values(vision.folded_hidden_size, 2 * llm_h) * vision.num_tokens(height, width)  # projector
    return total


def _llm_layer_values(config, shape: MicroBatchShape, layers: int) -> Values:
    """``layers`` of the LLM's decoder layers."""
    llm = config.llm
    groups = llm.num_query_groups / llm.num_attention_heads
    tokens = shape.batch_size * shape.llm_tokens
    return _stack_values("llm", layers, tokens, llm.hidden_size, llm.ffn_hidden_size, bool(llm.recompute), groups)


def _logit_values(config, shape: MicroBatchShape) -> Values:
    """The output layer's logits and softmax on the supervised positions (vocabulary-parallel)."""
    return Values(0.0, 2 * shape.logit_rows * config.llm.vocab_size)


def _llm_values(config, shape: MicroBatchShape) -> Values:
    return _llm_layer_values(config, shape, config.llm.num_layers) + _logit_values(config, shape)


def _query_values(config, shape: MicroBatchShape) -> Values:
    c = config.connector
    tokens = shape.batch_size * c.num_queries
    branch = _stack_values("encoder", c.num_layers, tokens, c.hidden_size, c.ffn_hidden_size, bool(c.recompute))
    return branch * 2 + Values(tokens * (config.llm.hidden_size + c.joint_attention_dim))


def _dit_values(config, shape: MicroBatchShape) -> Values:
    """The joint blocks; the last one keeps everything only for its query tokens (module docstring)."""
    dit = config.dit
    h, f = dit.hidden_size, dit.ffn_hidden_size
    tokens = shape.dit_image_tokens + shape.batch_size * config.connector.num_queries
    queries = shape.dit_query_tokens or shape.dit_image_tokens
    if dit.recompute:  # one block's activations at a time: the largest is a full one
        return _stack_values("dit", dit.num_layers, tokens, h, f, True)
    key_value_only = Values(2 * h, 2 * h)
    last = key_value_only * (tokens - queries) + _layer_values("dit", h, f) * queries
    return _stack_values("dit", dit.num_layers - 1, tokens, h, f, False) + last


def _kept(trainable: Mapping[str, bool], task: str) -> Dict[str, bool]:
    """Which towers save activations: a tower does when it or anything before it trains."""
    vision = trainable["vision"] or trainable["projector"]
    upstream = vision and task != "text2text"
    llm = trainable["llm"] or upstream or (TASK_VARIANTS.get(task, task) in GENERATION_TASKS and trainable["queries"])
    return {"vision": vision, "vision_encoder": trainable["vision"], "llm": llm,
            "queries": llm or trainable["queries"], "dit": llm or trainable["queries"] or trainable["dit"]}


def activation_bytes_estimate(config, shape: MicroBatchShape, trainable: Mapping[str, bool],
                              bytes_per_value: int) -> Dict[str, float]:
    """Estimated activation bytes per tower of one micro-batch, and their ``total``.

    Args:
        config: the model's tower configs (``llm``, ``vision``, ``connector``, ``dit`` attributes: a
            :class:`~megatron_puffin.models.puffin.PuffinConfig` or parsed ``pretrain_puffin.py`` flags).
        shape: the micro-batch's token counts.
        trainable: tower name -> trains (:func:`~megatron_puffin.training.towers.trainable_towers`).
        bytes_per_value: 4 in fp32, 2 in bf16/fp16.
    """
    values = _tower_values(config, shape, trainable, config.llm.num_layers)
    result = {tower: value.total * bytes_per_value for tower, value in values.items() if tower != "logits"}
    result["llm"] += values["logits"].total * bytes_per_value
    result["total"] = sum(result.values())
    return result


def _tower_values(config, shape: MicroBatchShape, trainable: Mapping[str, bool], llm_layers: int) -> Dict[str, Values]:
    """Saved values per tower of one micro-batch, with ``llm_layers`` of the LLM's decoder layers."""
    kept = _kept(trainable, shape.task)
    generation = TASK_VARIANTS.get(shape.task, shape.task) in GENERATION_TASKS
    return {
        "vision": _vision_values(config, shape, kept["vision_encoder"]) if kept["vision"] else Values(),
        "llm": _llm_layer_values(config, shape, llm_layers) if kept["llm"] else Values(),
        "logits": _logit_values(config, shape) if kept["llm"] else Values(),
        "queries": _query_values(config, shape) if kept["queries"] and generation else Values(),
        "dit": _dit_values(config, shape) if kept["dit"] and generation else Values(),
    }


STAGE_OF_TOWER = {"vision": "first", "logits": "last", "queries": "last", "dit": "last"}
"""Where the model places each tower's activations (the LLM's decoder layers follow the layer placement)."""


def stage_activation_bytes(config, shape: MicroBatchShape, trainable: Mapping[str, bool], bytes_per_value: int,
                           layers: Sequence[int], tensor_model_parallel_size: int = 1,
                           sequence_parallel: bool = False) -> List[float]:
    """Activation bytes of one micro-batch on each pipeline stage, per GPU (one tensor-parallel rank).

    Args:
        config, shape, trainable, bytes_per_value: as for :func:`activation_bytes_estimate`.
        layers: the LLM's decoder layers on each stage (``config.validate_pipeline.stage_layer_counts``).
        tensor_model_parallel_size, sequence_parallel: how each tower's values are divided (see :class:`Values`).
    """
    last = len(layers) - 1
    result = []
    for stage, count in enumerate(layers):
        values = _tower_values(config, shape, trainable, count)
        held = [tower for tower, where in STAGE_OF_TOWER.items()
                if (where == "first" and stage == 0) or (where == "last" and stage == last)]
        total = sum((values[tower] for tower in ["llm", *held]), Values())
        result.append(total.per_rank(tensor_model_parallel_size, sequence_parallel) * bytes_per_value)
    return result


def _image_size(image) -> Tuple[int, int]:
    return int(image.shape[-2]), int(image.shape[-1])


def shape_of_batch(config, batch: Mapping[str, Any]) -> MicroBatchShape:
    """The :class:`MicroBatchShape` of a collated task micro-batch."""
    task, ids = batch["task"], batch["input_ids"]
    images = batch.get("vision_images")
    vision = [] if images is None else [_image_size(image) for image in images]
    dit_tokens = dit_queries = 0
    if task in GENERATION_TASKS:
        step = 8 * config.dit.patch_size  # the VAE's x8 and the DiT's patches
        samples = generation_images(batch)
        dit_tokens = sum((hh // step) * (ww // step) for sample in samples for hh, ww in sample)
        # The last block's queries: the longest target's tokens, for every sample (the stream's targets prefix).
        dit_queries = len(samples) * max((hh // step) * (ww // step) for (hh, ww), *_ in samples)
    return MicroBatchShape(task, int(ids.shape[0]), int(ids.shape[1]), supervised_positions(batch), vision,
                           dit_tokens, dit_queries)


def worst_case_shape(args: PuffinArguments, task: str, batch_size: int) -> MicroBatchShape:
    """The largest micro-batch of ``task`` the flags allow: square ``--image-size`` images, the text-token limits
    (``--max-understanding-text-tokens`` / ``--max-generation-text-tokens``) filled, every text position
    supervised in understanding tasks."""
    from megatron_puffin.config.validate_values import llm_sequence_parts

    data = args.data
    size = data.image_size
    kind = TASK_VARIANTS.get(task, task)  # a stream's variant (image2text_thinking) has its loss task's shapes
    images = [(size, size)] * batch_size if kind in IMAGE_INPUT_TASKS else []
    tokens = sum(llm_sequence_parts(args, task).values())
    if kind in UNDERSTANDING_TASKS:
        return MicroBatchShape(task, batch_size, tokens, batch_size * data.max_understanding_text_tokens, images)
    latents = {"text2image": 1, "cam2image": 2, "image2image": 3}[kind]
    step = 8 * args.dit.patch_size
    return MicroBatchShape(task, batch_size, tokens, 0, images, batch_size * latents * (size // step) ** 2,
                           batch_size * (size // step) ** 2)


def activation_lines(args: PuffinArguments, bytes_per_value: int) -> List[str]:
    """``--dry-run`` lines: each stream's worst-case activation estimate per micro-batch (one micro-batch's
    activations are alive at a time without pipelining; with PP, up to PP micro-batches per stage)."""
    try:
        streams = args.data.streams()
    except ValueError:
        return []
    trainable = trainable_towers(args.model)
    lines = [f"activations per micro-batch, summed over a TP group (estimate, training.activations; largest "
             f"sample the flags allow, {bytes_per_value} B/value):"]
    for stream in streams:
        estimate = activation_bytes_estimate(args, worst_case_shape(args, stream.task, stream.micro_batch_size),
                                             trainable, bytes_per_value)
        towers = ", ".join(f"{tower} {estimate[tower] / 2**30:.2f}" for tower in ACTIVATION_TOWERS if estimate[tower])
        lines.append(f"  {stream.task} x{stream.micro_batch_size}: {estimate['total'] / 2**30:.2f} GiB ({towers})")
    return lines


def pipeline_activation_bytes(args: PuffinArguments, layers: Sequence[int]) -> List[float]:
    """Peak activation bytes per GPU of each pipeline stage under 1F1B: the largest worst-case micro-batch of the
    task streams (:func:`worst_case_shape`) times the micro-batches in flight on the stage (up to ``p - i`` on
    stage ``i`` of ``p``, at most the micro-batches of a step).

    Args:
        args: parsed ``pretrain_puffin.py`` flags.
        layers: the LLM's decoder layers on each stage.
    """
    streams = args.data.streams()
    trainable = trainable_towers(args.model)
    parallel = args.parallel
    in_flight_limit = args.training.micro_batches_per_step or sum(stream.repeats for stream in streams)
    per_task = [stage_activation_bytes(args, worst_case_shape(args, stream.task, stream.micro_batch_size), trainable,
                                       weight_bytes(args), layers, parallel.tensor_model_parallel_size,
                                       parallel.sequence_parallel) for stream in streams]
    pp = len(layers)
    return [max((task[stage] for task in per_task), default=0.0) * min(pp - stage, in_flight_limit)
            for stage in range(pp)]
