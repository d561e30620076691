"""--cached-latents: VAE posterior moments stored beside the shards give the online loss without running the VAE."""
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch

import megatron_puffin.distributed as mpd
from helpers.faults import file_size_limit_in_child
from helpers.puffin import IMAGE_SIZE, NUM_QUERIES, ROOT, TASK_STREAMS, make_tiny_dataset, tiny_puffin_config
from megatron_puffin.data.format import PuffinDataset
from megatron_puffin.data.latents import CRC_FIELD, LATENT_FIELDS, SHAPE_FIELD
from megatron_puffin.training.objectives import puffin_loss

GENERATION = ("text2image", "cam2image", "image2image")


def _batches(paths, cached: bool, vae_identity=None):
    from megatron_puffin.data import DataConfig, build_data_loader

    streams = [f"{stream}:{paths['data']}/{subset}:2" for stream, subset in TASK_STREAMS.values()]
    config = DataConfig(task_stream=streams, tokenizer=paths["tokenizer"], num_workers=0, image_size=IMAGE_SIZE,
                        pin_memory=False, cached_latents=cached)
    loader = build_data_loader(config, seed=0, num_query_tokens=NUM_QUERIES, vae_identity=vae_identity)
    iterator = iter(loader)
    return {batch["task"]: batch for batch in (next(iterator) for _ in TASK_STREAMS)}


