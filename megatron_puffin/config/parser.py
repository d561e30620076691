"""Parse flags (command line and ``@flagfile``\\ s) into :class:`~megatron_puffin.config.arguments.PuffinArguments`,
then validate them once (:func:`~megatron_puffin.config.validate.validate_args`)."""
from __future__ import annotations

from typing import List, Optional, Sequence

from megatron_puffin.config.arguments import CONFIG_GROUPS, PuffinArguments
from megatron_puffin.config.dataclass_args import FlagFileParser, InvalidValue, add_dataclass_group, build_dataclass
from megatron_puffin.config.validate import validate_args


def build_parser(prog: Optional[str] = None) -> FlagFileParser:
    """The parser of ``pretrain_puffin.py``: one group per configuration dataclass."""
    parser = FlagFileParser(
        prog=prog,
        description="Train Puffin on megatron-core. Flags may come from @flagfiles (# comments, several flags per "
        "line); later flags override earlier ones.",
    )
    for _, cls, title in CONFIG_GROUPS:
        add_dataclass_group(parser, cls, title)
    run = parser.add_argument_group("run")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the configuration, print the parallel layout, parameter counts and a memory estimate, "
        "and exit without creating process groups or models",
    )
    return parser


def with_default_micro_batch(spec: str, micro_batch_size: int) -> str:
    """``TASK:PATH`` (no MICRO_BATCH_SIZE) -> ``TASK:PATH:<--micro-batch-size>``; complete specs are unchanged."""
    task, separator, rest = spec.partition(":")
    if not separator or not rest or rest.rsplit(":", 1)[-1].lstrip("+-").isdigit():
        return spec
    return f"{spec}:{micro_batch_size}"


def parse_args(argv: Optional[Sequence[str]] = None, validate: bool = True) -> PuffinArguments:
    """Parse ``argv`` (default ``sys.argv[1:]``) and, unless ``validate=False``, run :func:`validate_args`,
    which raises one ``ValueError`` listing every mistake of the flags and the files they name. A run's entry point
    adds the checks of the checkpoints it reads: :func:`megatron_puffin.training.preflight.parse_run_args`."""
    parser = build_parser()
    namespace, unknown = parser.parse_known_args(argv)
    invalid: List[InvalidValue] = []
    groups = {name: build_dataclass(cls, namespace, invalid) for name, cls, _ in CONFIG_GROUPS}
    args = PuffinArguments(**groups, dry_run=namespace.dry_run, unknown=tuple(unknown), invalid=tuple(invalid),
                           flag_file_problems=tuple(parser.flag_file_problems))
    args.data.task_stream = [
        with_default_micro_batch(spec, args.training.micro_batch_size) for spec in args.data.task_stream
    ]
    args.validation.valid_task_stream = [
        with_default_micro_batch(spec, args.training.micro_batch_size) for spec in args.validation.valid_task_stream
    ]
    if validate:
        validate_args(args)
    return args
