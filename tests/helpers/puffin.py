"""A tiny Puffin (every tower real, toy sizes) and task micro-batches from a synthetic dataset."""
from __future__ import annotations

import atexit
import contextlib
import importlib.util
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 96
NUM_QUERIES = 4
TASK_STREAMS = {  # loss task -> (stream task, subset)
    "image2text": ("image2text", "main"),
    "image2text_cross_view": ("image2text_cross_view", "cross_view"),
    "text2text": ("text2text", "main"),
    "text2image": ("text2image", "main"),
    "cam2image": ("cam2image", "main"),
    "image2image": ("image2image", "cross_view"),
}
TINY_VAE = json.loads((ROOT / "examples" / "tiny" / "vae_config.json").read_text())  # the tiny runs' VAE


_DATASET_CACHE: Dict[Tuple[int, int, int, int], Path] = {}
"""Rendered datasets of this test process by (num_samples, seed, image_size, rendered held-out samples): each is
rendered and preprocessed once (about 15 s on 2 cores) and copied for every further request (the copy is
byte-identical)."""
RENDERED_HELDOUT = 4
"""Held-out samples rendered with every cached dataset, also for requests without one (then left out of the copy):
the training split and the tokenizer do not depend on the held-out split (megatron_puffin/data/synthetic.py), so one
rendering serves both kinds of request (every size the suite uses is asked for with and without)."""


def make_tiny_dataset(root: Path, num_samples: int = 16, seed: int = 0, image_size: int = IMAGE_SIZE,
                      vae_config: Optional[dict] = None, num_heldout: int = 0) -> Dict[str, str]:
    """Render + preprocess a synthetic Puffin-4M dataset into ``root``; returns paths of shards, tokenizer and VAE
    config (``vae_config``: an AutoencoderKL config, default the tiny one). ``num_heldout`` > 0 also writes the
    held-out split, preprocessed into ``<root>/heldout`` (returned as "heldout"). ``root`` gets its own copy, so a
    test may damage its files."""
    root = Path(root)
    key = (num_samples, seed, image_size, num_heldout or RENDERED_HELDOUT)
    if key not in _DATASET_CACHE:
        cache = Path(tempfile.mkdtemp(prefix="puffin-tiny-"))
        atexit.register(shutil.rmtree, cache, True)
        _render_tiny_dataset(cache / "tiny", num_samples, seed, image_size, key[3])
        _DATASET_CACHE[key] = cache / "tiny"
    source = _DATASET_CACHE[key]
    held_out = {source / "heldout", source / "raw" / "heldout"}
    ignore = None if num_heldout else (lambda folder, names: [n for n in names if Path(folder) / n in held_out])
    shutil.copytree(source, root, dirs_exist_ok=True, ignore=ignore)
    vae_path = root / "vae_config.json"
    vae_path.write_text(json.dumps(vae_config or TINY_VAE))
    paths = {"data": str(root / "data"), "tokenizer": str(root / "tokenizer.model"), "vae_config": str(vae_path)}
    return {**paths, "heldout": str(root / "heldout")} if num_heldout else paths


def _render_tiny_dataset(root: Path, num_samples: int, seed: int, image_size: int, num_heldout: int) -> None:
    """``tools/make_synthetic_dataset.py`` and ``tools/preprocess_data.py`` (one worker each), run in this process
    through the tools' own ``main``: a subprocess per tool would pay about 7 s of imports each, three times per
    rendering; the bytes written are the same (tests/functional/test_preprocess_synthetic.py runs the tools as commands)."""
    raw, data, tokenizer = root / "raw", root / "data", root / "tokenizer.model"
    _run_tool("make_synthetic_dataset", ["--output", str(raw), "--num-samples", str(num_samples), "--image-size",
                                         str(image_size), "--seed", str(seed), "--tokenizer-out", str(tokenizer),
                                         "--workers", "1", "--num-heldout", str(num_heldout)])
    splits = [(raw, data)] + ([(raw / "heldout", root / "heldout")] if num_heldout else [])
    for source, output in splits:
        _run_tool("preprocess_data", ["--input", str(source), "--output-prefix", str(output), "--workers", "1",
                                      "--no-progress"])


