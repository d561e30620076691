"""Every check a run makes before it starts anything: the flags' own (:mod:`megatron_puffin.config.validate`) and
those of the checkpoints it will read, which need this package's checkpoint code.

The checkpoints given to --load, --pretrained-checkpoint and the tower flags are of the kind their flag loads, hold
towers of the shapes the flags give and were trained with the --tokenizer given (all read from their
``puffin_meta.json``: nothing is unpickled); what --load and --save hold is decided by
:func:`megatron_puffin.training.resume.startup_problems`. Entry points parse their flags with :func:`parse_run_args`
(or call :func:`validate_run`), so one :class:`~megatron_puffin.config.ConfigError` lists every mistake before any
process group exists.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megatron_puffin import checkpointing as ckpt
from megatron_puffin.checkpoint_safety import CheckpointError
from megatron_puffin.config.arguments import PuffinArguments
from megatron_puffin.config.dataclass_args import flag_name
from megatron_puffin.config.parser import parse_args
from megatron_puffin.config.validate import PATH_CHECKS, VALIDATORS, path_problems, validate_args
from megatron_puffin.config.validate_paths import flag_tokenizer
from megatron_puffin.data.tokenizer import identity_difference
from megatron_puffin.training.resume import resolve_load, startup_problems
from megatron_puffin.training.towers import CHECKPOINT_TOWERS


# The flags that give a tower's tensors their shapes, by config group: a checkpoint trained with other values does
# not load (or, for head counts at equal sizes, loads into another computation).
SHAPE_FIELDS: Dict[str, Tuple[str, ...]] = {
    "llm": ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
            "vocab_size", "add_qkv_bias", "tie_word_embeddings"),
    "vision": ("patch_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "max_image_size",
               "class_token_len", "final_norm", "feature_normalizer", "fold_size"),
    "connector": ("num_queries", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
                  "pooled_projection_dim", "joint_attention_dim"),
    "dit": ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim", "num_attention_heads",
            "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "pos_embed_max_size"),
}
# A training checkpoint's towers (its puffin_meta.json "towers") -> the (group, field)s that shape them; the vision
# projector and the meta queries live in the LLM's hidden size.
TOWER_SHAPES: Dict[str, List[Tuple[str, str]]] = {
    "llm": [("llm", name) for name in SHAPE_FIELDS["llm"]],
    "vision": [("vision", name) for name in SHAPE_FIELDS["vision"]] + [("llm", "hidden_size")],
    "queries": [("connector", name) for name in SHAPE_FIELDS["connector"]] + [("llm", "hidden_size")],
    "dit": [("dit", name) for name in SHAPE_FIELDS["dit"]],
}


def _shape_value(group: str, name: str, values: Dict[str, Any]) -> Any:
    """A shape flag's effective value (``--kv-channels`` unset means hidden size / heads)."""
    if group == "llm" and name == "kv_channels" and values.get(name) is None:
        heads = values.get("num_attention_heads") or 0
        return values.get("hidden_size", 0) // heads if heads > 0 else None
    return values.get(name)


def shape_differences(args: PuffinArguments, stored: Dict[str, Dict[str, Any]], pairs: List[Tuple[str, str]]) -> List[str]:
    """``--flag CHECKPOINT (checkpoint) vs NOW (flags)`` for every (group, field) whose stored value differs."""
    differences = []
    for group, name in dict.fromkeys(pairs):  # ordered, without repeats
        if group not in stored or name not in stored[group]:
            continue  # flags of another version: nothing to compare
        config = getattr(args, group)
        then = _shape_value(group, name, stored[group])
        now = _shape_value(group, name, vars(config))
        if then != now:
            field = next(f for f in dataclasses.fields(config) if f.name == name)
            differences.append(f"{flag_name(type(config), field)} {then} (checkpoint) vs {now} (flags)")
    return differences


