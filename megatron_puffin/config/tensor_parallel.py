"""One answer to "which tensor-parallel sizes fit?": TP splits every tower, so the per-flag divisibility messages of
the tower validators are merged into one message listing the sizes that fit all towers together."""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, List, Sequence, TYPE_CHECKING

if TYPE_CHECKING:  # for annotations only
    from megatron_puffin.config.arguments import PuffinArguments

TP_FLAG = "--tensor-model-parallel-size"
_SUGGESTION = re.compile(r"; use a --tensor-model-parallel-size of .*$")


def is_tensor_parallel_problem(problem: str, tensor_model_parallel_size: int) -> bool:
    """A tower rule broken by this TP size (the validators suggest other sizes in such messages)."""
    return f"{TP_FLAG} ({tensor_model_parallel_size})" in problem and bool(_SUGGESTION.search(problem))


def _with_tensor_parallel_size(args: PuffinArguments, size: int):
    return dataclasses.replace(args, parallel=dataclasses.replace(args.parallel, tensor_model_parallel_size=size))


def fitting_sizes(args: PuffinArguments, rules: Sequence[Callable], limit: int = 256) -> List[int]:
    """TP sizes (1..``limit``) for which no rule in ``rules`` reports a tensor-parallel problem."""
    sizes = []
    for size in range(1, limit + 1):
        trial = _with_tensor_parallel_size(args, size)
        if not any(is_tensor_parallel_problem(p, size) for rule in rules for p in rule(trial)):
            sizes.append(size)
    return sizes


def merge_tensor_parallel_problems(args: PuffinArguments, problems: List[str], rules: Sequence[Callable]) -> List[str]:
    """Replace every per-flag "must be divisible by --tensor-model-parallel-size" message by one message naming all
    the broken rules and the sizes that fit every tower (and, of those, the ones the world size allows)."""
    tp = args.parallel.tensor_model_parallel_size
    broken = [p for p in problems if is_tensor_parallel_problem(p, tp)]
    if tp < 1 or not broken:
        return problems
    sizes = fitting_sizes(args, rules, limit=max(tp, 128))
    rules_text = "; ".join(_SUGGESTION.sub("", p) for p in broken)
    message = (f"{TP_FLAG} ({tp}) does not fit every tower: {rules_text}. Sizes that fit all towers together: "
               f"{', '.join(map(str, sizes)) or 'none'}")
    pp, world = args.parallel.pipeline_model_parallel_size, args.world_size
    if pp >= 1 and sizes:
        usable = [s for s in sizes if world % (s * pp) == 0]
        message += (f"; of these, with world size {world} and {'--pipeline-model-parallel-size'} {pp}: "
                    f"{', '.join(map(str, usable)) or 'none (change the world size)'}")
    first = problems.index(broken[0])
    kept = [p for p in problems if p not in broken]
    kept.insert(first, message)
    return kept
