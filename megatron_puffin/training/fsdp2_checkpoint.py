"""How an FSDP2 (``--use-torch-fsdp2``) model's parameters are described in megatron-core distributed checkpoints, so
that the checkpoints reshard: they load at another data-parallel size and into plain DDP, and DDP checkpoints load
into FSDP2.

FSDP2 turns every parameter into a DTensor that holds, on each data-parallel rank, a slice of rows of dim 0, split
as ``torch.chunk`` does: ``ceil(n / dp)`` rows per rank, fewer on the last rank holding any, none on ranks past the
end. A checkpoint stores each parameter as one global tensor and each rank's slice at its offset in it. megatron-core
0.16.1 (``make_sharded_tensor_for_checkpoint`` and ``make_tp_sharded_tensor_for_checkpoint`` in
``megatron/core/utils.py``) records a DTensor's local slice as chunk ``dp_rank`` of ``dp`` *equal* chunks, so the
global shape it records is ``dp * local rows``: right only when ``n`` is a multiple of ``dp``. Otherwise the record
is wrong; for ``n < dp`` the plain helper even records the whole gathered tensor as one of ``dp`` chunks (RADIO's
``[1, 36, 16]`` position embedding becomes a ``[2, 36, 16]`` tensor at DP 2), and the checkpoint loads nowhere
else. :func:`make_sharded_tensor_for_checkpoint` and :func:`make_tp_sharded_tensor_for_checkpoint` (the
``FSDP2_CHECKPOINT_SHARDS`` row of :data:`megatron_puffin.platform.PATCHES`) record the slice that the rank really
holds, at its real offset in the parameter's real shape (an irregular grid, which megatron-core's torch_dist format
supports, when ``n`` is not a multiple of ``dp``); plain tensors go to megatron-core's helpers unchanged.

A gated linear unit's ``linear_fc1`` weight is ``[W; V]`` (gate rows, then value rows). megatron-core stores it
under one key as all W rows then all V rows, splitting each rank's tensor in two halves
(``apply_swiglu_sharded_factory`` in ``megatron/core/transformer/mlp.py``): right for a tensor-parallel slice
``[W_i; V_i]``, wrong for an FSDP2 slice, which holds a run of consecutive rows of ``[W; V]`` (at DP 2 rank 0 holds
all of W, rank 1 all of V), so the rows land permuted: a same-size resume reads them back the same way, any other
layout reads wrong weights. :func:`apply_swiglu_sharded_factory` (the ``FSDP2_SWIGLU_SHARDS`` row) splits an FSDP2
slice where it crosses from W rows to V rows instead.

The optimizer's per-parameter states (Adam moments, fp32 master weights) reuse the parameter's records, so they
reshard the same way. FSDP2 checkpoints recorded this way say so in their metadata
(:data:`megatron_puffin.training.resume.FSDP2_RECORDS_KEY`); older ones saved at DP > 1 are refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

# (axis, chunk index, number of chunks): megatron-core's notation for a prepended (e.g. stacked-layer) axis.
RankOffset = Tuple[int, int, int]

# Every megatron-core module that bound the helpers by name (``from megatron.core.utils import ...``).
SHARDED_TENSOR_MODULES: Tuple[str, ...] = (
    "megatron.core.utils",
    "megatron.core.transformer.utils",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.transformer.multi_token_prediction",
    "megatron.core.transformer.moe.shared_experts",
)
SWIGLU_MODULES: Tuple[str, ...] = ("megatron.core.transformer.mlp", "megatron.core.transformer.moe.experts")
HELPERS = ("make_sharded_tensor_for_checkpoint", "make_tp_sharded_tensor_for_checkpoint")


@dataclass
class DTensorShardedTensor(ShardedTensor):
    """A ``ShardedTensor`` describing the local slice of an FSDP2 (DTensor) parameter, or an optimizer state of
    one (``dataclasses.replace`` keeps the class). The class tells :func:`apply_swiglu_sharded_factory` that the
    slice is a run of rows of the tensor-parallel tensor, not a whole tensor-parallel slice.

    Attributes:
        tensor_parallel_size: the number of tensor-parallel slices the global tensor is made of along dim 0 of the
            parameter (1 unless tensor-parallel along that axis).
    """

    tensor_parallel_size: int = 1


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP2 parameter)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_rows(dtensor) -> Tuple[int, int, int]:
    """``(dim, first, count)``: this rank's slice of the DTensor's sharded dim, as FSDP2 (``torch.chunk``) splits it.

    Raises:
        ValueError: a layout FSDP2 does not produce (a mesh of more than one dimension, a placement other than
            ``Shard``).
    """
    mesh, placements = dtensor.device_mesh, dtensor.placements
    if mesh.ndim != 1:
        raise ValueError(f"checkpointing a DTensor on a {mesh.ndim}-dimensional device mesh is not supported "
                         "(--use-torch-fsdp2 shards over one data-parallel mesh dimension)")
    placement = placements[0]
    if not placement.is_shard():
        raise ValueError(f"checkpointing a DTensor placed {placement} is not supported (FSDP2 places every "
                         "parameter as Shard(0))")
    dim, rows, ranks = placement.dim, dtensor.shape[placement.dim], mesh.size()
    per_rank = -(-rows // ranks)
    first = min(mesh.get_local_rank() * per_rank, rows)
    count = min(rows, first + per_rank) - first
    assert count == dtensor._local_tensor.shape[dim], (dtensor.shape, dtensor._local_tensor.shape, dim, ranks)
    return dim, first, count


def dtensor_sharded_tensor(key: str, dtensor, prepend_offsets: Sequence[RankOffset] = (),
                           replica_id: Any = (0, 0, 0), tensor_parallel: Optional[RankOffset] = None,
                           **kwargs: Any) -> DTensorShardedTensor:
    """The record of a DTensor's local slice: its own rows at their offset in the parameter's global shape.

    Args:
        key: the checkpoint key.
        dtensor: the parameter (or a DTensor laid out like it).
        prepend_offsets: megatron-core's prepended axes (e.g. the layer index of a stacked layer).
        replica_id: megatron-core's replica id (which rank writes a replicated record).
        tensor_parallel: ``(axis of the local tensor, tp rank, tp size)`` when the parameter is a tensor-parallel
            slice of a larger tensor along that axis.
        **kwargs: passed to ``ShardedTensor`` (e.g. ``allow_shape_mismatch``).

    Returns:
        A regular-grid record when the sharded dim divides evenly (what megatron-core records then, too), an
        irregular one otherwise.
    """
    local = dtensor._local_tensor
    prepend = len(prepend_offsets)
    shape = [1] * prepend + list(dtensor.shape)
    offset = [0] * len(shape)
    fragments = [1] * len(shape)
    for axis, index, count in prepend_offsets:
        shape[axis], offset[axis], fragments[axis] = count, index, count
    dim, first, _ = local_rows(dtensor)
    offset[prepend + dim] = first
    fragments[prepend + dim] = dtensor.device_mesh.size()
    tp_size = 1
    if tensor_parallel is not None:
        tp_axis, tp_rank, tp_size = tensor_parallel
        axis = prepend + tp_axis
        offset[axis] += tp_rank * shape[axis]
        shape[axis] *= tp_size
        fragments[axis] *= tp_size
    regular = all(rows % count == 0 for rows, count in zip(shape, fragments))
    return DTensorShardedTensor(key, local, local.dtype, tuple(local.shape), tuple(shape), tuple(offset),
                                tuple(fragments) if regular else None, replica_id, prepend,
                                tensor_parallel_size=tp_size if tensor_parallel and tensor_parallel[0] == 0 else 1,
                                **kwargs)


@dataclass
class DTensorShardFactory(ShardedTensorFactory):
    """An FSDP2 record that megatron-core cannot write as it is (see :func:`checkpointable`), wrapped so that it is
    written folded (:func:`folded`); ``record`` keeps its geometry for :func:`apply_swiglu_sharded_factory`."""

    record: Optional[DTensorShardedTensor] = None


def folded(record: ShardedTensor, key: str, data: torch.Tensor, replica_id: Any, first_row: int = 0,
           rows: Optional[int] = None, row_offset: Optional[int] = None,
           global_rows: Optional[int] = None) -> ShardedTensor:
    """An irregular-grid record with its prepended axes turned into leading dims of size 1 of a view of ``data``.

    megatron-core 0.16.1 writes irregular grids through ``CheckpointableShardedTensor``, which ignores
    ``prepend_axis_num`` (a stacked layer's irregular record fails in torch's save planner); the checkpoint sees the
    same global tensor and the same chunk either way. ``first_row``/``rows`` take a run of rows of ``data`` (dim 0
    of the parameter), placed at ``row_offset`` of a global dim of ``global_rows`` (default: the record's own).
    """
    prepend = record.prepend_axis_num
    rows = data.shape[0] if rows is None else rows
    part = data.narrow(0, first_row, rows) if data.ndim else data
    shape, offset = list(record.global_shape), list(record.global_offset)
    if row_offset is not None:
        offset[prepend] = row_offset
    if global_rows is not None:
        shape[prepend] = global_rows
    part = part.reshape((1,) * prepend + tuple(part.shape))
    return ShardedTensor(key, part, part.dtype, tuple(part.shape), tuple(shape), tuple(offset), None, replica_id,
                         0, allow_shape_mismatch=record.allow_shape_mismatch)


def _unfold(loaded: torch.Tensor, like: ShardedTensor) -> torch.Tensor:
    return loaded.reshape(loaded.shape[like.prepend_axis_num:])


def checkpointable(record: DTensorShardedTensor):
    """The record itself, or (irregular grid with prepended axes) a :class:`DTensorShardFactory` writing it
    :func:`folded`."""
    if record.has_regular_grid or record.prepend_axis_num == 0:
        return record

    def build(key: str, tensor: torch.Tensor, replica_id: Any, flattened_range: Optional[slice]) -> ShardedTensor:
        return folded(record, key, tensor, replica_id)

    def merge(loaded: torch.Tensor) -> torch.Tensor:
        return _unfold(loaded, record)

    return DTensorShardFactory(record.key, record.data, build, merge, record.replica_id, record=record)


def _tp_group(kwargs: dict):
    """The tensor-parallel group as megatron-core's helpers choose it (popping both group kwargs)."""
    from megatron.core import parallel_state

    tp_group, dp_cp_group = kwargs.pop("tp_group", None), kwargs.pop("dp_cp_group", None)
    if tp_group is None and dp_cp_group is None:
        tp_group = parallel_state.get_tensor_model_parallel_group()
    return tp_group


def _sharded_tensor_helpers() -> Tuple[Callable, Callable]:
    """The two replacements, each falling back to megatron-core's original for a plain tensor."""
    from megatron.core import utils
    from megatron.core.utils import get_pg_rank, get_pg_size

    original_plain, original_tp = utils.make_sharded_tensor_for_checkpoint, utils.make_tp_sharded_tensor_for_checkpoint

    def make_sharded_tensor_for_checkpoint(tensor, key, prepend_offsets=(), replica_id=None, **kwargs):
        """megatron-core's helper (replicated over TP), with FSDP2 slices recorded where they are."""
        if not is_dtensor(tensor):
            return original_plain(tensor, key, prepend_offsets, replica_id, **kwargs)
        tp_group = _tp_group(kwargs)
        replica_id = (0, get_pg_rank(tp_group), 0) if replica_id is None else replica_id
        return checkpointable(dtensor_sharded_tensor(key, tensor, prepend_offsets, replica_id, **kwargs))

    def make_tp_sharded_tensor_for_checkpoint(tensor, key, tp_axis=0, replica_id=None, prepend_offsets=(),
                                              **kwargs):
        """megatron-core's helper (sliced over TP along ``tp_axis``), with FSDP2 slices recorded where they are."""
        if not is_dtensor(tensor):
            return original_tp(tensor, key, tp_axis, replica_id, prepend_offsets, **kwargs)
        tp_group = _tp_group(kwargs)
        tensor_parallel = (tp_axis, get_pg_rank(tp_group), get_pg_size(tp_group))
        replica_id = (0, 0, 0) if replica_id is None else replica_id
        return checkpointable(dtensor_sharded_tensor(key, tensor, prepend_offsets, replica_id, tensor_parallel,
                                                     **kwargs))

    return make_sharded_tensor_for_checkpoint, make_tp_sharded_tensor_for_checkpoint


def sharded_tensor_replacements() -> list:
    """The ``FSDP2_CHECKPOINT_SHARDS`` row of :data:`megatron_puffin.platform.PATCHES`: both helpers, in every module
    that bound them (:data:`SHARDED_TENSOR_MODULES`)."""
    import importlib

    replacements = dict(zip(HELPERS, _sharded_tensor_helpers()))
    triples = []
    for name in SHARDED_TENSOR_MODULES:
        module = importlib.import_module(name)
        triples += [(module, helper, replacements[helper]) for helper in HELPERS if hasattr(module, helper)]
    return triples


def _swiglu_parts(record: DTensorShardedTensor, axis: int) -> List[Tuple[str, int, int, int, int]]:
    """``(half, first local row, row count, offset in the half, rows of the half)`` of the W and V parts of an FSDP2
    slice of a ``[W; V]`` weight (the half's rows: all W rows of every TP slice, or all V rows); an empty W part for
    a rank that holds no rows (every rank must describe the key)."""
    tp_size = record.tensor_parallel_size
    rows = record.global_shape[axis] // tp_size  # [W_i; V_i] of one TP slice
    half = rows // 2
    tp_rank, first = divmod(record.global_offset[axis], rows)
    end = first + record.local_shape[0]
    parts = []
    for name, start, stop, base in (("w", first, min(end, half), 0), ("v", max(first, half), end, half)):
        if stop > start:
            parts.append((name, start - first, stop - start, tp_rank * half + start - base, tp_size * half))
    return parts or [("w", 0, 0, min(tp_rank * half + first, tp_size * half), tp_size * half)]


def _dtensor_swiglu_factory(record: DTensorShardedTensor, sharded_offsets: Sequence[RankOffset],
                            singleton_local_shards: bool) -> ShardedTensorFactory:
    """megatron-core's SwiGLU factory contract (one key holding all W rows, then all V rows; or keys ``_w`` and
    ``_v`` with ``singleton_local_shards``) for an FSDP2 slice: each part is the slice's rows of that half, written
    :func:`folded`."""
    axis = len(sharded_offsets)
    assert record.prepend_axis_num == axis, (record, sharded_offsets)
    parts = _swiglu_parts(record, axis)

    def build(key: str, tensor: torch.Tensor, replica_id: Any, flattened_range: Optional[slice]) -> list:
        built = []
        for name, first, count, offset, rows in parts:
            if singleton_local_shards:
                built.append(folded(record, f"{key}_{name}", tensor, replica_id, first, count, offset, rows))
            else:
                base = rows if name == "v" else 0
                built.append(folded(record, key, tensor, replica_id, first, count, base + offset, 2 * rows))
        return built

    def merge(loaded: list) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([_unfold(part, record) for part in loaded])

    return ShardedTensorFactory(record.key, record.data, build, merge, record.replica_id)


def swiglu_replacements() -> list:
    """The ``FSDP2_SWIGLU_SHARDS`` row of :data:`megatron_puffin.platform.PATCHES`: megatron-core's
    ``apply_swiglu_sharded_factory`` in every module that bound it (:data:`SWIGLU_MODULES`), with FSDP2 slices
    split by :func:`_dtensor_swiglu_factory`."""
    import importlib

    from megatron.core.transformer import mlp

    original = mlp.apply_swiglu_sharded_factory

    def apply_swiglu_sharded_factory(original_sh_ten, sharded_offsets, singleton_local_shards: bool = False):
        record = original_sh_ten.record if isinstance(original_sh_ten, DTensorShardFactory) else original_sh_ten
        if isinstance(record, DTensorShardedTensor):
            return _dtensor_swiglu_factory(record, sharded_offsets, singleton_local_shards)
        return original(original_sh_ten, sharded_offsets, singleton_local_shards)

    modules = [importlib.import_module(name) for name in SWIGLU_MODULES]
    return [(module, "apply_swiglu_sharded_factory", apply_swiglu_sharded_factory) for module in modules]


# The builders megatron_puffin.platform's table names; each returns (owner, attribute, replacement) triples.
REPLACEMENTS = {
    "FSDP2_CHECKPOINT_SHARDS": sharded_tensor_replacements,
    "FSDP2_SWIGLU_SHARDS": swiglu_replacements,
}