def checkpoint_shape_problems(args: PuffinArguments, flag: str, directory: str, meta: Dict[str, Any],
                              need_all_towers: bool) -> List[str]:
    """One message listing every shape difference between ``meta`` (a checkpoint's sidecar) and the flags."""
    kind_configs = {"llm": ("llm", "llm_config"), "vision": ("vision", "vision_config"), "dit": ("dit", "dit_config")}
    if meta.get("kind") in kind_configs and isinstance(meta.get(kind_configs[meta["kind"]][1]), dict):
        group, key = kind_configs[meta["kind"]]  # a converted tower checkpoint (tools/convert_checkpoint.py)
        stored = {group: meta[key]}
        if "llm_hidden_size" in meta:
            stored["llm"] = {"hidden_size": meta["llm_hidden_size"]}
        differences = shape_differences(args, stored, TOWER_SHAPES[group])
        towers: List[str] = []
    else:
        stored, towers = meta.get("args"), list(meta.get("towers", CHECKPOINT_TOWERS))
        if not isinstance(stored, dict):
            return []  # no flags stored: the load-time tensor check still compares every shape
        differences = shape_differences(args, stored, [p for t in towers if t in TOWER_SHAPES for p in TOWER_SHAPES[t]])
    missing = [tower for tower in CHECKPOINT_TOWERS if tower not in towers] if need_all_towers else []
    if missing:
        differences.append(f"it holds no {', '.join(missing)} tower (towers: {', '.join(towers) or 'none'}), which a "
                           f"resume needs; start from it with --pretrained-checkpoint {directory} instead")
    if not differences:
        return []
    return [f"{flag} {directory} holds a model of another shape than the flags give: {'; '.join(differences)}. Give "
            "the checkpoint's values (its puffin_meta.json holds them), or another checkpoint"]


def _checkpoint_sources(args: PuffinArguments) -> List[Tuple[str, str, bool]]:
    """(flag, checkpoint directory, needs every tower) of each checkpoint this run loads weights from; paths that do
    not resolve to an undamaged checkpoint are left out (the checkpoint decisions report them)."""
    sources = []
    ckpt_args = args.checkpoint
    try:
        resumed = resolve_load(args)
        if resumed is not None:
            sources.append(("--load", resumed, True))
    except CheckpointError:
        pass
    for flag, path in ckpt_args.weight_sources():
        if not path or not Path(path).is_dir():
            continue
        try:
            directory = ckpt.resolve_checkpoint(path)
        except CheckpointError:
            continue
        if directory is not None and not ckpt.checkpoint_problems(directory):
            sources.append((flag, directory, False))
    return sources


def _checkpoint_metadata(args: PuffinArguments) -> List[Tuple[str, str, bool, Dict[str, Any]]]:
    """:func:`_checkpoint_sources` with each checkpoint's ``puffin_meta.json`` (JSON; nothing is unpickled); ones
    whose sidecar cannot be read are left out (the checkpoint decisions report them)."""
    found = []
    for flag, directory, need_all_towers in _checkpoint_sources(args):
        try:
            found.append((flag, directory, need_all_towers, ckpt.read_metadata(directory) or {}))
        except CheckpointError:
            continue
    return found


TOWER_CHECKPOINT_KINDS = {"--llm-checkpoint": "llm", "--vision-checkpoint": "vision", "--dit-checkpoint": "dit"}
"""Tower flag -> the ``kind`` tools/convert_checkpoint.py records in the checkpoints it writes for it."""


def _kind_problem(args: PuffinArguments, flag: str, directory: str, meta: Dict[str, Any]) -> Optional[str]:
    """Whether a checkpoint is of the kind its flag loads (its ``puffin_meta.json`` ``kind``): a converted tower for
    its own tower flag, a whole model (``puffin``) for --load / --pretrained-checkpoint."""
    kind = meta.get("kind")
    expected = TOWER_CHECKPOINT_KINDS.get(flag, "puffin")
    if kind is None or kind == expected:
        return None
    given = getattr(args.checkpoint, flag[2:].replace("-", "_"), None) if flag in TOWER_CHECKPOINT_KINDS else None
    if given and os.path.realpath(directory) != os.path.realpath(given):
        return None  # a run directory given for a tower: check_input_checkpoints names it (no metadata.json there)
    if kind == "puffin":
        return (f"{flag} ({directory}) is a whole Puffin checkpoint, not a converted {expected} tower; start from it "
                f"with --pretrained-checkpoint {directory}")
    if kind in TOWER_CHECKPOINT_KINDS.values():
        return (f"{flag} ({directory}) holds the {kind} tower alone (tools/convert_checkpoint.py); give it as "
                f"--{kind}-checkpoint {directory}")
    return (f"{flag} ({directory}) holds a checkpoint of kind {kind!r}, which this version does not know; give a "
            "pretrain_puffin.py checkpoint or one tools/convert_checkpoint.py wrote")


