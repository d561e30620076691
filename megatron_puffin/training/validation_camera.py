"""The camera metric of validation: greedy decoding of held-out images, scored as the published evaluation.

For each image2text / image2text_thinking validation stream, the first ``--eval-camera-samples`` images of its
dataset are prepared as the published evaluation prepares them (centre square crop, resize to ``--image-size``),
described with the base caption prompt (thinking streams: the thinking prompt) by greedy decoding with the KV cache
of :mod:`megatron_puffin.inference`, and scored against their stored cameras with
:mod:`megatron_puffin.evaluation` (first float triple or the fallback, portrait vFoV restore, degrees). The images
are split over the data-parallel ranks and the texts gathered, so the metric does not depend on the layout; every
tensor-parallel rank decodes the same images (the decoder needs that), and so does every pipeline stage: the
decoder passes the hidden states from stage to stage (:mod:`megatron_puffin.inference.decoding`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Sequence, TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_puffin.evaluation import GroundTruthCamera, score_prediction, summarize

if TYPE_CHECKING:  # for annotations only
    from megatron_puffin.config import PuffinArguments

logger = logging.getLogger(__name__)

CAMERA_TASKS = {"image2text": False, "image2text_thinking": True}
"""Validation stream tasks that get the camera metric -> whether they use the thinking prompt."""

REPORTED = ("median_roll_error", "median_pitch_error", "median_vfov_error", "num_images", "num_fallback")
"""The metrics logged per stream (degrees; counts)."""


@dataclass
class CameraStream:
    """The held-out images of one validation stream: prepared model inputs and ground truth."""

    name: str
    thinking: bool
    images: List[torch.Tensor]
    truths: List[GroundTruthCamera]


def _camera_stream(name: str, thinking: bool, paths: Sequence[str], num_samples: int, image_size: int) -> CameraStream:
    from megatron_puffin.data.format import BAD_SAMPLE_ERRORS, PuffinDataset
    from megatron_puffin.data.images import decode_image
    from megatron_puffin.inference.images import prepare_image

    dataset = PuffinDataset(list(paths))
    images, truths = [], []
    for index in range(min(num_samples, len(dataset))):
        try:  # a sample that does not decode is left out, as one without a camera is (the loss loader replaces it)
            sample = dataset[index]
            camera = sample["camera"]
            if camera is None or sample["image"] is None:
                continue
            decoded = decode_image(sample["image"])  # once: its size is the ground truth's, then the model's input
            width, height = decoded.size
            image = prepare_image(decoded, image_size, "center_crop")
        except BAD_SAMPLE_ERRORS as error:
            shard, local = dataset.locate(index)
            logger.warning("camera validation of %s leaves out a sample that does not decode: shard %s index %d: %s: "
                           "%s", name, shard.dir, local, type(error).__name__, " ".join(str(error).split()))
            continue
        images.append(image)
        truths.append(GroundTruthCamera(f"{name}/{index}", camera.roll, camera.pitch, camera.vfov, width, height))
    return CameraStream(name, thinking, images, truths)


class CameraValidation:
    """Decodes and scores the held-out cameras (see the module docstring)."""

    def __init__(self, streams: List[CameraStream], tokenizer, max_new_tokens: int, dp_rank: int, dp_size: int,
                 dp_group=None) -> None:
        self.streams, self.tokenizer, self.max_new_tokens = streams, tokenizer, max_new_tokens
        self.dp_rank, self.dp_size, self.dp_group = dp_rank, dp_size, dp_group

    @classmethod
    def from_args(cls, args: PuffinArguments, tokenizer, ctx, dp_group) -> "CameraValidation":
        from megatron_puffin.data.config import parse_task_stream
        from megatron_puffin.data.loader import stream_names

        specs = [parse_task_stream(spec) for spec in args.validation.valid_task_stream]
        streams = []
        for name, spec in zip(stream_names(specs), specs):
            if spec.task in CAMERA_TASKS:
                label = name[:-2] if name.endswith("#0") else name
                streams.append(_camera_stream(label, CAMERA_TASKS[spec.task], spec.paths,
                                              args.validation.eval_camera_samples, args.data.image_size))
        return cls(streams, tokenizer, args.validation.eval_max_new_tokens, ctx.dp_rank, ctx.data_parallel_size,
                   dp_group if dist.is_initialized() else None)

    def _decode(self, model, stream: CameraStream) -> List[str]:
        """Every image's text: this rank decodes images dp_rank, dp_rank + dp_size, ...; the texts are gathered."""
        from megatron_puffin.inference import understand
        from megatron_puffin.models.sequence_parallel import sequence_parallel_disabled

        mine = list(range(self.dp_rank, len(stream.images), self.dp_size))
        with sequence_parallel_disabled(model):  # one token per decoding step: plain TP
            outputs = understand(model, self.tokenizer, [stream.images[i] for i in mine], thinking=stream.thinking,
                                 max_new_tokens=self.max_new_tokens) if mine else []
        texts = {index: output.text for index, output in zip(mine, outputs)}
        if self.dp_size > 1:
            gathered: List[Dict[int, str]] = [{} for _ in range(self.dp_size)]
            dist.all_gather_object(gathered, texts, group=self.dp_group)
            texts = {index: text for part in gathered for index, text in part.items()}
        return [texts[index] for index in range(len(stream.images))]

    def run(self, model) -> Dict[str, Dict[str, float]]:
        """``{stream: {median_roll_error, median_pitch_error, median_vfov_error, num_images, num_fallback}}``;
        ``model`` is the unwrapped :class:`~megatron_puffin.models.puffin.PuffinModel` (put in eval mode here)."""
        was_training = model.training
        model.eval()
        results = {}
        try:
            with torch.no_grad():
                for stream in self.streams:
                    if not stream.images:
                        continue
                    texts = self._decode(model, stream)
                    scored = [score_prediction(t.fname, text, t) for t, text in zip(stream.truths, texts)]
                    metrics = summarize(scored)
                    results[stream.name] = {name: metrics[name] for name in REPORTED}
        finally:
            model.train(was_training)
        return results