def _cache_latents_tool():
    spec = importlib.util.spec_from_file_location("cache_latents", ROOT / "tools" / "cache_latents.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    from megatron_puffin.data.latents import vae_identity
    from megatron_puffin.models.puffin import build_puffin

    root = tmp_path_factory.mktemp("latents")
    paths = make_tiny_dataset(root)
    online = _batches(paths, cached=False)
    mpd.initialize(seed=0)
    torch.manual_seed(0)
    model = build_puffin(tiny_puffin_config(paths), pg_collection=mpd.process_groups()).train()
    # The tool draws the random tiny VAE from the training seed (0 here) exactly as the model does: the loader's
    # identity check below would fail otherwise. Small batches: several VAE calls per shard.
    tool = _cache_latents_tool()
    flags = ["--data", paths["data"], "--vae-config", paths["vae_config"], "--seed", "0", "--image-size",
             str(IMAGE_SIZE), "--dtype", "float32", "--batch-size", "3"]
    assert tool(flags) == 0
    assert tool(flags) == 0  # a re-run skips the finished shards
    yield paths, model, online, _batches(paths, cached=True, vae_identity=vae_identity(model.vae))
    mpd.destroy()


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = puffin_loss(model, batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("task", GENERATION)
def test_cached_moments_give_the_online_loss_and_never_run_the_encoder(cached, task):
    _, model, online, from_cache = cached
    calls = []
    handle = model.vae.vae.encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        assert "target_moments" in from_cache[task] and "target_moments" not in online[task]
        loss_cached, grads_cached = _loss_and_grads(model, from_cache[task])
        assert not calls, "the VAE encoder ran although the batch carries cached moments"
        loss_online, grads_online = _loss_and_grads(model, online[task])
        assert calls  # the online path does encode
    finally:
        handle.remove()
    torch.testing.assert_close(loss_cached, loss_online, rtol=1e-6, atol=0)
    assert set(grads_cached) == set(grads_online)
    scale = max(float(grad.abs().max()) for grad in grads_online.values())  # e.g. key biases get ~0 gradients
    for name, grad in grads_online.items():
        torch.testing.assert_close(grads_cached[name], grad, rtol=1e-5, atol=1e-6 * scale, msg=name)


def test_condition_moments_follow_the_task(cached):
    _, _, _, batches = cached
    assert "camera_moments" not in batches["text2image"] and "init_moments" not in batches["cam2image"]
    assert batches["image2image"]["init_moments"].shape == batches["image2image"]["target_moments"].shape
    assert batches["cam2image"]["camera_moments"].shape[1:3] == (2, 4)  # (mean, std) x 4 latent channels


def test_another_vae_or_resolution_is_a_clear_error(cached, tmp_path):
    from megatron_puffin.data import DataConfig, build_data_loader
    from megatron_puffin.data.latents import vae_identity

    paths, model, _, _ = cached
    other = vae_identity(model.vae)
    other = dict(other, weights_sha256="0" * 64)
    expected = r"text2image.*another VAE \(weights sha256 [0-9a-f]{12}\) than the training one \(weights sha256 0{12}\)"
    with pytest.raises(ValueError, match=expected):
        _batches(paths, cached=True, vae_identity=other)
    streams = [f"text2image:{paths['data']}/main:2"]
    config = DataConfig(task_stream=streams, tokenizer=paths["tokenizer"], num_workers=0, image_size=64,
                        pin_memory=False, cached_latents=True)
    with pytest.raises(ValueError, match="--image-size 96 .* training uses --image-size 64"):
        build_data_loader(config, seed=0, num_query_tokens=NUM_QUERIES)
    bare = tmp_path / "bare"
    shutil.copytree(f"{paths['data']}/main/shard-00000", bare)
    for name in (*LATENT_FIELDS, SHAPE_FIELD, CRC_FIELD):
        for suffix in (".bin", ".idx"):
            (bare / f"{name}{suffix}").unlink()
    (bare / "manifest.json").write_text((bare / "manifest.json").read_text().replace('"latents"', '"old_latents"'))
    config.task_stream, config.image_size = [f"text2image:{bare}:2"], IMAGE_SIZE
    with pytest.raises(ValueError, match="has no cached latents; run tools/cache_latents.py"):
        build_data_loader(config, seed=0, num_query_tokens=NUM_QUERIES)


MALFORMED_ENTRIES = [  # (how the hand-edited latents entry changes, what the one line says)
    (lambda entry: [1, 2], "it is [1, 2], not a JSON object"),
    (lambda entry: dict(entry, dtype="int8"), "dtype 'int8' is not one of float32, bfloat16, float16"),
    (lambda entry: dict(entry, latent_channels="4"), "latent_channels '4' is not a positive whole number"),
    (lambda entry: dict(entry, latent_channels=3), "latent_channels 3 differs from its VAE config's 4"),
    (lambda entry: dict(entry, image_size=True), "image_size True is not a positive whole number"),
    (lambda entry: dict(entry, vae=None), "vae is not an object with a config object"),
    (lambda entry: {k: v for k, v in entry.items() if k != "fields"}, "fields.latent_image.num_bytes is missing"),
    (lambda entry: dict(entry, fields=dict(entry["fields"], latent_shape={"num_bytes": -1})),
     "fields.latent_shape.num_bytes is missing or not a whole number"),
    (lambda entry: dict(entry, fields=dict(entry["fields"], latent_crc=7)),
     "fields.latent_crc.num_bytes is missing or not a whole number"),
]


@pytest.mark.parametrize("edit, message", MALFORMED_ENTRIES)
def test_a_malformed_latents_entry_is_one_line_at_start_up_and_replaced_only_when_asked(cached, tmp_path, capsys,
                                                                                       edit, message):
    """A hand-edited or damaged ``latents`` entry is named before any worker reads it (it was a KeyError or a
    reshape error inside a loader worker); the cache tool refuses to skip or replace it unasked."""
    from megatron_puffin.data import DataConfig, build_data_loader, parse_task_stream
    from megatron_puffin.data.format import read_manifest
    from megatron_puffin.data.loader import stream_dataset_errors

    paths = cached[0]
    shard = tmp_path / "shard"
    shutil.copytree(f"{paths['data']}/main/shard-00000", shard)
    manifest = read_manifest(shard)
    manifest["latents"] = edit(manifest["latents"])
    (shard / "manifest.json").write_text(json.dumps(manifest))
    config = DataConfig(task_stream=[f"text2image:{shard}:2"], tokenizer=paths["tokenizer"], num_workers=0,
                        image_size=IMAGE_SIZE, pin_memory=False, cached_latents=True)
    with pytest.raises(ValueError, match="the latents entry of its manifest.json is malformed") as raised:
        build_data_loader(config, seed=0, num_query_tokens=NUM_QUERIES)
    assert message in str(raised.value) and "--overwrite" in str(raised.value)
    errors = stream_dataset_errors(parse_task_stream(f"text2image:{shard}:2"), cached_latents=(IMAGE_SIZE, 32))
    assert len(errors) == 1 and message in errors[0]
    tool = _cache_latents_tool()
    flags = ["--data", str(shard), "--vae-config", paths["vae_config"], "--seed", "0", "--image-size",
             str(IMAGE_SIZE), "--dtype", "float32", "--batch-size", "3"]
    assert tool(flags) == 2
    assert f"already holds a malformed latents entry ({message}" in capsys.readouterr().err
    assert tool([*flags, "--overwrite"]) == 0
    assert "0 shard(s) written, 1 replaced" in capsys.readouterr().out
    build_data_loader(config, seed=0, num_query_tokens=NUM_QUERIES)


def test_a_missing_or_resized_latent_file_is_named_at_start_up(cached, tmp_path):
    from megatron_puffin.data import DataConfig, build_data_loader

    paths = cached[0]
    shard = tmp_path / "shard"
    shutil.copytree(f"{paths['data']}/main/shard-00000", shard)
    config = DataConfig(task_stream=[f"text2image:{shard}:2"], tokenizer=paths["tokenizer"], num_workers=0,
                        image_size=IMAGE_SIZE, pin_memory=False, cached_latents=True)
    with open(shard / "latent_init.bin", "ab") as handle:
        handle.write(b"\0" * 8)
    with pytest.raises(ValueError, match=r"latent_init.bin has \d+ bytes, its manifest says \d+; re-run"):
        build_data_loader(config, seed=0, num_query_tokens=NUM_QUERIES)
    (shard / "latent_camera.idx").unlink()
    (shard / "latent_init.bin").unlink()
    with pytest.raises(ValueError, match="latent_init.bin is missing; re-run tools/cache_latents.py"):
        build_data_loader(config, seed=0, num_query_tokens=NUM_QUERIES)


def test_other_latents_are_replaced_only_when_asked_and_never_half_way(cached, tmp_path, capsys, monkeypatch):
    from megatron_puffin.data.format import read_manifest
    from megatron_puffin.data.latents import cache_shard_latents, check_latent_manifest, vae_identity

    paths, model, _, _ = cached
    shard = tmp_path / "shard"
    shutil.copytree(f"{paths['data']}/main/shard-00000", shard)
    before = {path.name: path.read_bytes() for path in shard.iterdir()}
    tool = _cache_latents_tool()
    flags = ["--data", str(shard), "--vae-config", paths["vae_config"], "--seed", "0", "--image-size",
             str(IMAGE_SIZE), "--dtype", "bfloat16", "--batch-size", "3"]
    assert tool(flags) == 2  # float32 latents are there: not replaced unasked, nothing touched
    assert "another dtype (float32 cached, bfloat16 now); pass --overwrite" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in shard.iterdir()} == before

    class FailingVAE:  # the fixture's VAE, whose second encoder call fails (an error or a kill half-way)
        vae = model.vae.vae

        def __init__(self):
            self.calls = 0

        def encode_moments(self, images):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("interrupted")
            return model.vae.encode_moments(images)

    identity = vae_identity(model.vae)
    with pytest.raises(RuntimeError, match="interrupted"):
        cache_shard_latents(shard, FailingVAE(), IMAGE_SIZE, 32, dtype="bfloat16", batch_size=3, overwrite=True)
    assert {path.name: path.read_bytes() for path in shard.iterdir()} == before  # no half-written field stays
    check_latent_manifest(read_manifest(shard), shard, identity, IMAGE_SIZE, 32, "text2image")  # still usable

    renames = []

    def failing_replace(source, target):  # interrupted among the renames of the new fields into place
        renames.append(target)
        if len(renames) == 3:
            raise OSError("interrupted")
        return real_replace(source, target)

    real_replace = os.replace
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="interrupted"):
        cache_shard_latents(shard, model.vae, IMAGE_SIZE, 32, dtype="bfloat16", batch_size=3, overwrite=True)
    monkeypatch.undo()
    # The old identity went before the first field was renamed: training stops on the shard instead of reading
    # new fields under it.
    with pytest.raises(ValueError, match="has no cached latents"):
        check_latent_manifest(read_manifest(shard), shard, identity, IMAGE_SIZE, 32, "text2image")

    assert tool(flags) == 0  # a re-run after the interruption writes them (the entry is gone: not a replacement)
    assert "1 shard(s) written, 0 replaced, 0 already done" in capsys.readouterr().out
    assert not list(shard.glob("*.tmp*"))  # the interrupted run's partial files were written over and renamed
    assert tool([*flags[:-4], "--dtype", "float16", "--batch-size", "3", "--overwrite"]) == 0
    assert "0 shard(s) written, 1 replaced, 0 already done" in capsys.readouterr().out
    assert read_manifest(shard)["latents"]["dtype"] == "float16"
    assert tool([*flags[:-4], "--dtype", "float16", "--batch-size", "3"]) == 0
    assert "1 already done" in capsys.readouterr().out


