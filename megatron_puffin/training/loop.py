"""The training loop: build, load, train, log, checkpoint, stop cleanly.

One iteration is one optimizer step over ``--micro-batches-per-step`` task micro-batches (default: one cycle of the
task streams), run by megatron-core's schedule for the current pipeline layout. ``--lr`` is the learning rate used
(warm-up and decay by megatron-core's ``OptimizerParamScheduler``, stepped once per optimizer step).

Where the weights come from, in order of precedence:

1. ``--load RUN_DIR`` (or a checkpoint directory): resume everything: model, optimizer, scheduler, data position,
   iteration and counters. The random streams need no state: every random draw of a step derives from (seed,
   iteration, data-parallel rank) or from the sample it belongs to, so a resumed run repeats the uninterrupted one.
2. ``--pretrained-checkpoint``: the towers that checkpoint holds (its ``puffin_meta.json`` lists them), with a
   fresh optimizer, schedule and data position (a stage hand-off).
3. ``--llm-checkpoint`` / ``--vision-checkpoint`` / ``--dit-checkpoint``: a tower's converted base weights, for
   towers the above did not supply.
4. Random initialisation (seeded) for the rest. What came from where is logged.

Stopping: SIGTERM or SIGUSR1 (a scheduler's warning before the time limit), SIGINT (Ctrl-C), SIGHUP,
``--exit-duration-in-mins`` and ``--exit-interval`` save a checkpoint at the next step boundary (all ranks agree
through one all-reduce per step) and return; :data:`EXIT_INTERRUPTED` tells launchers the run is not finished and
should be requeued.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple, TYPE_CHECKING

import torch
import torch.distributed as dist

import megatron_puffin.distributed as mpd
from megatron_puffin import checkpointing as ckpt
from megatron_puffin.config.arguments import micro_batches_per_step
from megatron_puffin.data.config import stream_tasks
from megatron_puffin.distributed.random import derive_seed, seed_everything
from megatron_puffin.files import write_text_atomically
from megatron_puffin.models.extra_state import drop_absent_extra_state, load_model_state
from megatron_puffin.models.puffin import CHECKPOINT_MODULES
from megatron_puffin.process_lifetime import EXIT_INTERRUPTED, STOP_SIGNALS
from megatron_puffin.training.data_parallel import (
    fsdp2_forward_records_kept,
    gathered_parameters,
    restore_dtensor_optimizer_states,
)
from megatron_puffin.training.metrics import Interval, MetricsWriter, Report, peak_memory_gib
from megatron_puffin.training.preflight import check_checkpoints
from megatron_puffin.training.memory_check import (check_memory, is_out_of_memory, micro_batch_sizes,
                                                   out_of_memory_message, release_memory)
from megatron_puffin.training.resume import fsdp2_records_metadata, samples_per_step
from megatron_puffin.training.step import stream_task
from megatron_puffin.training.towers import CHECKPOINT_TOWERS, freeze_towers, trainable_towers

if TYPE_CHECKING:  # for annotations only
    from megatron_puffin.config import PuffinArguments

logger = logging.getLogger(__name__)

EXIT_FINISHED = 0
BAD_SAMPLES = "--max-bad-samples"  # stop reason: too many undecodable samples (the run fails after saving)
DATA_FAILED = "data loader"  # stop reason: workers that kept dying, shards gone (the run fails after saving)
OUT_OF_MEMORY = "out of memory"  # stop reason: a step's memory did not fit (the run fails; saved when alone)
STATUS_FILE = "run_status.json"  # in --save: {"status": "finished" | "interrupted" | "stopped" | "failed", ...}
# The distributed optimizer's state in its canonical per-parameter form, so it loads at any TP/PP/DP layout (the
# megatron-core default for 0.16, fully_sharded_model_space, no longer validates: flattened ranges are rejected).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says why and what to do."""


def _stage_name(args: PuffinArguments) -> str:
    if args.checkpoint.stage_name:
        return args.checkpoint.stage_name
    if args.checkpoint.save:
        return os.path.basename(os.path.normpath(args.checkpoint.save))
    return "unnamed"


@dataclass
class TrainState:
    """Counters stored in every checkpoint (the common, unsharded part)."""

    iteration: int = 0
    consumed: Dict[str, int] = field(default_factory=dict)
    skipped_total: int = 0
    skipped_in_a_row: int = 0
    lineage: List[Dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"iteration": self.iteration, "consumed": dict(self.consumed), "skipped_total": self.skipped_total,
                "skipped_in_a_row": self.skipped_in_a_row, "lineage": list(self.lineage)}

    @classmethod
    def from_dict(cls, state: Dict[str, Any]) -> "TrainState":
        return cls(**state)


