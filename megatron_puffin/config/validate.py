"""The one validation step: every rule of every concern is checked and all violations are reported together,
each naming the flag, the value, the rule and a fix. Runs before any process group or model exists."""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Sequence, Tuple, TYPE_CHECKING

import torch

from megatron_puffin.config.dataclass_args import choice_errors
from megatron_puffin.config.tensor_parallel import merge_tensor_parallel_problems
from megatron_puffin.config.validate_paths import PATH_VALIDATORS
from megatron_puffin.config.validate_fp8 import fp8_shape_problems
from megatron_puffin.config.validate_fsdp import FSDP_VALIDATORS
from megatron_puffin.config.validate_pipeline import PIPELINE_VALIDATORS
from megatron_puffin.config.validate_values import VALUE_VALIDATORS, well_formed_stream_tasks
from megatron_puffin.config.validate_eval import validation_errors
from megatron_puffin.models.fp8 import fp8_tower_problems
from megatron_puffin.optional_deps import transformer_engine_error

if TYPE_CHECKING:  # for annotations only
    from megatron_puffin.config.arguments import PuffinArguments


class ConfigError(ValueError):
    """Invalid flags; the message lists every problem found."""

    def __init__(self, problems: List[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{len(self.problems)} configuration error(s):\n{lines}")


def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _fits(flag: str, value: int, tp: int, what: str = "--tensor-model-parallel-size") -> List[str]:
    if value % tp == 0:
        return []
    options = ", ".join(map(str, divisors(value)))
    return [f"{flag} ({value}) must be divisible by {what} ({tp}); use a {what} of {options}"]


_TYPE_WORDS = {"int": "an integer, e.g. 4", "float": "a number, e.g. 1e-4",
               "finite number": "one that is not NaN or infinity, e.g. 1e-4", "str": "a string"}


_RETIRED_FLAGS = {
    "--virtual-pipeline-model-parallel-size": "interleaved pipeline stages are not supported: the composed model is "
    "built as one chunk per stage (the vision tower and meta queries attach to the first chunk, the connectors, MMDiT "
    "and VAE to the last), and interleaving needs a model chunk, data iterator and DDP wrapper per virtual stage; "
    "balance the stages with --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers instead",
    "--num-layers-per-virtual-pipeline-stage": "interleaved pipeline stages are not supported (see "
    "--virtual-pipeline-model-parallel-size); use --decoder-first-pipeline-num-layers / "
    "--decoder-last-pipeline-num-layers",
    "--seq-length": "sequence lengths follow the data (--max-understanding-text-tokens, --max-generation-text-tokens, "
                    "--image-size); drop it",
}


def _unknown_flag(text: str) -> str:
    name = text.split("=", 1)[0]
    if name in _RETIRED_FLAGS:
        return f"{name} is not a flag of pretrain_puffin.py: {_RETIRED_FLAGS[name]}"
    return f"unknown flag {text!r}: check the spelling against `pretrain_puffin.py --help`"


def check_parse(args: PuffinArguments) -> List[str]:
    problems = list(getattr(args, "flag_file_problems", ()))
    problems += [_unknown_flag(u) for u, previous in zip(args.unknown, ("",) + tuple(args.unknown))
                 if previous.split("=", 1)[0] not in _RETIRED_FLAGS or u.startswith("-")]  # skip a retired value
    problems += [
        f"{bad.flag} ({bad.text!r}) is not a valid {bad.expected}; give {_TYPE_WORDS.get(bad.expected, bad.expected)}"
        for bad in args.invalid
    ]
    for name, cfg in args.groups.items():
        for flag, value, allowed in choice_errors(type(cfg), cfg):
            problems.append(f"{flag} ({value}) must be one of {', '.join(map(str, allowed))}")
    return problems


def check_positive(args: PuffinArguments) -> List[str]:
    problems = []
    for flag, value in [
        ("--tensor-model-parallel-size", args.parallel.tensor_model_parallel_size),
        ("--pipeline-model-parallel-size", args.parallel.pipeline_model_parallel_size),
        ("--num-layers", args.llm.num_layers),
        ("--hidden-size", args.llm.hidden_size),
        ("--num-attention-heads", args.llm.num_attention_heads),
        ("--num-query-groups", args.llm.num_query_groups),
        ("--micro-batch-size", args.training.micro_batch_size),
    ]:
        if value < 1:
            problems.append(f"{flag} ({value}) must be at least 1")
    return problems


def check_llm_parallel(args: PuffinArguments) -> List[str]:
    """Tensor/pipeline split of the LLM tower."""
    llm, tp, pp = args.llm, args.parallel.tensor_model_parallel_size, args.parallel.pipeline_model_parallel_size
    if min(tp, pp, llm.num_layers, llm.num_attention_heads, llm.num_query_groups, llm.hidden_size) < 1:
        return []  # reported by check_positive
    problems = _fits("--num-attention-heads", llm.num_attention_heads, tp)
    problems += _fits("--ffn-hidden-size", llm.ffn_hidden_size, tp)
    groups = llm.num_query_groups
    if groups % tp and tp % groups:
        problems.append(
            f"--num-query-groups ({groups}) must be a multiple or a divisor of --tensor-model-parallel-size ({tp}); "
            f"use a --tensor-model-parallel-size of {', '.join(map(str, divisors(groups)))} or a multiple of {groups}"
        )
    if llm.num_attention_heads % groups:
        problems.append(
            f"--num-attention-heads ({llm.num_attention_heads}) must be divisible by --num-query-groups ({groups})"
        )
    if llm.kv_channels is None and llm.hidden_size % llm.num_attention_heads:
        problems.append(
            f"--hidden-size ({llm.hidden_size}) must be divisible by --num-attention-heads "
            f"({llm.num_attention_heads}), or set --kv-channels"
        )
    if pp > llm.num_layers:
        problems.append(f"--pipeline-model-parallel-size ({pp}) must not exceed --num-layers ({llm.num_layers})")
    elif llm.num_layers % pp and args.parallel.decoder_first_pipeline_num_layers is None and \
            args.parallel.decoder_last_pipeline_num_layers is None:
        problems.append(
            f"--num-layers ({llm.num_layers}) must be divisible by --pipeline-model-parallel-size ({pp}); "
            f"use a --pipeline-model-parallel-size of {', '.join(map(str, divisors(llm.num_layers)))}, or place "
            f"the layers unevenly with --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers"
        )
    return problems


def check_world(args: PuffinArguments) -> List[str]:
    tp, pp = args.parallel.tensor_model_parallel_size, args.parallel.pipeline_model_parallel_size
    world = args.world_size
    if tp < 1 or pp < 1 or world % (tp * pp) == 0:
        return []
    return [
        f"world size ({world}) must be divisible by --tensor-model-parallel-size x --pipeline-model-parallel-size "
        f"({tp} x {pp} = {tp * pp}); launch a multiple of {tp * pp} processes or change the parallel sizes"
    ]


def check_precision(args: PuffinArguments) -> List[str]:
    precision, problems = args.precision, []
    if precision.bf16 and precision.fp16:
        problems.append("--bf16 and --fp16 are mutually exclusive; choose one")
    # A dry run plans a GPU job from anywhere (a login node without CUDA): Transformer Engine is not required here;
    # the layout says whether it is usable on this machine.
    te_reason = None if args.dry_run else transformer_engine_error()
    if precision.fp8_format and te_reason:
        problems.append(
            f"--fp8-format ({precision.fp8_format}) needs Transformer Engine with CUDA, but {te_reason} "
            "(megatron-core would silently ignore FP8); drop --fp8-format or run on a GPU with transformer-engine"
        )
    if precision.fp8_format and precision.transformer_impl != "transformer_engine":
        problems.append(
            f"--fp8-format ({precision.fp8_format}) needs --transformer-impl transformer_engine "
            f"(got {precision.transformer_impl})"
        )
    if precision.fp8_format and not precision.bf16:
        problems.append(f"--fp8-format ({precision.fp8_format}) needs --bf16 for the non-FP8 parts; add --bf16")
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    problems += fp8_tower_problems(precision.fp8_format, precision.fp8_recipe, precision.fp8_tower, capability)
    if precision.fp8_format:
        problems += fp8_shape_problems(args, precision.fp8_tower)
    if precision.transformer_impl == "transformer_engine" and te_reason:
        problems.append(
            f"--transformer-impl transformer_engine needs Transformer Engine with CUDA, but {te_reason}; "
            "use --transformer-impl local"
        )
    return problems


def check_sequence_parallel(args: PuffinArguments) -> List[str]:
    """``--sequence-parallel`` needs TP > 1, and the meta queries (the connectors' and the DiT's text sequence,
    split unpadded) in a count TP divides."""
    tp = args.parallel.tensor_model_parallel_size
    if not args.parallel.sequence_parallel or not isinstance(tp, int) or tp < 1:
        return []
    if tp == 1:
        return ["--sequence-parallel has no effect with --tensor-model-parallel-size 1; drop it"]
    num_queries = args.connector.num_queries
    if isinstance(num_queries, int) and num_queries > 0 and num_queries % tp:
        return [
            f"--connector-num-queries ({num_queries}) must be divisible by --tensor-model-parallel-size ({tp}) with "
            f"--sequence-parallel (the connectors and the DiT split the query sequence over TP); use a TP of "
            f"{', '.join(map(str, divisors(num_queries)))}, or drop --sequence-parallel"
        ]
    return []


def check_training(args: PuffinArguments) -> List[str]:
    training, problems = args.training, []
    if training.min_lr > training.lr:
        problems.append(f"--min-lr ({training.min_lr}) must not exceed --lr ({training.lr})")
    if training.train_iters < 1:
        problems.append(f"--train-iters ({training.train_iters}) must be at least 1")
    if training.max_consecutive_skipped_steps < 1:
        problems.append(
            f"--max-consecutive-skipped-steps ({training.max_consecutive_skipped_steps}) must be at least 1"
        )
    if training.exit_interval is not None and training.exit_interval < 1:
        problems.append(f"--exit-interval ({training.exit_interval}) must be at least 1")
    if args.logging.log_interval < 1:
        problems.append(f"--log-interval ({args.logging.log_interval}) must be at least 1")
    return problems + check_step(args)


def check_step(args: PuffinArguments) -> List[str]:
    """Micro-batches per optimizer step and the global batch against the task streams' cycle."""
    from megatron_puffin.data.config import parse_task_stream

    training, problems = args.training, []
    try:
        specs = [parse_task_stream(spec) for spec in args.data.task_stream]
    except ValueError:
        return []  # reported by check_data
    if not specs:
        return []
    dp = args.data_parallel_size
    cycle = sum(spec.repeats for spec in specs)
    cycle_samples = sum(spec.repeats * spec.micro_batch_size for spec in specs) * dp
    mbps, gbs = training.micro_batches_per_step, training.global_batch_size
    if mbps is not None and mbps < 1:
        problems.append(f"--micro-batches-per-step ({mbps}) must be at least 1")
    if gbs is not None:
        if gbs < 1 or gbs % cycle_samples:
            problems.append(
                f"--global-batch-size ({gbs}) must be a whole number of task-stream cycles: one cycle is "
                f"{cycle_samples} samples (sum of REPEATS x MICRO_BATCH_SIZE over the --task-stream flags, x "
                f"data-parallel size {dp}); use a multiple of {cycle_samples}, or set --micro-batches-per-step instead"
            )
        elif mbps is not None and mbps != gbs // cycle_samples * cycle:
            problems.append(
                f"--global-batch-size ({gbs}) means {gbs // cycle_samples * cycle} micro-batches per step, but "
                f"--micro-batches-per-step is {mbps}; give only one of them"
            )
    return problems


def check_generation_needs_vae(args: PuffinArguments) -> List[str]:
    """Generation streams encode images with the VAE: one must be configured."""
    from megatron_puffin.tasks import GENERATION_TASKS, TASK_VARIANTS

    if args.model.vae_path or args.model.vae_config:
        return []
    tasks = [task for task in well_formed_stream_tasks(args.data.task_stream)
             if TASK_VARIANTS[task] in GENERATION_TASKS]
    if not tasks:
        return []
    return [f"--task-stream {', '.join(tasks)} (generation) needs the VAE: add --vae-path DIR (SD3's vae/ folder) "
            "or --vae-config FILE (a random tiny VAE)"]


def check_checkpoint(args: PuffinArguments) -> List[str]:
    ckpt, problems = args.checkpoint, []
    if ckpt.save_interval is not None and ckpt.save is None:
        problems.append(f"--save-interval ({ckpt.save_interval}) has no effect without --save DIR; add --save")
    if ckpt.keep_last_n is not None and ckpt.keep_last_n < 1:
        problems.append(f"--keep-last-n ({ckpt.keep_last_n}) must be at least 1")
    return problems


def check_towers(args: PuffinArguments) -> List[str]:
    """Rules owned by the tower and diffusion configs themselves."""
    tp = args.parallel.tensor_model_parallel_size
    if tp < 1:
        return []  # reported by check_positive
    problems = args.dit.validate(tp) + args.vision.validate(tp) + args.connector.validate(tp)
    return problems + args.flow.validate() + args.model.validate()


def check_data(args: PuffinArguments) -> List[str]:
    """Task streams and tokenizer; paths must exist except with --dry-run (a cluster config checked elsewhere)."""
    from megatron_puffin.data.config import data_config_errors

    patch, fold = args.vision.patch_size, args.vision.fold_size
    if patch < 1 or fold < 1:
        patch = fold = None  # reported by the vision config
    return data_config_errors(args.data, check_paths=not args.dry_run, vision_patch_size=patch, vision_fold=fold)


def check_trained_towers(args: PuffinArguments) -> List[str]:
    """A stream whose task would train nothing (every tower it uses frozen) is a mistake, not a silent no-op.
    Only text2text can be: understanding tasks always train the projector, generation tasks the queries."""
    from megatron_puffin.data.config import parse_task_stream

    if not args.model.freeze_llm:
        return []
    tasks = []
    for spec in args.data.task_stream:
        try:
            tasks.append(parse_task_stream(spec).task)
        except ValueError:
            continue
    if "text2text" not in tasks:
        return []
    return ["--task-stream text2text trains only the LLM, which --freeze-llm freezes: the stream would train "
            "nothing; drop --freeze-llm or that stream"]


def check_validation(args: PuffinArguments) -> List[str]:
    """Validation streams and intervals (see megatron_puffin.config.validate_eval)."""
    return validation_errors(args)


def check_compile(args: PuffinArguments) -> List[str]:
    """--compile needs a working inductor backend here (a C++ compiler on CPU, triton on CUDA)."""
    return args.compile.validate()


VALIDATORS: List[Callable] = [
    check_parse,
    check_positive,
    check_llm_parallel,
    check_world,
    check_precision,
    check_sequence_parallel,
    check_training,
    check_checkpoint,
    check_towers,
    check_data,
    check_generation_needs_vae,
    check_trained_towers,
    *VALUE_VALIDATORS,
    *PIPELINE_VALIDATORS,
    *FSDP_VALIDATORS,
    *PATH_VALIDATORS,
    check_validation,
    check_compile,
]


PATH_CHECKS: List[Callable] = [check_data, *PATH_VALIDATORS, check_validation]
"""The validators that read the file system (data, tokenizer, VAE files, outputs); --dry-run skips their path
checks, since it describes a cluster's configuration from any machine."""


def path_problems(args: PuffinArguments, checks: Sequence[Callable] = PATH_CHECKS) -> List[str]:
    """What ``checks`` find on this machine for a ``--dry-run``'s flags, checked as a real run would (see
    :func:`megatron_puffin.training.preflight.path_problems_here`, which adds the checkpoints' checks)."""
    problems, _ = _run(checks, dataclasses.replace(args, dry_run=False))  # a crash: a value the dry run reports
    return problems


def _run(validators: Sequence[Callable], args: PuffinArguments) -> Tuple[List[str], List[Exception]]:
    """Every validator's problems, and the errors of those that crashed on a bad value (a consequence of a bad
    value another validator reports)."""
    problems: List[str] = []
    crashes: List[Exception] = []
    for validator in validators:
        try:
            problems.extend(validator(args))
        except (ArithmeticError, TypeError, ValueError, AttributeError) as error:
            crashes.append(error)
    return problems, crashes


def validate_args(args: PuffinArguments, validators: Sequence[Callable] = VALIDATORS) -> None:
    """Run ``validators`` (default: every check of the flags and the files they name; a run adds those of its
    checkpoints, :func:`megatron_puffin.training.preflight.validate_run`); raise :class:`ConfigError` listing all
    problems if there is any."""
    problems, crashes = _run(validators, args)
    if crashes and not problems:  # nothing explains it: a bug in a validator, not a user mistake
        raise crashes[0]
    problems = merge_tensor_parallel_problems(args, problems, (check_llm_parallel, check_towers))
    if problems:
        raise ConfigError(problems)