def test_a_shard_being_cached_by_another_process_is_named_and_left_to_it(cached, tmp_path, capsys):
    """Two runs of the tool on the same shards (started together, each seeing no latents) wrote the same temporary
    files. The shard is locked while one process writes its latents; this process plays that one (a lock is per
    open file). The tool then stops with one line naming the holder and touches nothing; once free, it writes them
    (with the progress bar on) and leaves no lock file."""
    from megatron_puffin.data.latents import LOCK_NAME
    from megatron_puffin.files import lock_path

    paths, _, _, _ = cached
    shard = tmp_path / "shard"
    shutil.copytree(f"{paths['data']}/main/shard-00000", shard)
    (shard / "manifest.json").write_text(json.dumps({k: v for k, v in json.loads(
        (shard / "manifest.json").read_text()).items() if k != "latents"}))
    before = {path.name: path.read_bytes() for path in shard.iterdir()}
    tool = _cache_latents_tool()
    flags = ["--data", str(shard), "--vae-config", paths["vae_config"], "--seed", "0", "--image-size",
             str(IMAGE_SIZE), "--dtype", "float32", "--batch-size", "3"]
    held = lock_path(shard / LOCK_NAME)
    try:
        assert tool([*flags, "--no-progress"]) == 2
    finally:
        held.release()
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {shard} is being cached by another process (pid {os.getpid()} on "), error
    assert error.endswith("wait for it to end"), error
    (shard / LOCK_NAME).unlink()  # the stand-in holder's file (a tool's own lock goes with its run)
    assert {path.name: path.read_bytes() for path in shard.iterdir()} == before
    assert tool(flags) == 0
    captured = capsys.readouterr()
    assert "1 shard(s) written" in captured.out and "cache latents: 100%" in captured.err
    assert not (shard / LOCK_NAME).exists()


def test_a_write_failure_is_one_line_and_leaves_the_shard_as_it_was(cached, tmp_path):
    """A full disk (here: a per-file size limit, whose EFBIG reaches the same handler as ENOSPC) while the latents
    are written: one line, exit 1, no partial field files, the shard as before; the same command then finishes."""
    import subprocess
    import sys

    paths = cached[0]
    shard = tmp_path / "shard"
    shutil.copytree(f"{paths['data']}/main/shard-00000", shard)
    manifest = json.loads((shard / "manifest.json").read_text())
    del manifest["latents"]  # a shard without latents yet
    (shard / "manifest.json").write_text(json.dumps(manifest))
    for path in shard.glob("latent*"):
        path.unlink()
    before = {path.name: path.read_bytes() for path in shard.iterdir()}

    command = [sys.executable, str(ROOT / "tools" / "cache_latents.py"), "--data", str(shard), "--vae-config",
               paths["vae_config"], "--seed", "0", "--image-size", str(IMAGE_SIZE), "--dtype", "float32"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300,
                          preexec_fn=file_size_limit_in_child(2_000))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: writing the latents failed (File too large"), \
        proc.stderr[-3000:]
    assert {path.name: path.read_bytes() for path in shard.iterdir()} == before
    subprocess.run(command, check=True, capture_output=True, env=env, timeout=300)
    assert "latents" in json.loads((shard / "manifest.json").read_text())


def test_the_refusal_names_a_config_change_of_the_same_weights(cached, tmp_path, capsys):
    import json

    paths = cached[0]
    shard = tmp_path / "shard"
    shutil.copytree(f"{paths['data']}/main/shard-00000", shard)
    manifest = json.loads((shard / "manifest.json").read_text())
    manifest["latents"]["vae"]["config"]["scaling_factor"] = 0.5
    (shard / "manifest.json").write_text(json.dumps(manifest))
    assert _cache_latents_tool()(["--data", str(shard), "--vae-config", paths["vae_config"], "--seed", "0",
                                  "--image-size", str(IMAGE_SIZE), "--dtype", "float32"]) == 2
    assert "another VAE config (scaling_factor: cached 0.5 vs training 1.5305)" in capsys.readouterr().err


def test_a_vae_run_in_another_dtype_is_named_and_latents_from_before_the_dtype_record_still_match(cached, tmp_path,
                                                                                                  capsys):
    """The fixture cached with the VAE in float32; training with --bf16 runs it in bfloat16, which hashes apart: the
    refusal names both dtypes and the tool flag. Latents cached before the identity recorded its dtype keep
    matching the same VAE (loader and tool), and a mismatch with them gets the general dtype hint."""
    import copy

    from megatron_puffin.data.format import read_manifest
    from megatron_puffin.data.latents import check_latent_manifest, vae_identity

    paths, model, _, _ = cached
    shard = tmp_path / "shard"
    shutil.copytree(f"{paths['data']}/main/shard-00000", shard)
    ours = vae_identity(model.vae)
    assert read_manifest(shard)["latents"]["vae"]["dtype"] == ours["dtype"] == "float32"
    bf16 = copy.deepcopy(model.vae).to(torch.bfloat16)
    training = vae_identity(bf16)
    assert training["dtype"] == "bfloat16" and training["weights_sha256"] != ours["weights_sha256"]
    with pytest.raises(ValueError, match="the cache ran the VAE in float32, training runs it in bfloat16: use "
                                         "--vae-dtype bfloat16$"):
        check_latent_manifest(read_manifest(shard), shard, training, IMAGE_SIZE, 32, "text2image")

    manifest = json.loads((shard / "manifest.json").read_text())
    del manifest["latents"]["vae"]["dtype"]  # as written before the identity recorded it
    (shard / "manifest.json").write_text(json.dumps(manifest))
    check_latent_manifest(read_manifest(shard), shard, ours, IMAGE_SIZE, 32, "text2image")  # still the same VAE
    with pytest.raises(ValueError, match=r"another dtype count as another VAE: training runs it in bfloat16, give "
                                         r"--vae-dtype bfloat16\)$"):
        check_latent_manifest(read_manifest(shard), shard, training, IMAGE_SIZE, 32, "text2image")
    flags = ["--data", str(shard), "--vae-config", paths["vae_config"], "--seed", "0", "--image-size",
             str(IMAGE_SIZE), "--dtype", "float32"]
    assert _cache_latents_tool()(flags) == 0 and "1 already done" in capsys.readouterr().out
    assert _cache_latents_tool()([*flags, "--overwrite", "--vae-dtype", "bfloat16"]) == 0
    assert read_manifest(shard)["latents"]["vae"]["dtype"] == "bfloat16"
    assert _cache_latents_tool()(flags) == 2  # float32 asked over bfloat16 latents: refused, naming both
    assert "; run in bfloat16 cached, float32 now); pass --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("vae, flags, message", [
    ("tiny", ["--device", "gpu"], r"^error: --device \(gpu\) is not a torch device; give cpu, cuda or cuda:N$"),
    ("tiny", ["--device", "cuda"], r"^error: --device cuda: no CUDA device is available to this process; use --device "
                                   r"cpu$"),
    ("not_json", [], r"^error: --vae-config \(.*not_json\.json\) is not valid JSON \(.*\); give an AutoencoderKL"),
    ("not_a_vae", [], r"^error: cannot build the VAE from .*not_a_vae\.json: "),
])
def test_bad_tool_flags_are_one_line(cached, tmp_path, capsys, vae, flags, message):
    import re

    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("a CUDA device is available")
    paths = cached[0]
    configs = {"tiny": paths["vae_config"], "not_json": tmp_path / "not_json.json",
               "not_a_vae": tmp_path / "not_a_vae.json"}
    configs["not_json"].write_text('{"block_out_channels": ')
    configs["not_a_vae"].write_text('{"block_out_channels": "x"}')
    code = _cache_latents_tool()(["--data", paths["data"], "--vae-config", str(configs[vae]), "--image-size",
                                  str(IMAGE_SIZE), *flags])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and re.search(message, lines[0]), lines