class StopFlag:
    """Records the stop signals (:data:`~megatron_puffin.process_lifetime.STOP_SIGNALS`: SIGTERM, SIGUSR1, SIGINT,
    SIGHUP); the loop acts on it at the next step boundary.

    SIGINT is Ctrl-C and SIGHUP the terminal closing (an ssh session lost without tmux): in a terminal they reach
    ``python pretrain_puffin.py`` directly, and torchrun (whose ranks run in sessions of their own) forwards them
    to every rank. Without a handler, SIGINT raised ``KeyboardInterrupt`` wherever the rank was, mid-step or in a
    collective, and SIGHUP ended the rank; either lost every step since the last periodic save.
    """

    SIGNALS = STOP_SIGNALS

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous = {}
        self._ignored, self._last_warning = 0, -math.inf

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.received:  # e.g. a launcher repeating its signal while the checkpoint is written
            self._ignored += 1
            now = time.monotonic()
            if now - self._last_warning >= 5.0:  # Ctrl-C held down sends hundreds a second: one line per 5 s
                self._last_warning = now
                logger.warning("%s received while stopping (%s): ignored (%d so far), the save goes on (SIGKILL "
                               "aborts it, losing the steps since the last checkpoint)",
                               signal.Signals(signum).name, self.received, self._ignored)
            return
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class Trainer:
    """Everything one rank holds for a run; :meth:`train` runs it (see the module docstring).

    ``args`` come checked by :func:`megatron_puffin.config.parse_args` at least. The checks of the checkpoints they
    name (:func:`megatron_puffin.training.preflight.check_checkpoints`, which also keeps a resumed checkpoint's global
    batch when the flags set none) run here again, before any process group: ``pretrain_puffin.py`` ran them with the
    flags' (:func:`~megatron_puffin.training.preflight.parse_run_args`), a program that parsed its flags itself has
    not."""

    def __init__(self, args: PuffinArguments) -> None:
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from megatron_puffin.data import PuffinTokenizer
        from megatron_puffin.config.model import puffin_config
        from megatron_puffin.models.puffin import build_puffin
        from megatron_puffin.training.data_parallel import wire_overlap, wrap_data_parallel
        from megatron_puffin.training.host_memory import cache_for_device
        from megatron_puffin.training.wgrad_accumulation import enable_gradient_accumulation_fusion
        from megatron_puffin.training.optimizer import build_optimizer

        check_checkpoints(args)  # a ConfigError, before the process groups
        self.args = args
        self.start_time = time.time()
        training, parallel = args.training, args.parallel
        self.tokenizer = PuffinTokenizer(args.data.tokenizer)
        self.tokenizer_identity = self.tokenizer.identity()  # recorded in every checkpoint, checked on loading
        if self.tokenizer.vocab_size > args.llm.vocab_size:
            from megatron_puffin.config import ConfigError

            raise ConfigError([f"--vocab-size ({args.llm.vocab_size}) is smaller than the vocabulary of --tokenizer "
                               f"{args.data.tokenizer} ({self.tokenizer.vocab_size}); set --vocab-size "
                               f"{self.tokenizer.vocab_size} or more"])
        check_memory(args)  # a ConfigError, before the process groups (training.memory_check)
        self.ctx = mpd.initialize(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                                  seed=training.seed, timeout_minutes=parallel.distributed_timeout_minutes)
        args.model.image_pad_token_id = self.tokenizer.image_pad_id
        self.config = puffin_config(args)
        self.pg_collection = mpd.process_groups()  # built once; the model and the loop's reductions use it
        self.model = build_puffin(self.config, pre_process=self.ctx.is_first_pipeline_stage,
                                  post_process=self.ctx.is_last_pipeline_stage, pg_collection=self.pg_collection)
        freeze_towers(self.model, args.model)
        if self.ctx.device.type == "cuda":  # megatron-core layers may initialise on the CPU (use_cpu_initialization)
            self.model.cuda(self.ctx.device)
        # Before the first step allocates; forked loader workers inherit it.
        cache_for_device(training.host_malloc_cache, self.ctx.device.type)
        if args.compile.compile:  # in place, per layer: names, DDP buckets and checkpoints are unchanged
            from megatron_puffin.models.compile import compile_model

            compile_model(self.model, dynamic=args.compile.compile_dynamic, backend=args.compile.compile_backend)
        self.ddp = wrap_data_parallel(self.model, parallel, self.pg_collection.dp)
        if not args.compile.compile:  # CPU: weight gradients straight into DDP's buffer (training.wgrad_accumulation)
            enable_gradient_accumulation_fusion(self.ddp)
        # The schedule calls this after the last backward: DP gradient all-reduce and the tied-embedding sum.
        self.model.config.finalize_model_grads_func = finalize_model_grads
        wire_overlap(self.model.config, self.ddp)
        self.optimizer = build_optimizer([self.ddp], training, args.precision, parallel.use_distributed_optimizer)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=training.lr_warmup_init, max_lr=training.lr, min_lr=training.min_lr,
            lr_warmup_steps=training.lr_warmup_iters,
            lr_decay_steps=training.lr_decay_iters or training.train_iters, lr_decay_style=training.lr_decay_style,
            start_wd=training.weight_decay, end_wd=training.weight_decay, wd_incr_steps=training.train_iters,
            wd_incr_style="constant",
            override_opt_param_scheduler=args.checkpoint.override_opt_param_scheduler,
            use_checkpoint_opt_param_scheduler=not args.checkpoint.override_opt_param_scheduler,
        )
        self.dp_group = self.pg_collection.dp
        self.loader = self._build_loader()
        self.tasks = stream_tasks(args.data.streams())
        self.micro_batches = micro_batches_per_step(args)
        self.state = TrainState(consumed={task: 0 for task in self.tasks})
        self.trainable = trainable_towers(args.model)
        self.sources: Dict[str, str] = {}
        self.resumed_from: Optional[str] = None
        self._saved_here: set = set()  # checkpoint directories this process published
        self._load()
        self.is_logging_rank = self.ctx.rank == 0
        self.writer = MetricsWriter(self.tasks, args.logging.tensorboard_dir, args.logging.metrics_file,
                                    active=self.is_logging_rank, start_iteration=self.state.iteration)
        self.stop = StopFlag()
        self.peak_device_tflops = self._measure_peak()
        self.validator = self._build_validator()

    def _build_validator(self):
        """The held-out validation of --valid-task-stream / --eval-interval (None without it)."""
        if self.args.validation.eval_interval is None:
            return None
        from megatron_puffin.config import ConfigError
        from megatron_puffin.data.latents import LatentCacheError
        from megatron_puffin.training.validation import Validator

        try:
            return Validator(self.args, self.tokenizer, self.ctx, self.pg_collection, self._vae_identity())
        except LatentCacheError as error:  # latents of another VAE: one line and exit status 2, as for training
            raise ConfigError([str(error)]) from None

    def validate(self) -> None:
        """One validation of the current weights, logged like a training interval (see training/validation.py)."""
        from megatron_puffin.data.loader import DataLoaderError

        try:
            # --overlap-param-gather leaves the gather to the next forward; --use-torch-fsdp2 keeps no record of the
            # validation's forwards for the next backward's prefetch (ranks decode different images)
            with gathered_parameters(self.ddp), fsdp2_forward_records_kept(self.model):
                result = self.validator.run(self.ddp, self.state.iteration, unwrapped_model=self.model)
        except DataLoaderError as error:  # the validation loader's workers or shards (every rank raises together)
            if self.args.checkpoint.save:  # the step just trained is kept, as when the training data fails
                self.save()
                self._write_status("failed", f"validation {DATA_FAILED}")
            raise TrainingError(f"validation at iteration {self.state.iteration}: {error}. "
                                f"{self._resume_hint()}") from None
        self.writer.write_scalars(result.iteration, result.scalars(), result.line(self.validator.tasks))

    def _build_loader(self):
        from megatron_puffin.config import ConfigError
        from megatron_puffin.data import build_data_loader
        from megatron_puffin.data.latents import LatentCacheError

        args = self.args
        try:
            return build_data_loader(
                args.data, args.training.seed, self.ctx.dp_rank, self.ctx.data_parallel_size,
                vision_patch_size=args.vision.patch_size, vision_fold=args.vision.fold_size,
                num_query_tokens=args.connector.num_queries, tokenizer=self.tokenizer,
                vae_identity=self._vae_identity(),
            )
        except LatentCacheError as error:  # a flag/data mismatch: one line and exit status 2, no traceback
            raise ConfigError([str(error)]) from None

    def _vae_identity(self) -> Optional[Dict[str, Any]]:
        """The VAE that --cached-latents must match (None where this stage holds no VAE, or without the flag)."""
        if not self.args.data.cached_latents or self.model.vae is None:
            return None
        if getattr(self, "_vae_identity_value", None) is None:  # hashes the weights: once for both loaders
            from megatron_puffin.data.latents import vae_identity

            self._vae_identity_value = vae_identity(self.model.vae)
        return self._vae_identity_value

    # -- loading ------------------------------------------------------------------------------------------------
    def _tower_module(self, tower: str) -> Optional[torch.nn.Module]:
        return getattr(self.model, CHECKPOINT_MODULES[tower], None)

    def _load(self) -> None:
        ckpt_args = self.args.checkpoint
        if ckpt_args.load:
            from megatron_puffin.training.resume import resolve_load

            directory = resolve_load(self.args)  # checked at start-up; resolved again here (same answer)
            if directory is not None:
                self._resume(directory)
                return
            # --load DIR --save DIR before DIR's first checkpoint: the first start of a job that always passes both.
            logger.warning("--load %s holds no checkpoint yet: starting from the beginning", ckpt_args.load)
        if ckpt_args.pretrained_checkpoint:
            self._load_pretrained(ckpt_args.pretrained_checkpoint)
        for tower, directory in (("llm", ckpt_args.llm_checkpoint), ("vision", ckpt_args.vision_checkpoint),
                                 ("dit", ckpt_args.dit_checkpoint)):
            if directory and tower not in self.sources:
                module = self._tower_module(tower)
                if module is not None:
                    ckpt.load_module(module, directory, prefix="", what=f"--{tower}-checkpoint")
                self.sources[tower] = f"base checkpoint {directory}"
        for tower in CHECKPOINT_TOWERS:
            self.sources.setdefault(tower, f"random initialisation (seed {self.args.training.seed})")
        self.state.lineage.append(self._lineage_entry())
        if self.ctx.rank == 0:
            for tower in CHECKPOINT_TOWERS:
                logger.info("weights of %-8s <- %s", tower, self.sources[tower])

    def _lineage_entry(self) -> Dict[str, Any]:
        return {"stage": _stage_name(self.args), "save": self.args.checkpoint.save,
                "started_at_iteration": self.state.iteration, "weights": dict(self.sources),
                "train_iters": self.args.training.train_iters}

    def _load_pretrained(self, path: str) -> None:
        directory = ckpt.resolve_checkpoint(path)
        if directory is None:
            raise ckpt.CheckpointMismatch(f"--pretrained-checkpoint {path}: no complete checkpoint there")
        meta = ckpt.read_metadata(directory) or {}
        supplied = meta.get("towers", list(CHECKPOINT_TOWERS))
        for tower in supplied:
            module = self._tower_module(tower)
            if module is not None:
                ckpt.load_module(module, directory, prefix=f"{CHECKPOINT_MODULES[tower]}.",
                                 what="--pretrained-checkpoint")
            self.sources[tower] = f"pretrained checkpoint {directory} (iteration {meta.get('iteration', '?')})"
        self.state.lineage = list(meta.get("lineage", []))

    def _prepare_optimizer_for_load(self) -> None:
        """The distributed optimizer's state_dict() needs existing Adam states (with torch's AdamW, as on CPU, it
        asserts one common 'step'); megatron-core creates placeholder states this way for its own FSDP load path.
        The placeholders are overwritten by the checkpoint's states and fp32 master weights."""
        for sub in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if hasattr(sub, "_init_optimizer_states_with_dummy_values") and not sub.optimizer.state:
                sub._init_optimizer_states_with_dummy_values()

    def _resume(self, directory: str) -> None:
        with torch.no_grad():  # see save(): identities of DTensor shards with --use-torch-fsdp2
            self._resume_state(directory)

    def _resume_state(self, directory: str) -> None:
        model_state = self.model.sharded_state_dict()
        ckpt.check_fits(model_state, directory, "--load")
        drop_absent_extra_state(model_state, ckpt.stored_checkpoint_keys(directory))  # across --transformer-impl
        self._prepare_optimizer_for_load()
        sharded = {
            "model": model_state,
            "optimizer": self.optimizer.sharded_state_dict(
                self.model.sharded_state_dict(), is_loading=True, metadata=OPTIMIZER_METADATA
            ),
        }
        loaded = ckpt.load_checkpoint(sharded, directory)
        load_model_state(self.model, ckpt.as_model_dtensors(self.model, loaded["model"]), f"--load {directory}")
        self.optimizer.load_state_dict(loaded["optimizer"])
        restore_dtensor_optimizer_states(self.optimizer)
        common = ckpt.load_common(directory)
        self.scheduler.load_state_dict(common["scheduler"])
        try:
            self.loader.load_state_dict(common["data"])
        except ValueError as error:  # e.g. a stream's dataset whose sample count changed since the save
            raise ckpt.CheckpointMismatch(
                f"--load {directory}: {error}; point --task-stream at the data it was trained on, or start from its "
                f"weights with a new data order and optimizer: --pretrained-checkpoint {directory}") from None
        self.state = TrainState.from_dict(common["trainer"])
        for task in self.tasks:
            self.state.consumed.setdefault(task, 0)
        self.sources = {tower: f"resumed from {directory}" for tower in CHECKPOINT_TOWERS}
        self.resumed_from = directory
        if self.ctx.rank == 0:
            logger.info("resumed %s at iteration %d (consumed %s)", directory, self.state.iteration,
                        self.state.consumed)

    # -- saving -------------------------------------------------------------------------------------------------
    def _existing_checkpoint(self, directory: str) -> Optional[str]:
        """How to treat an existing ``directory`` for this iteration: None (skip: saved by this process, or the
        checkpoint resumed from with nothing trained since), "replace" (--overwrite-checkpoints) or "damaged"
        (moved aside, kept). Another run's checkpoint without the flag is an error, never silently kept."""
        if directory in self._saved_here:
            return None
        if self.resumed_from and os.path.realpath(directory) == os.path.realpath(self.resumed_from):
            if self.ctx.rank == 0:
                logger.info("%s is the checkpoint this run resumed from (nothing trained since)", directory)
            return None
        if self.args.checkpoint.overwrite_checkpoints:
            return "replace"
        if ckpt.checkpoint_problems(directory):
            return "damaged"
        raise ckpt.CheckpointError(
            f"{directory} already exists and was not written by this run; refusing to keep it in place of the "
            "iteration just trained: save elsewhere, or pass --overwrite-checkpoints to replace it"
        )

    def _newest_checkpoint(self) -> Optional[str]:
        try:
            return ckpt.complete_checkpoints(self.args.checkpoint.save)[-1][1]
        except (OSError, IndexError):
            return None

    def _resume_hint(self) -> str:
        """Where the same command resumes (the newest complete checkpoint of --save), for errors that end a run."""
        if not self.args.checkpoint.save:
            return "No --save was given: nothing of this run is kept"
        newest = self._newest_checkpoint()
        if newest is None:
            return f"No complete checkpoint in {self.args.checkpoint.save} yet: the same command starts over"
        return f"The same command resumes from {newest}, the newest complete checkpoint"

    def save(self) -> str:
        # --overlap-param-gather: the saved weights are the updated ones. no_grad: with --use-torch-fsdp2,
        # DTensor.to_local() returns the very local shard megatron-core's sharded tensors hold only without grad
        # mode (megatron-core matches optimizer states to parameters by that identity).
        with gathered_parameters(self.ddp), torch.no_grad():
            try:
                return self._save()
            except (OSError, ckpt.CheckpointWriteError) as error:  # disk full, a path that stopped being a
                # directory, a lost mount: one line
                save = self.args.checkpoint.save
                reason = error if isinstance(error, ckpt.CheckpointWriteError) else ckpt.write_failure(error, save)
                raise ckpt.CheckpointError(
                    f"writing the checkpoint of iteration {self.state.iteration} to {save} failed: {reason}; the "
                    f"newest complete checkpoint there: {self._newest_checkpoint() or 'none'}"
                ) from None

    def _save(self) -> str:
        directory = ckpt.iteration_directory(self.args.checkpoint.save, self.state.iteration)
        mode = self._existing_checkpoint(directory) if os.path.exists(directory) else "new"
        if mode is None:
            return directory
        sharded = {
            "model": self.model.sharded_state_dict(),
            "optimizer": self.optimizer.sharded_state_dict(
                self.model.sharded_state_dict(), is_loading=False, metadata=OPTIMIZER_METADATA
            ),
            "scheduler": self.scheduler.state_dict(),
            "data": self.loader.state_dict(),
            "trainer": self.state.to_dict(),
        }
        metadata = {
            "kind": "puffin",
            "iteration": self.state.iteration,
            "towers": list(CHECKPOINT_TOWERS),
            "consumed": dict(self.state.consumed),
            "lineage": self.state.lineage,
            "layout": {"tp": self.ctx.tensor_model_parallel_size, "pp": self.ctx.pipeline_model_parallel_size,
                       "dp": self.ctx.data_parallel_size},
            "args": self.args.to_dict(),
            "tokenizer": self.tokenizer_identity,
            "run_directory": os.getcwd(),  # relative paths among "args" are relative to it (inference.stored_path)
            "samples_per_step": samples_per_step(self.args),
            **fsdp2_records_metadata(self.args.parallel),
        }
        start = time.time()
        ckpt.save_checkpoint(sharded, directory, metadata=metadata, replace=mode != "new",
                             keep_replaced=mode == "damaged")
        self._saved_here.add(directory)
        if self.args.checkpoint.overwrite_checkpoints:
            ckpt.delete_later_checkpoints(self.args.checkpoint.save, self.state.iteration)
        if self.args.checkpoint.keep_last_n:
            ckpt.prune_checkpoints(self.args.checkpoint.save, self.args.checkpoint.keep_last_n)
        if self.ctx.rank == 0:
            logger.info("saved %s in %.1f s", directory, time.time() - start)
        return directory

    # -- the loop -----------------------------------------------------------------------------------------------
    def _measure_peak(self) -> Optional[float]:
        from megatron_puffin.training.flops import measure_matmul_tflops

        dtype = self.config.params_dtype
        return measure_matmul_tflops(dtype=dtype, seconds=0.3) if self.is_logging_rank else None

    def _reseed(self) -> None:
        """Dropout and other global-RNG draws of this step: a function of (seed, iteration, DP rank)."""
        seed = derive_seed(self.args.training.seed, "step", self.state.iteration, self.ctx.dp_rank)
        seed_everything(seed % (2**31), tp_rank=self.ctx.tp_rank)

    def _next_batches(self, iterator: Iterator) -> Tuple[List[Dict[str, Any]], float, Optional[str]]:
        """The next step's micro-batches, the seconds waited for them, and why the data loader failed (None when it
        did not: workers that kept dying, shards gone). Nothing is counted yet: the step may not run."""
        from megatron_puffin.data.loader import DataLoaderError

        batches: List[Dict[str, Any]] = []
        start = time.perf_counter()
        try:
            for _ in range(self.micro_batches):
                batches.append(next(iterator))
        except DataLoaderError as error:
            return [], time.perf_counter() - start, str(error)
        except (RuntimeError, MemoryError) as error:  # collating in this process (--num-workers 0)
            if not is_out_of_memory(error):
                raise
            where = f"the data loader, assembling the micro-batches of iteration {self.state.iteration + 1},"
            message = out_of_memory_message(error, where)
        else:
            return batches, time.perf_counter() - start, None
        del batches
        release_memory()  # what the failed allocation's frames held, before the save needs memory
        return [], time.perf_counter() - start, message

    def _run_step(self, batches: List[Dict[str, Any]]) -> Tuple[Any, str]:
        """(the step's result, ""), or (None, a one-line message) when the step ran out of memory."""
        from megatron_puffin.training.step import train_step

        try:
            return train_step(self.ddp, self.optimizer, batches), ""
        except (RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error):
                raise
            return None, out_of_memory_message(error, f"iteration {self.state.iteration + 1} (micro-batches "
                                                      f"{micro_batch_sizes(batches)})")

    def _count_batches(self, batches: List[Dict[str, Any]], interval: Interval, wait: float) -> None:
        """Samples, tokens, FLOPs and padding of the micro-batches this step trains, for the log and the state."""
        from megatron_puffin.training.towers import micro_batch_flops

        interval.data_wait += wait
        for batch in batches:
            samples = int(batch["input_ids"].shape[0])
            tokens = int(batch["attention_mask"].sum())
            flops = sum(micro_batch_flops(self.config, batch, self.trainable).values())
            name = stream_task(batch) or batch["task"]
            interval.add_batch(name, samples, tokens, flops)
            self.state.consumed[name] = self.state.consumed.get(name, 0) + samples * self.ctx.data_parallel_size
            interval.add_padding(tokens, int(batch["attention_mask"].numel()))

    def _should_stop(self, data_error: Optional[str]) -> Optional[str]:
        """The reason to stop before the next step, agreed by all ranks (one small all-reduce per step, after this
        rank fetched that step's micro-batches: a rank whose data failed stops with the others, and all save)."""
        training = self.args.training
        local = 0
        if data_error is not None:
            local = 4
        elif self.loader.bad_sample_error:  # decided together, so that no rank waits for one that stopped
            local = 3
        elif self.stop.received:
            local = 1
        elif training.exit_duration_in_mins is not None and \
                time.time() - self.start_time > 60 * training.exit_duration_in_mins:
            local = 2
        flag = torch.tensor([local], dtype=torch.int64, device=self.ctx.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return {1: "signal", 2: f"--exit-duration-in-mins {training.exit_duration_in_mins}", 3: BAD_SAMPLES,
                4: DATA_FAILED}.get(int(flag.item()))

    def _log(self, interval: Interval, elapsed: float) -> None:
        interval.reduce(self.dp_group)
        losses = interval.losses()
        if self.ctx.pipeline_model_parallel_size > 1:  # losses live on the last stage; rank 0 writes the log
            group = self.pg_collection.pp
            box = [losses]
            src = dist.get_global_rank(group, self.ctx.pipeline_model_parallel_size - 1)
            dist.broadcast_object_list(box, src=src, group=group)
            losses = box[0]
        if not self.is_logging_rank:
            return
        grad_norm = sum(interval.grad_norms) / len(interval.grad_norms) if interval.grad_norms else None
        tflops = interval.flops / max(elapsed, 1e-9) / self.ctx.world_size / 1e12
        report = Report(
            iteration=self.state.iteration, train_iters=self.args.training.train_iters,
            consumed=dict(self.state.consumed), lr=self.optimizer.param_groups[0]["lr"], losses=losses,
            grad_norm=grad_norm, skipped_total=self.state.skipped_total,
            samples_per_second={t: v / elapsed for t, v in interval.samples.items()},
            tokens_per_second={t: v / elapsed for t, v in interval.tokens.items()},
            tflops_per_device=tflops, mfu=tflops / self.peak_device_tflops if self.peak_device_tflops else None,
            data_wait_percent=100.0 * interval.data_wait / max(elapsed, 1e-9),
            peak_memory_gib=peak_memory_gib() if self.args.logging.log_memory else None,
            bad_samples_total=self.loader.bad_samples_total, new_bad_samples=list(self.loader.new_bad_samples),
            padding_percent=interval.padding_percent(),
        )
        self.loader.new_bad_samples.clear()
        self.writer.write(report)

    def train(self) -> int:
        """Train to ``--train-iters`` (or until asked to stop); returns the process exit code."""
        training, ckpt_args = self.args.training, self.args.checkpoint
        self.ddp.train()
        self.stop.install()
        iterator = iter(self.loader)
        interval, interval_start = Interval(self.tasks), time.perf_counter()
        stopped: Optional[str] = None
        data_error: Optional[str] = None
        memory_error = ""
        try:
            while self.state.iteration < training.train_iters:
                self._reseed()
                mark = self.loader.mark()
                batches, wait, data_error = self._next_batches(iterator)
                stopped = self._should_stop(data_error)
                if stopped:
                    # The micro-batches drawn for this step are not trained: the checkpoint hands them out again.
                    self.loader.rewind(mark)
                    break
                consumed = dict(self.state.consumed)
                self._count_batches(batches, interval, wait)
                result, memory_error = self._run_step(batches)
                if result is None:  # this step did not train: its micro-batches are handed out again
                    self.loader.rewind(mark)
                    self.state.consumed = consumed
                    stopped = OUT_OF_MEMORY
                    break
                self.state.iteration += 1
                interval.add_step(result)
                if result.skipped:
                    self._count_skip(result)
                else:
                    self.state.skipped_in_a_row = 0
                    self.scheduler.step(increment=1)
                if self.state.iteration % self.args.logging.log_interval == 0 or \
                        self.state.iteration == training.train_iters:
                    self._log(interval, time.perf_counter() - interval_start)
                    interval, interval_start = Interval(self.tasks), time.perf_counter()
                if self.validator is not None and self.validator.due(self.state.iteration):
                    start = time.perf_counter()
                    self.validate()
                    interval_start += time.perf_counter() - start  # throughput excludes validation
                if ckpt_args.save and ckpt_args.save_interval and self.state.iteration % ckpt_args.save_interval == 0:
                    start = time.perf_counter()
                    self.save()
                    interval_start += time.perf_counter() - start  # throughput excludes checkpoint writes
                if training.exit_interval and self.state.iteration % training.exit_interval == 0 and \
                        self.state.iteration < training.train_iters:
                    # a signal or a limit reached on any rank by now still decides the status and the exit code
                    stopped = self._should_stop(None) or f"--exit-interval {training.exit_interval}"
                    break
            if ckpt_args.save:  # still under the stop handler: a second signal must not kill the save
                self._save_at_end(stopped)
        finally:
            # Shut the data-loader workers down now, also when an error leaves this function: its traceback would
            # keep the iterator alive to interpreter exit, where multiprocessing stops daemonic children with
            # SIGTERM, which the workers ignore (process_lifetime), and then waits for them forever.
            iterator.close()
            if not self.stop.received:  # after a stop, a later signal is logged and ignored until run() tore down
                self.stop.restore()
        if stopped == BAD_SAMPLES:
            raise TrainingError(self.loader.bad_sample_error or "another rank met too many undecodable samples "
                                "(--max-bad-samples); see its log")
        if stopped == OUT_OF_MEMORY:  # after the save: the hint names the checkpoint of the last trained step
            raise TrainingError(f"{memory_error}. {self._resume_hint()}")
        if stopped == DATA_FAILED:  # after the save: the hint names the checkpoint of the last trained step
            raise TrainingError(f"{data_error or 'the data loader of another rank failed; see its log'}. "
                                f"{self._resume_hint()}")
        if stopped:
            if self.ctx.rank == 0:
                logger.info("stopped at iteration %d/%d (%s)%s", self.state.iteration, training.train_iters,
                            stopped, "; continue with --load " + ckpt_args.save if ckpt_args.save else "")
            return EXIT_FINISHED if stopped.startswith("--exit-interval") else EXIT_INTERRUPTED
        if self.ctx.rank == 0:
            logger.info("training finished: %d iterations, %d skipped", self.state.iteration, self.state.skipped_total)
        return EXIT_FINISHED

    def _save_at_end(self, stopped: Optional[str]) -> None:
        """The last save of a run (finished or stopped for ``stopped``) and its ``run_status.json``. Before the first
        step nothing is trained, and such a checkpoint (no optimizer state yet) did not load: none is written. With
        other ranks, one that ran out of memory left them inside the step's collectives: no save then either."""
        if stopped == OUT_OF_MEMORY:
            if self.ctx.world_size > 1:
                return
            release_memory()  # what the failed step's frames held, before the save needs memory
        if self.state.iteration > 0:
            self.save()
        self._write_status("failed" if stopped in (BAD_SAMPLES, DATA_FAILED, OUT_OF_MEMORY) else
                           "interrupted" if stopped and not stopped.startswith("--exit-interval") else
                           "stopped" if stopped else "finished", stopped)

    def _write_status(self, status: str, reason: Optional[str]) -> None:
        """``<save>/run_status.json``: how the last process of this run ended. torchrun reports any non-zero exit
        of a rank as 1, so launchers that must decide whether to requeue read this file (status "interrupted")."""
        if self.ctx.rank != 0:
            return
        record = {"status": status, "reason": reason, "iteration": self.state.iteration,
                  "train_iters": self.args.training.train_iters,
                  "checkpoint": ckpt.iteration_directory(self.args.checkpoint.save, self.state.iteration)
                  if self.state.iteration > 0 else None}  # nothing trained before the first step: no checkpoint
        try:
            write_text_atomically(os.path.join(self.args.checkpoint.save, STATUS_FILE), json.dumps(record, indent=1))
        except OSError as error:  # the checkpoint is saved; a launcher without this file does not requeue
            logger.warning("%s not written (%s): the run ended %s at iteration %d", STATUS_FILE, error, status,
                           self.state.iteration)

    def _count_skip(self, result) -> None:
        self.state.skipped_total += 1
        self.state.skipped_in_a_row += 1
        limit = self.args.training.max_consecutive_skipped_steps
        if self.ctx.rank == 0:
            logger.warning("iteration %d skipped: loss %s, grad norm %s (%d in a row)", self.state.iteration,
                           {t: result.task_losses[t] for t in result.task_losses}, result.grad_norm,
                           self.state.skipped_in_a_row)
        if self.state.skipped_in_a_row >= limit:
            raise TrainingError(
                f"{self.state.skipped_in_a_row} optimizer steps in a row had a non-finite loss or gradient norm "
                f"(--max-consecutive-skipped-steps {limit}); the last good state is the latest checkpoint. "
                "Lower --lr or raise --lr-warmup-iters, check the data, or train in fp32 to find the cause."
            )

    def close(self) -> None:
        self.writer.close()


def run(args: PuffinArguments, restore_signal_handlers: bool = True) -> int:
    """Build, train and tear down; returns the exit code (:data:`EXIT_FINISHED` or :data:`EXIT_INTERRUPTED`).

    ``restore_signal_handlers=False`` (``pretrain_puffin.py``): after a stop, the run's handler stays installed (a
    later stop signal is logged and ignored) for the process's exit to take over
    (:func:`~megatron_puffin.process_lifetime.exit_process`). Restored, a second Ctrl-C landing while the run's
    objects were freed or the interpreter shut down raised ``KeyboardInterrupt`` there: tracebacks, and the exit
    status "killed by SIGINT" instead of 75."""
    from megatron_puffin.process_lifetime import die_with_launcher
    from megatron_puffin.training.run_lock import SaveDirectoryLock, lock_save_directory

    die_with_launcher()
    save = args.checkpoint.save
    # Before the process group: a second run on the same --save stops here (run_lock.py); rank 0 holds it.
    lock = lock_save_directory(save) if save and int(os.environ.get("RANK", "0")) == 0 else SaveDirectoryLock()
    try:
        try:
            trainer = Trainer(args)
        except BaseException:
            mpd.destroy()  # a failed start (bad checkpoint, flags) still releases the process group
            raise
        try:
            return trainer.train()
        finally:
            trainer.close()
            mpd.destroy()
            if restore_signal_handlers or not trainer.stop.received:
                trainer.stop.restore()
    finally:
        lock.release()
