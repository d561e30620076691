"""One change of ours switched on in the middle of one process: before, before again, after (ours only).

``bench_training.py``'s model and data (``--real-proportions`` or the toy sizes, its ``--levers`` and other flags),
one ``Trainer``, the same three cycles of task micro-batches in every round. ``--compare``:

* ``host-malloc-cache``: the Trainer is built without ``--host-malloc-cache`` (glibc's malloc defaults), "after"
  calls ``training.host_memory.retain_freed_memory()`` (freed host memory kept for reuse, what the flag does);
* ``compile``: the Trainer is built as without ``--compile`` (eager layers, weight gradients accumulated into
  DDP's buffer), "after" is what ``--compile`` builds: every layer compiled in place and the accumulation off.

Each round runs the cycles ``--repeats`` times after two untimed steps (where "after" compiles). Reported per
round: the median forward+backward time of each task's micro-batch and their sum, the minor page faults and the
system CPU seconds of the round (``getrusage``), and the process's peak resident memory at the end. Neither change
can be undone in a process, so "after" comes last; "before again" shows the drift between rounds without a change.

Usage:
    python benchmarks/bench_ours_ab.py --compare host-malloc-cache --real-proportions --levers all [--repeats 3]
    python benchmarks/bench_ours_ab.py --compare compile --real-proportions --levers cached-latents --clock cpu
"""
from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
from pathlib import Path
from typing import Dict, List

import bench_training as bt  # puffin_bench_common first: it puts tests/ on sys.path
import torch
from bench_flags import positive_int, run_main


def _rusage() -> resource.struct_rusage:
    return resource.getrusage(resource.RUSAGE_SELF)


def _round(trainer, timer, cycles: List[list], repeats: int) -> Dict[str, float]:
    for cycle in cycles[:2]:  # untimed: a compile happens here
        bt._our_step(trainer, timer, cycle)
    before = _rusage()
    times: Dict[str, List[float]] = {}
    for _ in range(repeats):
        for cycle in cycles:
            for batch, seconds in zip(cycle, bt._our_step(trainer, timer, cycle)["micro"]):
                times.setdefault(batch["task"], []).append(seconds)
    after = _rusage()
    medians = {task: statistics.median(values) for task, values in times.items()}
    medians["sum"] = sum(medians.values())
    medians["faults"] = after.ru_minflt - before.ru_minflt
    medians["sys_s"] = after.ru_stime - before.ru_stime
    return medians


def _parse_args() -> argparse.Namespace:
    """``--compare`` and ``--repeats`` with bench_training.py's flags."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("comparison")
    group.add_argument("--compare", required=True, choices=["host-malloc-cache", "compile"],
                       help="the change switched on between the rounds")
    group.add_argument("--repeats", type=positive_int, default=3, help="runs of the cycles per round")
    return bt._parse_args(parser, description=__doc__.split("\n\n")[0])


def _switch_on(compare: str, trainer) -> None:
    if compare == "host-malloc-cache":
        from megatron_puffin.training.host_memory import retain_freed_memory

        if not retain_freed_memory():
            raise SystemExit("the C library is not glibc: nothing to compare")
        return
    from megatron_puffin.models.compile import compile_model

    compile_model(trainer.model)
    for module in trainer.model.modules():  # what the Trainer leaves off under --compile
        if getattr(module, "gradient_accumulation_fusion", False):
            module.gradient_accumulation_fusion = False


def main() -> None:
    args = _parse_args()
    if args.compare in args.levers:
        raise SystemExit(f"--compare {args.compare}: leave it out of --levers (it is the change)")
    repeats = args.repeats
    bt.setup()
    torch.set_num_threads(args.threads)
    from megatron_puffin.config import parse_args
    from megatron_puffin.training.loop import Trainer

    paths = bt.make_dataset(Path(tempfile.mkdtemp(prefix="bench_host_memory_")), args)
    if "cached-latents" in args.levers:
        bt._cache_latents(args, paths)
    trainer = Trainer(parse_args(bt._flags(args, paths)))
    trainer.ddp.train()
    timer = bt._OurTimer(trainer)
    iterator = iter(trainer.loader)
    cycles = [[next(iterator) for _ in range(trainer.micro_batches)] for _ in range(3)]
    rounds = {"before": _round(trainer, timer, cycles, repeats),
              "before again": _round(trainer, timer, cycles, repeats)}
    _switch_on(args.compare, trainer)
    rounds["after"] = _round(trainer, timer, cycles, repeats)
    tasks = [task for task in rounds["before"] if task not in ("sum", "faults", "sys_s")]
    levers = ", ".join(args.levers) or "none"
    print(f"{args.compare}: ours only, {args.clock} clock, threads {torch.get_num_threads()}, levers: {levers}"
          f"; median fwd+bwd seconds per task micro-batch over {repeats} x {len(cycles)} steps per round")
    print(f"{'round':18s} " + " ".join(f"{task[:12]:>12s}" for task in tasks) + f" {'sum':>8s} {'faults':>10s} "
          f"{'sys s':>7s}")
    for name, values in rounds.items():
        print(f"{name:18s} " + " ".join(f"{values[task]:12.3f}" for task in tasks)
              + f" {values['sum']:8.3f} {values['faults']:10d} {values['sys_s']:7.2f}")
    print(f"peak resident memory {_rusage().ru_maxrss / 1024:.0f} MiB")
    print(f"after / before again (sum of the tasks' medians): "
          f"{rounds['after']['sum'] / rounds['before again']['sum']:.3f}")


if __name__ == "__main__":
    run_main(main)
