"""Validation during training: held-out per-task losses and, for understanding streams, camera errors.

Every ``--eval-interval`` optimizer steps the :class:`Validator`

1. runs ``--eval-iters`` cycles of the ``--valid-task-stream`` micro-batches forward only (model in eval mode, no
   gradients) through the same megatron-core schedule as training (:func:`~.step.forward_backward` with
   ``forward_only=True``), so every TP/PP layout works. Each micro-batch's loss is its global mean over the
   data-parallel ranks (:func:`~.losses.global_mean_loss`), and the task's validation loss is those means weighted
   by their global token / sample counts: exactly the mean over every supervised token (understanding) or sample
   (generation) of the validation set, whatever the data-parallel size. The loader restarts at the beginning of the
   validation order each time, so successive validations score the same samples and are comparable;
2. decodes greedily the camera of up to ``--eval-camera-samples`` images of each image2text / image2text_thinking
   validation stream and reports the median roll / pitch / vFoV errors in degrees, scored as the published
   evaluation scores them (:mod:`megatron_puffin.evaluation`).

The results go to the log (one fixed-field ``validation`` line), TensorBoard and the metrics file under the tags
``valid_loss/<task>`` and ``valid_camera/<stream task>/median_<p>_error``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Dict, List, Optional, TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_puffin.training.data_parallel import unsharded_parameters

if TYPE_CHECKING:  # for annotations only
    from megatron_puffin.config import PuffinArguments
    from megatron_puffin.config.schema import ValidationConfig

logger = logging.getLogger(__name__)

LOSS_TAG = "valid_loss/"
CAMERA_TAG = "valid_camera/"


@dataclasses.dataclass
class ValidationResult:
    """One validation: per-task losses (global means) and per-stream camera metrics (degrees)."""

    iteration: int
    losses: Dict[str, float]
    camera: Dict[str, Dict[str, float]] = dataclasses.field(default_factory=dict)

    def scalars(self) -> Dict[str, float]:
        values = {f"{LOSS_TAG}{task}": loss for task, loss in self.losses.items()}
        for task, metrics in self.camera.items():
            values.update({f"{CAMERA_TAG}{task}/{name}": value for name, value in metrics.items()})
        return values

    def line(self, tasks: List[str]) -> str:
        """``validation iter 20 | loss image2text 2.4312 cam2image 0.9120 | camera image2text median roll 3.10
        pitch 2.20 vfov 8.05 deg (8 images, 0 unparsable)``."""
        losses = " ".join(f"{t} {self.losses[t]:.4f}" if t in self.losses else f"{t} -" for t in tasks)
        text = f"validation iter {self.iteration} | loss {losses}"
        for task, m in self.camera.items():
            text += (f" | camera {task} median roll {m['median_roll_error']:.2f} pitch {m['median_pitch_error']:.2f} "
                     f"vfov {m['median_vfov_error']:.2f} deg ({int(m['num_images'])} images, "
                     f"{int(m['num_fallback'])} unparsable)")
        return text


def validation_tasks(validation: ValidationConfig) -> List[str]:
    """The tasks of the validation streams as their losses are keyed (:func:`~megatron_puffin.data.config.stream_tasks`:
    ``image2text_thinking``, not ``image2text``), in stream order."""
    from megatron_puffin.data.config import parse_task_stream, stream_tasks

    return stream_tasks([parse_task_stream(spec) for spec in validation.valid_task_stream])


def build_validation_loader(args: PuffinArguments, tokenizer, dp_rank: int, dp_size: int,
                            vae_identity: Optional[Dict[str, Any]] = None):
    """The data loader of the validation streams (the training data flags with the streams replaced);
    ``vae_identity``: the training VAE that --cached-latents of the validation streams must match, as for training."""
    from megatron_puffin.data import build_data_loader

    data = dataclasses.replace(args.data, task_stream=list(args.validation.valid_task_stream))
    return build_data_loader(
        data, args.training.seed, dp_rank, dp_size, vision_patch_size=args.vision.patch_size,
        vision_fold=args.vision.fold_size, num_query_tokens=args.connector.num_queries, tokenizer=tokenizer,
        vae_identity=vae_identity, stream_flag="--valid-task-stream",
    )


def validation_micro_batches(args: PuffinArguments) -> int:
    """Micro-batches of one validation: --eval-iters cycles of the validation streams."""
    from megatron_puffin.data.config import parse_task_stream

    cycle = sum(parse_task_stream(spec).repeats for spec in args.validation.valid_task_stream)
    return cycle * args.validation.eval_iters


def repeated_samples(specs, eval_iters: int, data_parallel_size: int) -> List[str]:
    """One line per validation stream that a validation reads past its end (its samples then repeat, and the loss
    weights those of the next epoch's order twice): the samples it reads, the samples it holds, the fix."""
    lines = []
    for spec in specs:
        per_iteration = spec.repeats * spec.micro_batch_size * data_parallel_size
        read = eval_iters * per_iteration
        if read > spec.num_samples:
            lines.append(
                f"stream {spec.name} holds {spec.num_samples} samples and each validation reads {read} (--eval-iters "
                f"{eval_iters} x {per_iteration} per cycle over the data-parallel ranks): samples repeat, weighted "
                f"unevenly; --eval-iters {max(1, spec.num_samples // per_iteration)} reads each at most once"
            )
    return lines


def _losses_on_every_rank(losses: Dict[str, float], pipeline_size: int, group) -> Dict[str, float]:
    """Losses are computed on the last pipeline stage; send them to the other stages of ``group``."""
    if pipeline_size <= 1:
        return losses
    box = [losses]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, pipeline_size - 1), group=group)
    return box[0]