def check_checkpoint_contents(args: PuffinArguments) -> List[str]:
    """Every checkpoint the run loads (--load, --pretrained-checkpoint, the tower checkpoints) is of the kind its flag
    loads (:func:`_kind_problem`: a converted LLM given as --dit-checkpoint was loaded into nothing when
    --pretrained-checkpoint supplied the DiT, else failed on its tensors after the process groups started), holds
    towers of the shape the flags give and was trained with the --tokenizer given (:func:`_tokenizer_problems`), all
    read from its ``puffin_meta.json`` in one pass before any process group exists; the tensors themselves are
    compared again when they load."""
    if args.dry_run:
        return []
    found = _checkpoint_metadata(args)
    problems: List[str] = []
    for flag, directory, need_all_towers, meta in found:
        kind_problem = _kind_problem(args, flag, directory, meta)
        problems += [kind_problem] if kind_problem else checkpoint_shape_problems(args, flag, directory, meta,
                                                                                  need_all_towers)
    return problems + _tokenizer_problems(args, found)


def _tokenizer_problems(args: PuffinArguments, found: List[Tuple[str, str, bool, Dict[str, Any]]]) -> List[str]:
    """A checkpoint among ``found`` whose LLM this run continues (--load, --pretrained-checkpoint) was trained with
    the --tokenizer given (the record its ``puffin_meta.json`` holds, :meth:`~megatron_puffin.data.tokenizer.
    PuffinTokenizer.identity`): the same sizes with another vocabulary pass every shape check and train the embedding
    rows of one word as another's. A tokenizer that does not load or does not fit --vocab-size is the flag checks'
    to report."""
    records = [(flag, directory, meta["tokenizer"]) for flag, directory, _, meta in found
               if flag in ("--load", "--pretrained-checkpoint") and "llm" in meta.get("towers", [])
               and isinstance(meta.get("tokenizer"), dict)]
    if not records:
        return []
    tokenizer, _ = flag_tokenizer(args)  # loaded (and hashed) only when a checkpoint holds a record
    if tokenizer is None or tokenizer.vocab_size > args.llm.vocab_size:
        return []
    current = tokenizer.identity()
    problems = []
    for flag, directory, record in records:
        difference = identity_difference(record, current)
        if difference:
            problems.append(f"{flag} {directory}: {difference}; give --tokenizer {record.get('path')} (or a copy of "
                            "it)")
    return problems


CHECKPOINT_CHECKS = [check_checkpoint_contents, startup_problems]
"""The checks of the checkpoints a run reads, after the flags' own (:data:`~megatron_puffin.config.validate.
VALIDATORS`)."""


def validate_run(args: PuffinArguments) -> None:
    """Every check of the flags and of the checkpoints they name; raise one
    :class:`~megatron_puffin.config.ConfigError` listing all problems if there is any."""
    validate_args(args, [*VALIDATORS, *CHECKPOINT_CHECKS])


def check_checkpoints(args: PuffinArguments) -> None:
    """The checks of the checkpoints ``args`` name (:data:`CHECKPOINT_CHECKS`) alone; raise one
    :class:`~megatron_puffin.config.ConfigError` if there is any problem. The trainer runs them whatever parsed its
    flags: :func:`megatron_puffin.config.parse_args` does not read checkpoints."""
    validate_args(args, CHECKPOINT_CHECKS)


def parse_run_args(argv: Optional[Sequence[str]] = None) -> PuffinArguments:
    """Parse ``argv`` (default ``sys.argv[1:]``) as ``pretrain_puffin.py`` does, then :func:`validate_run`."""
    args = parse_args(argv, validate=False)
    validate_run(args)
    return args


def path_problems_here(args: PuffinArguments) -> List[str]:
    """What the path checks (:data:`~megatron_puffin.config.validate.PATH_CHECKS`, then the checkpoints') find on
    this machine for a ``--dry-run``'s flags, checked as a real run would: the dry run prints them (not fatal), so
    that a configuration checked on the cluster's login node also checks its paths before the job waits in the
    queue."""
    return path_problems(args, [*PATH_CHECKS, *CHECKPOINT_CHECKS])