def _run_tool(name: str, argv: list) -> None:
    """``tools/<name>.py ARGV`` in this process; its report (stdout) and its logging set-up are kept out of the
    test's, a non-zero exit raises with the report."""
    spec = importlib.util.spec_from_file_location(f"_puffin_tool_{name}", ROOT / "tools" / f"{name}.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    root_logger = logging.getLogger()
    handlers, level = list(root_logger.handlers), root_logger.level
    report = io.StringIO()
    try:
        with contextlib.redirect_stdout(report), contextlib.redirect_stderr(report), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code = tool.main(argv)
    finally:
        root_logger.handlers[:], root_logger.level = handlers, level
    if code:
        raise RuntimeError(f"tools/{name}.py {' '.join(argv)} exited {code}:\n{report.getvalue()[-3000:]}")


CLI_ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
"""The environment the functional tests run ``pretrain_puffin.py`` in (one thread per rank, no GPU)."""


# What the forked CLI runs find imported (the imports cost ~8 s of CPU per interpreter start): the training entry
# point's modules, the diffusers AutoencoderKL it imports when it builds the VAE (another ~5 s per run otherwise),
# and the modules of the tools the functional tests run.
CLI_PRELOAD = ["megatron_puffin.platform", "megatron_puffin.training.loop", "megatron_puffin.models.puffin", "megatron_puffin.data.loader",
               "megatron_puffin.config", "megatron_puffin.training.layout",
               "diffusers.models.autoencoders.autoencoder_kl", "megatron_puffin.inference",
               "megatron_puffin.convert.qwen2", "megatron_puffin.convert.sd3", "megatron_puffin.convert.hf_io",
               "megatron_puffin.data.preprocess", "megatron_puffin.data.synthetic"]


@contextlib.contextmanager
def _environ(env: Dict[str, str]):
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _script_main_in_child(script: str, argv: list, cwd: str, env: Dict[str, str], out_path: str,
                          err_path: str) -> None:
    """Body of a forked run: ``python SCRIPT ARGV`` in ``cwd``, minus the interpreter start (the script runs as
    ``__main__`` and its ``sys.exit`` code becomes the process's exit code)."""
    import multiprocessing
    import runpy
    import warnings

    # A new interpreter's default start method (fork on Linux): a forkserver child inherits "forkserver", with which
    # DataLoader workers would start from the server (not as this process's children, and seconds later).
    multiprocessing.set_start_method(None, force=True)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out_path), (2, err_path)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    if env.get("PYTHONWARNINGS") == "ignore":  # read only by a new interpreter
        warnings.simplefilter("ignore")
    if env.get("OMP_NUM_THREADS"):  # likewise read when torch starts
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_environments(env: Dict[str, str], nproc: int) -> list:
    """``env`` of each of ``nproc`` local ranks as ``torchrun --standalone --nproc-per-node NPROC`` sets the
    variables the scripts read (megatron_puffin/distributed/launch.py): rank, sizes, a free loopback port. One
    process: ``env`` unchanged (``python SCRIPT``)."""
    if nproc == 1:
        return [env]
    port = str(_free_port())
    return [dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                 GROUP_RANK="0", ROLE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            for rank in range(nproc)]


def _wait_for_ranks(children: list, timeout: float) -> None:
    """Wait for every rank; as torchrun does, the first rank that fails ends the others (which would otherwise wait
    for it in a collective). Raises TimeoutError (after killing them all) past ``timeout`` seconds."""
    from multiprocessing.connection import wait

    deadline = time.monotonic() + timeout
    running = list(children)
    while running:
        left = deadline - time.monotonic()
        if left <= 0:
            for child in running:
                child.kill()
                child.join()
            raise TimeoutError
        for sentinel in wait([child.sentinel for child in running], left):
            child = next(c for c in running if c.sentinel == sentinel)
            child.join()
            running.remove(child)
            if child.exitcode != 0:
                for other in running:
                    other.terminate()
                deadline = min(deadline, time.monotonic() + 30)  # then killed, as torchrun would