def validation_losses(model, batches: List[Dict[str, Any]], pipeline_size: int = 1) -> Dict[str, float]:
    """Per-task global mean losses of ``batches`` (forward only, eval mode, no gradients); the model's train/eval
    mode is restored afterwards."""
    from megatron_puffin.training.step import forward_backward, model_process_groups

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            result = forward_backward(model, batches, forward_only=True)
    finally:
        model.train(was_training)
    losses = {task: result.task_loss(task) for task in result.task_losses}
    return _losses_on_every_rank(losses, pipeline_size, model_process_groups(model).pp)


class Validator:
    """Owns the validation loader and runs a validation (see the module docstring).

    Args:
        args: The run's flags.
        tokenizer: The run's tokenizer.
        ctx: The run's distributed context (``megatron_puffin.distributed.initialize``).
        pg_collection: The run's process groups (the camera decoding gathers over ``pg_collection.dp``).
    """

    def __init__(self, args: PuffinArguments, tokenizer, ctx, pg_collection,
                 vae_identity: Optional[Dict[str, Any]] = None) -> None:
        self.args, self.tokenizer, self.ctx = args, tokenizer, ctx
        self.interval = args.validation.eval_interval
        self.loader = build_validation_loader(args, tokenizer, ctx.dp_rank, ctx.data_parallel_size, vae_identity)
        self.start = self.loader.state_dict()
        self.num_micro_batches = validation_micro_batches(args)
        self.tasks = validation_tasks(args.validation)
        if ctx.rank == 0:
            for problem in repeated_samples(self.loader.specs, args.validation.eval_iters, ctx.data_parallel_size):
                logger.warning("validation: %s", problem)
        self.camera = None
        if args.validation.eval_camera_samples > 0:
            from megatron_puffin.training.validation_camera import CameraValidation

            self.camera = CameraValidation.from_args(args, tokenizer, ctx, pg_collection.dp)

    def due(self, iteration: int) -> bool:
        return iteration % self.interval == 0

    def batches(self) -> List[Dict[str, Any]]:
        """The validation micro-batches of this rank, from the start of the validation order."""
        self.loader.load_state_dict(self.start)
        iterator = iter(self.loader)
        try:
            return [next(iterator) for _ in range(self.num_micro_batches)]
        finally:
            iterator.close()  # stops the loader's workers

    def agreed_batches(self) -> List[Dict[str, Any]]:
        """:meth:`batches`, once every rank has its own (one small all-reduce): when the loader of any rank fails
        (workers that kept dying, shards gone), every rank raises before the forward passes, whose collectives a
        failed rank would never join.

        Raises:
            DataLoaderError: This rank's error, or one saying that another rank's loader failed.
        """
        from megatron_puffin.data.loader import DataLoaderError

        batches, error = [], None
        try:
            batches = self.batches()
        except DataLoaderError as caught:
            error = caught
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=self.ctx.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if error is not None:
            raise error
        if flag.item():
            raise DataLoaderError("the validation data loader of another rank failed; see its log")
        return batches

    def run(self, model, iteration: int, unwrapped_model: Optional[torch.nn.Module] = None) -> ValidationResult:
        """Validates ``model`` (the DDP-wrapped training model); ``unwrapped_model`` is used for decoding."""
        losses = validation_losses(model, self.agreed_batches(), self.ctx.pipeline_model_parallel_size)
        result = ValidationResult(iteration, losses)
        if self.camera is not None:
            decoder = unwrapped_model if unwrapped_model is not None else model
            # --use-torch-fsdp2: whole weights (but the MMDiT's blocks, which decoding text never runs), no
            # collective per token
            with unsharded_parameters(decoder, skip=getattr(decoder, "dit", None)):
                result.camera = self.camera.run(decoder)
        bad = [task for task, loss in losses.items() if not math.isfinite(loss)]
        if bad and self.ctx.rank == 0:
            logger.warning("validation at iteration %d: non-finite loss for %s", iteration, bad)
        return result