def test_sixteen_bit_storage_round_trips_the_cast():
    from megatron_puffin.data.latents import _from_storage, _to_storage

    moments = torch.randn(2, 4, 3, 5)
    for dtype, torch_dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)):
        restored = _from_storage(_to_storage(moments, dtype), dtype).reshape(moments.shape)
        assert torch.equal(restored, moments.to(torch_dtype).float()), dtype


def _damage_shape_count(shard):
    shapes = np.fromfile(shard / "latent_shape.bin", dtype=np.int32)
    shapes[0] += 1  # the first sample's target height: the values no longer fill the shape
    shapes.tofile(shard / "latent_shape.bin")


def _damage_shape_same_count(shard):
    shapes = np.fromfile(shard / "latent_shape.bin", dtype=np.int32)
    assert shapes[1] % 2 == 0
    shapes[0], shapes[1] = shapes[0] * 2, shapes[1] // 2  # the same number of values in another shape
    shapes.tofile(shard / "latent_shape.bin")


def _damage_one_bit(shard):
    values = bytearray((shard / "latent_image.bin").read_bytes())
    values[5] ^= 0x10  # one bit of the first sample's target moments; the file keeps its size
    (shard / "latent_image.bin").write_bytes(bytes(values))


@pytest.mark.parametrize("damage, message", [
    (_damage_shape_count, "latent_shape says"),
    (_damage_shape_same_count, "do not match their stored CRC-32"),
    (_damage_one_bit, "do not match their stored CRC-32"),
], ids=["shape", "shape-same-count", "one-bit"])
def test_damaged_latents_make_a_bad_sample_not_a_crash_or_wrong_moments(cached, tmp_path, caplog, damage, message):
    """Damaged bytes that keep the file's size: a stored shape that disagrees with the stored values (was a reshape
    RuntimeError inside the loader), and a shape or a bit changed so that the values still fit (read as wrong
    moments, silently, before the per-sample CRC-32): each sample is counted and skipped like an image that does
    not decode."""
    from megatron_puffin.data import DataConfig, build_data_loader
    from megatron_puffin.data.format import read_manifest
    from megatron_puffin.data.latents import vae_identity

    paths, model, _, _ = cached
    shard = tmp_path / "shard"
    shutil.copytree(f"{paths['data']}/main/shard-00000", shard)
    damage(shard)
    config = DataConfig(task_stream=[f"text2image:{shard}:2"], tokenizer=paths["tokenizer"], num_workers=0,
                        image_size=IMAGE_SIZE, pin_memory=False, cached_latents=True)
    loader = build_data_loader(config, seed=0, num_query_tokens=NUM_QUERIES, vae_identity=vae_identity(model.vae))
    iterator = iter(loader)
    samples = read_manifest(shard)["num_samples"]
    batches = [next(iterator) for _ in range(samples // 2 + 1)]  # one epoch of the shard and a little more
    assert all(batch["target_moments"].shape[1:3] == (2, 4) for batch in batches)
    assert loader.bad_samples_total == 1
    assert message in caplog.text and f"shard {shard} index 0: latent_image" in caplog.text


def test_check_data_reads_cached_latents_too(cached, tmp_path):
    """tools/check_data.py's reader (data/scrub.py) checks each sample's cached latents against their checksums."""
    from megatron_puffin.data.scrub import check_shard

    paths = cached[0]
    shard = tmp_path / "shard"
    shutil.copytree(f"{paths['data']}/main/shard-00000", shard)
    clean = check_shard(str(shard))
    assert (clean.bad, clean.error, clean.checksums, clean.latents) == ([], None, True, True)
    _damage_one_bit(shard)
    report = check_shard(str(shard))
    assert report.samples == clean.samples and report.error is None
    assert report.bad == [f"index 0: ValueError: cached latents of shard {shard} index 0: latent_image: its bytes do "
                          "not match their stored CRC-32 (damaged on disk); re-run tools/cache_latents.py --overwrite"]


def test_latents_cached_without_checksums_are_read_with_a_warning(cached, tmp_path, caplog, capsys):
    """Latents cached before the per-sample checksums existed (no latent_crc field) still train, with one warning
    per stream saying that damage there goes unseen and how to add the checksums; a re-run of the tool with the
    same VAE leaves them as they are and says the same."""
    import logging

    from megatron_puffin.data.latents import LatentCache

    paths = cached[0]
    shard = tmp_path / "shard"
    shutil.copytree(f"{paths['data']}/main/shard-00000", shard)
    for suffix in (".bin", ".idx"):
        (shard / f"{CRC_FIELD}{suffix}").unlink()
    manifest = json.loads((shard / "manifest.json").read_text())
    del manifest["latents"]["fields"][CRC_FIELD]
    (shard / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="megatron_puffin.data.latents"):
        cache = LatentCache(PuffinDataset(str(shard)), None, IMAGE_SIZE, 32, "--task-stream text2image")
        assert cache.moments(0)["target_moments"].shape[:2] == (2, 4)
        assert "1 shard(s) hold latents cached without checksums" in caplog.text
        flags = ["--data", str(shard), "--vae-config", paths["vae_config"], "--seed", "0", "--image-size",
                 str(IMAGE_SIZE), "--dtype", "float32", "--batch-size", "3"]
        assert _cache_latents_tool()(flags) == 0
    assert "0 replaced, 1 already done" in capsys.readouterr().out
    assert "--overwrite re-caches them with checksums" in caplog.text
    assert not (shard / f"{CRC_FIELD}.bin").exists()


def test_latents_truncated_under_the_run_are_one_error_not_a_sigbus(cached, tmp_path):
    """The cached moments are memory-mapped like the other fields: reads check the file's size first. In a child
    process, so that a regression (a SIGBUS) cannot kill the suite."""
    import subprocess
    import sys

    paths = cached[0]
    shutil.copytree(f"{paths['data']}/main", tmp_path / "main")
    shard = sorted((tmp_path / "main").glob("shard-*"))[0]
    child = f"""
from megatron_puffin.data.format import PuffinDataset, ShardUnavailableError
from megatron_puffin.data.latents import LatentCache
cache = LatentCache(PuffinDataset({str(tmp_path / 'main')!r}), None, {IMAGE_SIZE}, 32, "--task-stream text2image")
assert cache.moments(0)["target_moments"].shape[0] == 2
with open({str(shard / 'latent_image.bin')!r}, "r+b") as handle:
    handle.truncate(4)
try:
    cache.moments(0)
except ShardUnavailableError as error:
    print("stopped:", error)
"""
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="",
                                     PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])  # -7: SIGBUS
    assert "latent_image.bin now has 4 bytes" in result.stdout, result.stdout