def forkserver_context():
    """multiprocessing's forkserver context, whose server (one per pytest process, started on first use by a forked
    CLI run or a pooled distributed rank, in :data:`CLI_ENV`) has imported :data:`CLI_PRELOAD` once."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(CLI_PRELOAD)
    return context


def _start_forked(script, argv: list, cwd, env: Dict[str, str], out_path: str, err_path: str):
    """One process of ``python SCRIPT ARGV`` forked from the pre-imported server (started on first use, with
    :data:`CLI_PRELOAD` imported in :data:`CLI_ENV`); its output goes to the two files."""
    child = forkserver_context().Process(target=_script_main_in_child,
                            args=(str(script), [str(arg) for arg in argv], str(cwd), env, out_path, err_path))
    with _environ(CLI_ENV):  # the server (started once, on first use) runs in the CLI's environment
        child.start()
    return child


class ForkedProcess:
    """A running ``python SCRIPT ARGS`` forked from the pre-imported server (:func:`start_script`), with the
    ``subprocess.Popen`` calls the signal tests use: ``pid``, ``poll``, ``send_signal``, ``kill``, ``wait``, and
    ``communicate`` (its stdout and stderr once it ended). The exit code is the script's ``sys.exit`` code, or minus
    the signal that ended it."""

    def __init__(self, script, argv: list, cwd, env: Dict[str, str]) -> None:
        self._tmp = tempfile.mkdtemp(prefix="puffin-forked-")
        self._remove_tmp = weakref.finalize(self, shutil.rmtree, self._tmp, True)  # also for tests that only wait
        self._paths = (os.path.join(self._tmp, "stdout"), os.path.join(self._tmp, "stderr"))
        self._child = _start_forked(script, argv, cwd, env, *self._paths)
        self.pid = self._child.pid

    def poll(self) -> Optional[int]:
        return self._child.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self._child.kill()

    def wait(self, timeout: Optional[float] = None) -> int:
        self._child.join(timeout)
        if self._child.exitcode is None:
            raise subprocess.TimeoutExpired(str(self.pid), timeout)
        return self._child.exitcode

    @property
    def returncode(self) -> Optional[int]:
        return self._child.exitcode

    def communicate(self, timeout: Optional[float] = None) -> Tuple[str, str]:
        self.wait(timeout)
        out, err = (Path(path).read_text(errors="replace") if os.path.exists(path) else "" for path in self._paths)
        self._remove_tmp()
        return out, err


def start_script(script, *args, cwd=ROOT, env: Optional[Dict[str, str]] = None) -> ForkedProcess:
    """Start ``python SCRIPT ARGS`` in ``cwd`` forked from the pre-imported server and return at once (tests that
    signal or kill a running training process; ``env`` must have the suite's hash seed, see :func:`run_script`)."""
    env = env or CLI_ENV
    if env.get("PYTHONHASHSEED") != CLI_ENV.get("PYTHONHASHSEED"):
        raise ValueError("start_script: env's PYTHONHASHSEED differs from the forkserver's; start a subprocess")
    return ForkedProcess(script, list(args), cwd, env)


def _run_forked_script(script, argv, cwd, timeout: int, env: Dict[str, str],
                       nproc: int = 1) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGV`` (or its ``nproc`` ranks, as under torchrun) in new processes forked from a server that
    has imported :data:`CLI_PRELOAD` once (multiprocessing's forkserver, started with :data:`CLI_ENV`): the same
    script, arguments, working directory, environment, exit code and output as real processes, without paying the
    imports again. Several ranks: the output is each rank's in rank order, and the exit code is 0 when every rank
    succeeded, else 1 (torchrun's)."""
    argv = [str(arg) for arg in argv]
    command = [Path(script).name, *argv] if nproc == 1 else ["torchrun", f"--nproc-per-node={nproc}", Path(script).name,
                                                             *argv]
    with tempfile.TemporaryDirectory() as tmp:
        files = [(os.path.join(tmp, f"stdout{rank}"), os.path.join(tmp, f"stderr{rank}")) for rank in range(nproc)]
        children = [_start_forked(script, argv, cwd, rank_env, *paths)
                    for rank_env, paths in zip(_rank_environments(env, nproc), files)]
        try:
            _wait_for_ranks(children, timeout)
        except TimeoutError:
            raise subprocess.TimeoutExpired(command, timeout) from None
        out, err = ("".join(Path(path).read_text(errors="replace") if os.path.exists(path) else ""
                            for path in paths) for paths in zip(*files))
    codes = [child.exitcode for child in children]
    code = codes[0] if nproc == 1 else int(any(codes))
    return subprocess.CompletedProcess(command, code, out, err)


def run_script(script, *args, cwd=ROOT, nproc: int = 1, check: bool = True, timeout: int = 900,
               env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` in ``cwd`` (``torchrun --standalone --nproc-per-node NPROC SCRIPT ARGS`` when
    ``nproc`` > 1) for a command-line tool (tools/*.py, pretrain_puffin.py), forked from the pre-imported server
    when ``env`` has the suite's hash seed (:func:`_run_forked_script`; ``env`` then only differs from
    :data:`CLI_ENV` in variables read after start-up), else as real processes. With ``check`` a non-zero exit
    raises with the tail of its output. Tests of an interpreter's own start-up or of torchrun's behaviour (signals)
    start real processes instead."""
    env = env or CLI_ENV
    if env.get("PYTHONHASHSEED") == CLI_ENV.get("PYTHONHASHSEED"):
        proc = _run_forked_script(script, args, cwd, timeout, env, nproc)
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
            if nproc > 1 else [sys.executable]
        proc = subprocess.run(launcher + [str(script), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{Path(script).name} exit {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def run_pretrain(cwd, *flags, nproc: int = 1, check: bool = True, timeout: int = 900,
                 env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """``pretrain_puffin.py FLAGS`` in ``cwd``, with ``nproc`` ranks (as under torchrun) when ``nproc`` > 1; see
    :func:`run_script`."""
    return run_script(ROOT / "pretrain_puffin.py", *flags, cwd=cwd, nproc=nproc, check=check, timeout=timeout,
                      env=env)


def metrics_losses(path) -> Dict[int, Dict[str, float]]:
    """``{iteration: {task: loss}}`` of the training records of a ``--metrics-file`` (validation records, which
    carry ``valid_loss/`` keys only, are left out)."""
    losses = {}
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        if any(key.startswith("loss/") for key in record):
            losses[record["iteration"]] = {key[len("loss/"):]: value for key, value in record.items()
                                           if key.startswith("loss/")}
    return losses


def tiny_puffin_config(paths: Dict[str, str], seed: int = 0, **model_flags):
    """Toy-sized towers (LLM 2 layers so PP=2 splits it), fp32, local specs."""
    from megatron_puffin.data import PuffinTokenizer
    from megatron_puffin.diffusion import FlowMatchingConfig
    from megatron_puffin.models.connector import ConnectorConfig
    from megatron_puffin.models.dit import DiTConfig
    from megatron_puffin.models.llm import LLMConfig
    from megatron_puffin.models.puffin import PuffinConfig
    from megatron_puffin.models.puffin_config import PuffinModelConfig
    from megatron_puffin.models.vision import VisionConfig

    tokenizer = PuffinTokenizer(paths["tokenizer"])
    llm = LLMConfig(num_layers=2, hidden_size=48, ffn_hidden_size=64, num_attention_heads=6, num_query_groups=2,
                    kv_channels=8, vocab_size=tokenizer.vocab_size, max_position_embeddings=2048)
    vision = VisionConfig(hidden_size=16, num_layers=1, num_attention_heads=2, ffn_hidden_size=32,
                          max_image_size=IMAGE_SIZE, class_token_len=2)
    connector = ConnectorConfig(num_queries=NUM_QUERIES, hidden_size=16, num_layers=1, num_attention_heads=2,
                                ffn_hidden_size=32, pooled_projection_dim=24, joint_attention_dim=20)
    dit = DiTConfig(sample_size=24, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                    num_attention_heads=2, joint_attention_dim=20, caption_projection_dim=16,
                    pooled_projection_dim=24, pos_embed_max_size=16)
    model = PuffinModelConfig(vae_config=paths["vae_config"], image_pad_token_id=tokenizer.image_pad_id, **model_flags)
    return PuffinConfig(llm=llm, vision=vision, connector=connector, dit=dit, flow=FlowMatchingConfig(), model=model,
                        seed=seed)


def task_batches(paths: Dict[str, str], micro_batch_size: int = 2, seed: int = 0, data_parallel_rank: int = 0,
                 data_parallel_size: int = 1, steps: int = 1, image_size: int = IMAGE_SIZE,
                 num_queries: int = NUM_QUERIES):
    """``steps`` micro-batches of every task (keys: loss task), from one loader cycling through six streams."""
    from megatron_puffin.data import DataConfig, build_data_loader

    streams = [f"{stream}:{paths['data']}/{subset}:{micro_batch_size}" for stream, subset in TASK_STREAMS.values()]
    config = DataConfig(task_stream=streams, tokenizer=paths["tokenizer"], num_workers=0, image_size=image_size,
                        pin_memory=False)
    loader = build_data_loader(config, seed=seed, data_parallel_rank=data_parallel_rank,
                               data_parallel_size=data_parallel_size, num_query_tokens=num_queries)
    iterator = iter(loader)
    batches: Dict[str, list] = {task: [] for task in TASK_STREAMS}
    for _ in range(steps * len(TASK_STREAMS)):
        batch = next(iterator)
        batches[batch["task"]].append(batch)
    return batches


def mixed_size_batch(batch):
    """The batch with sample 0's target (and its camera map / initial view) cropped to 64 rows: a generation
    micro-batch with mixed latent sizes, as dynamic resizing produces."""
    mixed = dict(batch)
    for key in ("target_images", "camera_maps", "init_images"):
        if key in batch:
            images = list(batch[key])
            images[0] = images[0][:, :64, :].contiguous()
            mixed[key] = images
    return mixed


def trainable_names(model: torch.nn.Module):
    return [name for name, param in model.named_parameters() if param.requires_grad]


def reference_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A TP=1/PP=1 Puffin's weights under the released checkpoints' names (docs/puffin.md §1.11: ``llm.``,
    ``visual_encoder.radio_model.``, ``projector.``, the query path, ``transformer.``), through the tower
    converters' inverses (``convert.puffin.mcore_to_puffin``, what ``mcore-to-puffin`` writes)."""
    from megatron_puffin.convert.puffin import mcore_to_puffin

    return mcore_to_puffin(model.state_dict(), model.puffin_config)


TINY_ARGS = ROOT / "examples" / "tiny"
RESUME_FLAGS = [f"@{TINY_ARGS / 'model.args'}", "--num-workers", "0", "--log-interval", "1",
                "--task-stream", "image2text:tiny/data/main", "--task-stream", "cam2image:tiny/data/main",
                "--freeze-vision", "--lr", "1e-3", "--lr-warmup-iters", "2", "--train-iters", "4"]
"""The shared tiny run's flags (relative paths: run in a directory holding ``tiny/``), without the micro-batch size."""

_TINY_RUN: Dict[str, Path] = {}


def tiny_run() -> Path:
    """A directory holding ``tiny/`` (16 samples), ``run/`` (a 4-iteration run of ``RESUME_FLAGS`` at micro-batch
    size 2 with checkpoints ``iter_0000002`` and ``iter_0000004``) and ``full.jsonl`` (its per-iteration metrics).
    Trained once per test process (about 40 s on 2 cores) and shared by every module that needs a trained tiny
    checkpoint: never change it, copy it (``shutil.copytree``)."""
    if "root" not in _TINY_RUN:
        root = Path(tempfile.mkdtemp(prefix="puffin-run-"))
        atexit.register(shutil.rmtree, root, True)
        make_tiny_dataset(root / "tiny", num_samples=16)
        run_pretrain(root, *RESUME_FLAGS, "--micro-batch-size", "2", "--save", "run", "--save-interval", "2",
                     "--metrics-file", "full.jsonl")
        _TINY_RUN["root"] = root
    return _TINY_RUN["root"]


def tiny_pp_run() -> Path:
    """The directory of :func:`tiny_run` plus ``pp/`` and ``pp_full.jsonl``: the same run at PP=2 with
    ``--use-distributed-optimizer`` (2 ranks as torchrun starts them, forked: :func:`run_script`; the LLM layers
    split, the vision tower and the connectors on different ranks), checkpoints ``iter_0000002`` and ``iter_0000004``. Trained once per test process; copy it."""
    root = tiny_run()
    if not (root / "pp_full.jsonl").exists():
        run_pretrain(root, *RESUME_FLAGS, "--micro-batch-size", "2", "--use-distributed-optimizer",
                     "--pipeline-model-parallel-size", "2", "--save", "pp", "--save-interval", "2",
                     "--metrics-file", "pp_full.jsonl", nproc=2)
    return root


def unblock_generation_gradients(model, seed: int = 3, std: float = 0.05) -> None:
    """Give the zero-initialised ``projector_1/2`` (docs/puffin.md §1.7) the values of a trained model, in place.

    At zero they block every gradient of the diffusion loss into the connectors, queries and LLM, so a test of
    those gradients would see nothing. The values are a function of ``seed`` and the parameter order only, so every
    layout of the same model gets the same ones.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "projector_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def assert_layout_matches_reference(values: Dict, reference: Dict[str, tuple], tolerance: float,
                                    where: tuple) -> Tuple[float, float]:
    """One rank's result at one parallel layout against the one-process reference: on the last stage every task's
    loss within ``tolerance`` (relative), and on every stage every gradient within ``tolerance`` (relative).

    Args:
        values: the worker's result for the layout (``last``, ``losses`` {task: (loss,)}, ``grad_errors``
            {name: relative error}).
        reference: {task: (loss,)} of one process.
        where: (rank, layout), named in the failure messages.

    Returns:
        (worst relative loss error, worst relative gradient error) of this rank and layout.
    """
    worst_loss = 0.0
    if values["last"]:
        for task, (ref,) in reference.items():
            (ours,) = values["losses"][task]
            assert abs(ours - ref) <= tolerance * abs(ref), (*where, task, ours, ref)
            worst_loss = max(worst_loss, abs(ours - ref) / abs(ref))
    name, error = max(values["grad_errors"].items(), key=lambda kv: kv[1])
    assert error <= tolerance, f"rank {where[0]} layout {where[1]}: gradient {name} rel error {error:.2e}"
    return worst_loss, error


def process_running(pid: int) -> bool:
    """Whether process ``pid`` runs (Linux /proc; a zombie waiting for its reaper does not)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