def test_processes_of_a_torchrun_launch_split_the_shards_and_write_what_one_process_writes(cached, tmp_path, capsys,
                                                                                         monkeypatch):
    """Under torchrun (RANK / WORLD_SIZE set) each process takes every WORLD_SIZE-th shard: none is written twice
    (two processes renaming into one shard raced before), and the files equal one process's."""
    from megatron_puffin.data.format import find_shards

    paths = cached[0]
    shutil.copytree(paths["data"], tmp_path / "split")
    shutil.copytree(paths["data"], tmp_path / "single")
    tool = _cache_latents_tool()
    flags = ["--vae-config", paths["vae_config"], "--seed", "0", "--image-size", str(IMAGE_SIZE), "--dtype",
             "bfloat16", "--batch-size", "3", "--overwrite"]  # the fixture's float32 latents are replaced
    shards = len(find_shards(tmp_path / "split"))
    assert shards >= 2
    replaced = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert tool(["--data", str(tmp_path / "split"), *flags]) == 0
        line = capsys.readouterr().out.strip()
        assert line.startswith(f"process {rank} of 2: cached bfloat16 VAE latents"), line
        replaced.append(int(line.split(" replaced")[0].split()[-1]))
    assert replaced == [(shards + 1) // 2, shards // 2]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert tool(["--data", str(tmp_path / "single"), *flags]) == 0
    files = {path.relative_to(tmp_path / "single"): path.read_bytes()
             for path in sorted((tmp_path / "single").rglob("*")) if path.is_file()}
    assert files and all((tmp_path / "split" / name).read_bytes() == content for name, content in files.items())


def test_a_sample_that_does_not_decode_is_named_and_left_without_latents(cached, tmp_path, capsys, caplog):
    """A shard damaged after preprocessing (the first half of its image bytes garbled): the tool names each sample
    that does not decode, leaves it without latents and counts it, where it stopped at the first one with exit 2 and
    a line naming neither shard nor sample; training with --cached-latents skips those samples as bad samples (its
    loader fails to decode them before reading latents) and every batch it gives has the cached moments."""
    import logging

    from megatron_puffin.data import DataConfig, build_data_loader

    paths = cached[0]
    shard = tmp_path / "shard"
    shutil.copytree(f"{paths['data']}/main/shard-00000", shard)
    for name in (*LATENT_FIELDS, SHAPE_FIELD, CRC_FIELD):
        for suffix in (".bin", ".idx"):
            (shard / f"{name}{suffix}").unlink()
    manifest = json.loads((shard / "manifest.json").read_text())
    del manifest["latents"]
    (shard / "manifest.json").write_text(json.dumps(manifest))
    images = bytearray((shard / "image.bin").read_bytes())
    for index in range(0, len(images) // 2, 7):
        images[index] = 0x41
    (shard / "image.bin").write_bytes(bytes(images))
    flags = ["--data", str(shard), "--vae-config", paths["vae_config"], "--seed", "0", "--image-size",
             str(IMAGE_SIZE), "--dtype", "float32", "--batch-size", "3"]
    with caplog.at_level(logging.WARNING, logger="megatron_puffin.data.latents"):
        assert _cache_latents_tool()(flags) == 0
    named = [record.getMessage() for record in caplog.records if "left without latents" in record.getMessage()]
    assert named and all(f"shard {shard} index " in line and "field image: its bytes do not match their stored "
                         "CRC-32" in line for line in named), named
    assert (f"1 shard(s) written, 0 replaced, 0 already done; {len(named)} sample(s) do not decode and have no "
            "latents") in capsys.readouterr().out
    config = DataConfig(task_stream=[f"text2image:{shard}:2"], tokenizer=paths["tokenizer"], num_workers=0,
                        image_size=IMAGE_SIZE, pin_memory=False, cached_latents=True)
    loader = build_data_loader(config, seed=0, num_query_tokens=NUM_QUERIES)
    iterator = iter(loader)
    for _ in range(4):
        batch = next(iterator)
        assert batch["target_moments"].shape[0] == 2
    assert loader.bad_samples_total > 0
