"""tools/understand.py and tools/generate.py end to end on a tiny checkpoint (written in the training format) and the
synthetic dataset's images: outputs equal the library's, files a user can open, one-line errors."""
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import megatron_puffin.distributed as mpd
from helpers.faults import file_size_limit
from helpers.inference import build_tiny_model, save_model_checkpoint
from helpers.puffin import ROOT, make_tiny_dataset, run_script, start_script

ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
NEW_TOKENS = 6
LIMIT_BYTES = 12_000  # below one generated PNG
STEPS = 2


def _tool(name, *args, check=True):
    quiet = ["--no-progress"] if name in ("understand.py", "generate.py") else []
    # forked from the suite's pre-imported server: the real command without an interpreter start (helpers.puffin)
    return run_script(ROOT / "tools" / name, *args, *quiet, cwd=os.getcwd(), env=ENV, check=check)


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference_cli")
    paths = make_tiny_dataset(root / "tiny", num_samples=4)
    mpd.initialize(seed=0)
    model, args = build_tiny_model(paths)
    save_model_checkpoint(model, args, root / "run" / "iter_0000002", iteration=2)
    images = sorted((root / "tiny" / "raw" / "local_folder").rglob("*.jpg"))[:3]
    yield root, paths, model, images
    mpd.destroy()


def test_understand_writes_the_library_answers_and_evaluate_camera_scores_them(artefacts):
    from megatron_puffin.data import PuffinTokenizer
    from megatron_puffin.inference import load_image, understand

    root, paths, model, images = artefacts
    listing = root / "images.txt"
    listing.write_text("\n".join(str(p) for p in images))
    out = root / "und" / "predictions.json"
    proc = _tool("understand.py", "--checkpoint", root / "run", "--images", listing, "--output", out,
                 "--max-new-tokens", NEW_TOKENS, "--thinking", "--batch-size", 2)
    assert "wrote" in proc.stdout
    records = json.loads(out.read_text())
    expected = understand(model, PuffinTokenizer(paths["tokenizer"]), [load_image(p, 96) for p in images],
                          thinking=True, max_new_tokens=NEW_TOKENS)
    assert [r["id"] for r in records] == [p.name for p in images]
    assert [r["output_text"] for r in records] == [e.text for e in expected]
    assert all(set(r) == {"id", "output_text", "camera", "reasoning", "finished"} for r in records)
    # the finished answers are never replaced unasked: one line before the model loads; --overwrite replaces them
    before = out.read_bytes()
    again = _tool("understand.py", "--checkpoint", root / "run", "--images", images[0], "--output", out, check=False)
    assert again.returncode != 0 and "Traceback" not in again.stderr, again.stderr
    assert f"--output {out} already exists (the answers of an earlier run); choose another file, or pass " \
           "--overwrite to replace it" in again.stderr
    assert out.read_bytes() == before
    _tool("understand.py", "--checkpoint", root / "run", "--images", images[0], "--output", out, "--overwrite",
          "--max-new-tokens", NEW_TOKENS)
    assert [r["id"] for r in json.loads(out.read_text())] == [images[0].name]
    out.write_bytes(before)  # the camera evaluation below scores the first run's answers
    scored = _tool("evaluate_camera.py", "--predictions", out, "--ground-truth",
                   root / "tiny" / "raw" / "cameras.csv", "--output-dir", root / "und" / "eval")
    metrics = json.loads((root / "und" / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == len(images) and "median_roll_error" in metrics, scored.stdout
    rows = len((root / "tiny" / "raw" / "cameras.csv").read_text().splitlines()) - 1
    assert rows > len(images)  # images of the ground truth without a prediction are said to be missing
    assert f"note: {rows - len(images)} of the {rows} images of --ground-truth have no prediction" in scored.stderr


def test_generate_writes_images_contact_sheet_json_and_camera_faithfulness(artefacts):
    from megatron_puffin.camera import Camera
    from megatron_puffin.data import PuffinTokenizer
    from megatron_puffin.inference import GenerationRequest, GenerationSettings, generate, load_image

    root, paths, model, images = artefacts
    requests = root / "requests.json"
    requests.write_text(json.dumps([
        {"id": "kitchen", "caption": "a kitchen", "roll": 0.1, "pitch": -0.2, "vfov": 1.0, "seed": 3},
        {"id": "explore", "roll": 0.0, "pitch": 0.1, "yaw": 1.571, "init_image": str(images[0])},
    ]))
    out = root / "gen"
    _tool("generate.py", "--checkpoint", root / "run", "--prompts", requests, "--output-dir", out, "--steps", STEPS,
          "--evaluate-cameras", "--max-new-tokens", NEW_TOKENS)
    document = json.loads((out / "generations.json").read_text())
    records = {r["id"]: r for r in document["images"]}
    assert records["kitchen"]["task"] == "cam2image" and records["explore"]["task"] == "image2image"
    assert records["explore"]["camera"] == {"roll": 0.0, "pitch": 0.1, "vfov": 1.48, "yaw": 1.571}
    assert records["explore"]["prompt"].endswith("The deviation of the camera yaw angle is 1.5710.")
    assert all("estimated_camera" in r and "estimate_text" in r for r in records.values())
    tokenizer = PuffinTokenizer(paths["tokenizer"])
    settings = GenerationSettings(num_inference_steps=STEPS)
    expected = generate(model, tokenizer, [GenerationRequest(Camera(0.1, -0.2, 1.0), "a kitchen", seed=3),
                                           GenerationRequest(Camera(0.0, 0.1, 1.48, 1.571), seed=43,
                                                             init_image=load_image(images[0], 96, "resize"))],
                        settings)
    for name, result in zip(("kitchen", "explore"), expected):
        written = torch.from_numpy(__import__("numpy").asarray(Image.open(out / f"{name}.png")).copy())
        assert (written.int() - result.image.int()).abs().max() <= 1, name
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width >= 2 * 96 and sheet.height > 96
    metrics = json.loads((out / "camera_faithfulness" / "metrics.json").read_text())
    assert metrics["num_images"] == 2 and (out / "camera_faithfulness" / "errors.png").exists()


def test_data_parallel_replicas_share_the_work_and_write_what_one_process_writes(artefacts):
    """Two processes at TP=1 (as torchrun starts them) are two replicas that take turns, one batch each per round
    (tools' ReplicaRounds): batch size 1 over three items makes two rounds, the second with nothing for the second
    replica. Answers, images, estimated cameras and the JSON equal a single process's byte for byte."""
    root, _, _, images = artefacts
    listing = root / "dp_images.txt"
    listing.write_text("\n".join(str(p) for p in images))
    requests = root / "dp_requests.json"
    requests.write_text(json.dumps([
        {"id": "a", "caption": "a kitchen", "roll": 0.1, "pitch": -0.2, "vfov": 1.0},
        {"id": "b", "roll": 0.0, "pitch": 0.1, "yaw": 1.571, "init_image": str(images[0])},
        {"id": "c", "caption": "a hall", "roll": -0.1, "pitch": 0.0, "vfov": 0.9, "seed": 7},
    ]))
    written = {}
    for nproc in (1, 2):
        out = root / f"dp{nproc}"
        common = dict(cwd=os.getcwd(), env=ENV, nproc=nproc)
        proc = run_script(ROOT / "tools" / "understand.py", "--checkpoint", root / "run", "--images", listing,
                          "--output", out / "predictions.json", "--max-new-tokens", NEW_TOKENS, "--batch-size", 1,
                          "--no-progress", **common)
        assert proc.stdout.count("wrote") == 1  # rank 0 alone writes and reports
        run_script(ROOT / "tools" / "generate.py", "--checkpoint", root / "run", "--prompts", requests,
                   "--output-dir", out / "gen", "--steps", STEPS, "--batch-size", 1, "--evaluate-cameras",
                   "--max-new-tokens", NEW_TOKENS, "--no-progress", **common)
        written[nproc] = {path.relative_to(out): path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}
    assert sorted(map(str, written[2])) == sorted(map(str, written[1]))
    assert {str(name) for name in written[1]} >= {"predictions.json", "gen/a.png", "gen/b.png", "gen/c.png",
                                                   "gen/generations.json", "gen/contact_sheet.png"}
    for name, content in written[1].items():
        assert written[2][name] == content, name


def _tool_main(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.replace(".py", "_tool"), ROOT / "tools" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("tool, args, message", [
    ("understand.py", ["--images", "BAD", "--output", "x.json"],
     r"does not decode \(image_unreadable: UnidentifiedImageError: cannot identify image file\); remove"),
    ("understand.py", ["--images", "IMAGE", "--output", "x.json", "--checkpoint", "MISSING"],
     "no such file or directory"),
    ("understand.py", ["--images", "IMAGE", "--output", "x.json", "--hidden-size", "64", "--ffn-hidden-size", "96"],
     "does not fit the model shape"),
    # was the allocator's traceback from inside megatron-core's first layer (a 40 GB weight)
    ("understand.py", ["--images", "IMAGE", "--output", "x.json", "--hidden-size", "10000000"],
     r"does not fit this process's memory \(.* available \(memory and swap\)\); the model flags given here "
     r"\(--hidden-size 10000000\) replace its stored ones; use more processes"),
    ("generate.py", ["--output-dir", "GEN", "--roll", "0.1", "--pitch", "1.9", "--vfov", "1.0"],
     r"camera pitch \(1.9 rad\) must lie in \[-pi/2, pi/2\]"),
    ("generate.py", ["--output-dir", "GEN", "--num-views", "2"], "--num-views N .* needs --init-image"),
    # outputs that cannot be written are named before the model is loaded, not after every image is done
    ("understand.py", ["--images", "IMAGE", "--output", "FOLDER"], "--output .* is a folder; give the path of a file"),
    ("understand.py", ["--images", "IMAGE", "--output", "FILE/p.json"], "cannot create the folder"),
    ("understand.py", ["--images", "IMAGE", "--output", "x.json", "--task", "spatial-imagination", "--yaw", "nan"],
     r"--yaw \(nan\) must be a finite number"),
    ("generate.py", ["--output-dir", "FILE", "--roll", "0", "--pitch", "0", "--vfov", "1"],
     "--output-dir .* is a file; give a folder"),
    # were NaN images written without a word, torch's "Overflow when unpacking long long", a 120 GB allocation
    ("generate.py", ["--output-dir", "GEN", "--roll", "0", "--pitch", "0", "--vfov", "1", "--guidance-scale", "nan"],
     r"--guidance-scale \(nan\) must be a finite number"),
    ("generate.py", ["--output-dir", "GEN", "--roll", "0", "--pitch", "0", "--vfov", "1", "--seed", str(10 ** 20)],
     r"seed 100000000000000000000 is out of range"),
    ("generate.py", ["--output-dir", "GEN", "--roll", "0", "--pitch", "0", "--vfov", "1", "--image-size", "96000"],
     r"image size 96000 must lie in \[8, "),
    # was numpy's 7.28 TiB allocation error, a traceback; a model flag of the sampling settings is checked as in
    # training
    ("generate.py", ["--output-dir", "GEN", "--roll", "0", "--pitch", "0", "--vfov", "1", "--steps", str(10 ** 12)],
     r"--steps \(1000000000000\) must lie in \[1, 10,000\]"),
    ("generate.py", ["--output-dir", "GEN", "--roll", "0", "--pitch", "0", "--vfov", "1",
                     "--flow-num-inference-steps", "0"], r"--flow-num-inference-steps \(0\) must lie in \[1, 10,000\]"),
    # a capitalised column used to be ignored (images made without their captions); an unquoted comma, a traceback
    ("generate.py", ["--output-dir", "GEN", "--prompts", "CAPITALISED"],
     r"row 0: unknown field 'Caption'; the fields are id, caption, roll"),
    ("generate.py", ["--output-dir", "GEN", "--prompts", "UNQUOTED"], r"line 2: more values than the header has"),
    # its PNG was overwritten by the contact sheet: the folder held no generated image
    ("generate.py", ["--output-dir", "GEN", "--prompts", "SHEET_ID"],
     r"row 0: id 'contact_sheet' is the contact sheet's name \(contact_sheet.png\); choose another id"),
    # another vocabulary than the checkpoint's: every shape fits, the answers would be other words
    ("understand.py", ["--images", "IMAGE", "--output", "x.json", "--tokenizer", "OTHER_TOKENIZER"],
     r"it was trained with the tokenizer .* its token ids would mean other words; give --tokenizer"),
    # was a traceback from the prompt assembly, after the model had loaded; then a line asking to raise a training
    # flag that understand.py does not have
    ("understand.py", ["--images", "IMAGE", "--output", "x.json", "--prompt", "describe the room " * 1500],
     r"--prompt: with the task's template it has \d+ text tokens, more than the \d+ this checkpoint's prompts hold "
     r"\(set by its training's --max-understanding-text-tokens\); shorten --prompt$"),
    # an HF tokenizer folder whose tokenizer.json is garbled: was the tokenizers library's bare Exception, a traceback
    ("understand.py", ["--images", "IMAGE", "--output", "x.json", "--tokenizer", "BROKEN_TOKENIZER"],
     r"^understand.py: error: --tokenizer \S+broken_tokenizer: \S+broken_tokenizer cannot be loaded as a tokenizer "
     r"\(Exception: .*\); give an HF tokenizer directory or a SentencePiece .model$"),
    # were a traceback ending in the (clear) CheckpointError: a checkpoint whose bytes changed after it was written
    ("understand.py", ["--images", "IMAGE", "--output", "x.json", "--checkpoint", "DAMAGED"],
     r"^understand.py: error: \S+__0_0.distcp does not match its SHA-256 in puffin_manifest.json .*; use an earlier "
     r"checkpoint$"),
    ("generate.py", ["--output-dir", "GEN", "--roll", "0", "--pitch", "0", "--vfov", "1", "--checkpoint", "DAMAGED"],
     r"^generate.py: error: \S+__0_0.distcp does not match its SHA-256"),
    # every wrong request at once, not one per re-run
    ("generate.py", ["--output-dir", "GEN", "--prompts", "TWO_BAD"],
     r"^generate.py: error: 2 of 3 requests are wrong: --prompts \S+ row 0: camera vfov .*; --prompts \S+ row 2: "
     r"give pitch \(radians\)$"),
])
def test_bad_inputs_exit_with_one_line(artefacts, tool, args, message, capsys):
    """In-process (a process start per case would cost seconds each); the two tests above run the real commands."""
    import re

    root, _, _, images = artefacts
    (root / "bad.jpg").write_bytes(b"not an image")
    (root / "a_file").write_text("")
    (root / "capitalised.csv").write_text("id,Caption,roll,pitch,vfov\nk,a kitchen,0.1,0.0,1.0\n")
    (root / "unquoted.csv").write_text("id,caption,roll,pitch,vfov\nk,a kitchen, table and chairs,0.1,0.0,1.0\n")
    (root / "sheet_id.csv").write_text("id,caption,roll,pitch,vfov\ncontact_sheet,a room,0.1,0.0,1.0\n")
    (root / "broken_tokenizer").mkdir(exist_ok=True)
    (root / "broken_tokenizer" / "tokenizer.json").write_text("[1, 2")
    if not (root / "other_tokenizer.model").exists():
        from megatron_puffin.data.tokenizer import train_sentencepiece_tokenizer

        train_sentencepiece_tokenizer(["a photo of a cat on a mat"] * 10, root / "other_tokenizer.model", 300)
    (root / "two_bad.json").write_text(json.dumps([{"id": "a", "roll": 0, "pitch": 0, "vfov": 4},
                                                   {"id": "b", "roll": 0, "pitch": 0, "vfov": 1},
                                                   {"id": "c", "roll": 0, "vfov": 1}]))
    damaged = root / "damaged_run"
    if not damaged.exists():
        import shutil

        shutil.copytree(root / "run", damaged)
        shard = damaged / "iter_0000002" / "__0_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size: only the SHA-256 of the manifest tells
        shard.write_bytes(bytes(data))
    substitutions = {"DAMAGED": damaged, "CAPITALISED": root / "capitalised.csv", "UNQUOTED": root / "unquoted.csv",
                     "SHEET_ID": root / "sheet_id.csv", "BROKEN_TOKENIZER": root / "broken_tokenizer",
                     "TWO_BAD": root / "two_bad.json", "OTHER_TOKENIZER": root / "other_tokenizer.model",
                     "BAD": root / "bad.jpg", "IMAGE": images[0], "MISSING": root / "missing", "FOLDER": root,
                     "FILE": root / "a_file", "FILE/p.json": root / "a_file" / "p.json", "GEN": root / "gen_bad"}
    args = [str(substitutions.get(a, a)) for a in args]
    if "--checkpoint" not in args:
        args = ["--checkpoint", str(root / "run")] + args
    try:
        code = _tool_main(tool)(args + ["--no-progress"])
    finally:
        mpd.initialize(seed=0)  # the tool released the process group; the module fixture's model still needs it
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and re.search(message, lines[0]), lines


def test_generate_samples_with_the_checkpoints_flow_settings_and_a_refused_overwrite_keeps_the_old_run(artefacts,
                                                                                                        capsys):
    """Without --steps / --guidance-scale the images are sampled with the checkpoint's training flags
    (--flow-num-inference-steps, --flow-guidance-scale; they were parsed and never read), and equal the images of the
    same values given on the command line. An --overwrite run that its own settings refuse leaves the earlier outputs
    in place (they were removed before the settings were checked)."""
    import dataclasses

    root, paths, model, _ = artefacts
    _, args = build_tiny_model(paths)
    args = dataclasses.replace(args, flow=dataclasses.replace(args.flow, num_inference_steps=3, guidance_scale=1.0))
    save_model_checkpoint(model, args, root / "flow_run" / "iter_0000002", iteration=2)
    request = ["--roll", "0.1", "--pitch", "0", "--vfov", "1.0", "--no-progress"]
    runs = {"defaults": [], "given": ["--steps", "3", "--guidance-scale", "1.0"]}
    try:
        for name, flags in runs.items():
            assert _tool_main("generate.py")(["--checkpoint", str(root / "flow_run"), "--output-dir",
                                              str(root / "flow" / name), *request, *flags]) == 0
            mpd.initialize(seed=0)
        settings = json.loads((root / "flow" / "defaults" / "generations.json").read_text())["settings"]
        assert (settings["steps"], settings["guidance_scale"]) == (3, 1.0)
        images = [(root / "flow" / name / "0000.png").read_bytes() for name in runs]
        assert images[0] == images[1]
        before = sorted(path.name for path in (root / "flow" / "given").iterdir())
        capsys.readouterr()
        assert _tool_main("generate.py")(["--checkpoint", str(root / "flow_run"), "--output-dir",
                                          str(root / "flow" / "given"), *request, "--image-size", "7",
                                          "--overwrite"]) == 2
    finally:
        mpd.initialize(seed=0)
    assert "image size 7 must be a multiple of 8" in capsys.readouterr().err
    assert sorted(path.name for path in (root / "flow" / "given").iterdir()) == before == [
        "0000.png", "contact_sheet.png", "generations.json"]


def test_a_second_run_into_the_same_outputs_stops_with_one_line_naming_the_first(artefacts, capsys):
    """Two runs into one --output-dir (--output) both passed the earlier-run checks and wrote the same journal and
    folder: images of two settings under one generations.json. The first holds a lock beside the outputs (removed at
    its end); a second stops before any work. This process plays the first run (a lock is per open file)."""
    from megatron_puffin.files import lock_path

    root, _, _, images = artefacts
    runs = {"generate.py": (root / "locked_gen", root / "locked_gen" / ".generate.lock",
                            ["--output-dir", str(root / "locked_gen"), "--roll", "0", "--pitch", "0", "--vfov", "1",
                             "--steps", str(STEPS)]),
            "understand.py": (root / "locked.json", root / ".locked.json.lock",
                              ["--output", str(root / "locked.json"), "--images", str(images[0]), "--max-new-tokens",
                               str(NEW_TOKENS)])}
    for tool, (output, lock_file, flags) in runs.items():
        held = lock_path(lock_file)
        try:
            code = _tool_main(tool)(["--checkpoint", str(root / "run"), *flags, "--no-progress"])
        finally:
            held.release()
            mpd.initialize(seed=0)
        assert code == 2
        line = capsys.readouterr().err.strip()
        assert line.startswith(f"{tool}: error: --output") and f"is in use by another {tool} run (pid " in line, line
        assert line.endswith("wait for it to end, or choose another output"), line
        written = [] if not output.exists() else [path for path in output.iterdir() if path != lock_file] \
            if output.is_dir() else [output]
        assert written == [], "the second run wrote nothing"
        try:
            assert _tool_main(tool)(["--checkpoint", str(root / "run"), *flags, "--no-progress"]) == 0
        finally:
            mpd.initialize(seed=0)
        assert output.exists() and not lock_file.exists(), "the lock goes with its run"


def test_a_killed_generate_keeps_its_finished_images_and_a_rerun_resumes(artefacts):
    """SIGKILL after the first batch's PNG and journal line; the same command again generates only the rest (the
    kept PNG is not rewritten) and its outputs equal an uninterrupted run's; on the finished folder it generates
    nothing. Other settings never replace another run's images or journal unless --overwrite."""
    import signal
    import time

    root, _, _, _ = artefacts
    requests = root / "resume.json"
    requests.write_text(json.dumps([{"id": f"r{i}", "caption": "a room", "roll": 0.1 * i, "pitch": 0.0, "vfov": 1.0}
                                    for i in range(3)]))
    out, journal = root / "resume", root / "resume" / "generations.partial.jsonl"
    args = ["--checkpoint", root / "run", "--prompts", requests, "--output-dir", out, "--batch-size", 1,
            "--guidance-scale", 1.0, "--no-progress"]
    # enough Euler steps that the kill lands between batches (the process forked from the suite's pre-imported server)
    proc = start_script(ROOT / "tools" / "generate.py", *args, "--steps", 40, cwd=os.getcwd(), env=ENV)
    deadline = time.time() + 300
    while not (journal.is_file() and len(journal.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {json.loads(line)["id"] for line in journal.read_text().splitlines()[1:]}
    assert finished and not (out / "generations.json").exists()
    kept = {name: (out / f"{name}.png").stat().st_mtime_ns for name in finished}
    proc = _tool("generate.py", *args, "--steps", 40)
    document = json.loads((out / "generations.json").read_text())
    assert [r["id"] for r in document["images"]] == ["r0", "r1", "r2"] and not journal.exists()
    assert {name: (out / f"{name}.png").stat().st_mtime_ns for name in finished} == kept
    assert f"kept {len(finished)} finished images" in proc.stderr
    resumed = {r["id"]: (out / r["file"]).read_bytes() for r in document["images"]}
    _tool("generate.py", *args, "--steps", 40, "--output-dir", root / "straight")
    assert resumed == {name: (root / "straight" / f"{name}.png").read_bytes() for name in resumed}

    pngs = {name: (out / f"{name}.png").stat().st_mtime_ns for name in resumed}
    # the same command on the finished folder generates nothing again
    proc = _tool("generate.py", *args, "--steps", 40)
    assert "kept 3 finished images" in proc.stderr
    assert {name: (out / f"{name}.png").stat().st_mtime_ns for name in resumed} == pngs
    # a journal of other settings holds another interrupted run's work: never replaced unasked
    journal.write_text(json.dumps({"key": {"tool": "generate", "steps": 3}}) + "\n" + json.dumps(
        document["images"][0]) + "\n")
    proc = _tool("generate.py", *args, "--steps", 40, check=False)
    assert proc.returncode == 2 and "holds 1 finished images of an interrupted run with other settings" in proc.stderr
    assert "steps 3 (then) vs 40 (now)" in proc.stderr and "pass --overwrite to discard them" in proc.stderr
    assert journal.is_file() and {name: (out / f"{name}.png").stat().st_mtime_ns for name in resumed} == pngs
    proc = _tool("generate.py", *args, "--steps", 40, "--overwrite")
    assert "discarding 1 finished images" in proc.stderr and "kept 3 finished images" in proc.stderr
    # a finished folder of other settings: an error; --overwrite replaces that run's files, none left behind
    proc = _tool("generate.py", *args, "--steps", 2, check=False)
    assert proc.returncode == 2 and "holds 3 images of another generate.py run" in proc.stderr
    assert "steps 40 (then) vs 2 (now)" in proc.stderr
    assert {name: (out / f"{name}.png").stat().st_mtime_ns for name in resumed} == pngs
    requests.write_text(json.dumps([{"id": "r0", "caption": "a room", "roll": 0.0, "pitch": 0.0, "vfov": 1.0}]))
    proc = _tool("generate.py", *args, "--steps", 2, "--overwrite")
    assert "removed the outputs of another run" in proc.stderr
    assert sorted(path.name for path in out.iterdir()) == ["contact_sheet.png", "generations.json", "r0.png"]
    assert json.loads((out / "generations.json").read_text())["key"]["steps"] == 2


def test_an_interrupted_understand_keeps_finished_batches_and_a_rerun_resumes(artefacts, monkeypatch, capsys):
    """Interrupted (Ctrl-C) after its first batch: the journal holds that batch; the same command again decodes only
    the rest (and a finished image replaced in place since) and writes what an uninterrupted run writes."""
    import shutil

    import megatron_puffin.inference as inference

    root, _, _, originals = artefacts
    out = root / "und_resume" / "predictions.json"
    (root / "und_images").mkdir()
    images = [Path(shutil.copy(image, root / "und_images" / image.name)) for image in originals]

    def command(output):
        return ["--checkpoint", str(root / "run"), "--images", *map(str, images), "--output", str(output),
                "--max-new-tokens", str(NEW_TOKENS), "--batch-size", "2", "--no-progress"]

    real, calls = inference.understand, []

    def interrupted(*a, **k):
        calls.append(len(a[2]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(inference, "understand", interrupted)
    try:
        assert _tool_main("understand.py")(command(out)) == 130  # one line, no traceback
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            "understand.py: interrupted (Ctrl-C); the outputs finished so far are kept: run the same command again "
            "(it resumes)")
        journal = out.with_name("predictions.json.partial.jsonl")
        assert [json.loads(line)["id"] for line in journal.read_text().splitlines()[1:]] == [p.name for p in images[:2]]
        assert not out.exists()
        # other settings never discard the interrupted run's answers unasked
        other = command(out)
        other[other.index("--max-new-tokens") + 1] = str(NEW_TOKENS + 1)
        assert _tool_main("understand.py")(other) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert (f"holds 2 finished images of an interrupted run with other settings (max_new_tokens {NEW_TOKENS} "
                f"(then) vs {NEW_TOKENS + 1} (now)): run that command again to finish it") in line, line
        assert len(journal.read_text().splitlines()) == 3
        calls.clear()
        os.utime(images[0], ns=(0, 0))  # "replaced": its journal answer no longer counts
        monkeypatch.setattr(inference, "understand", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
        assert _tool_main("understand.py")(command(out)) == 0
        assert calls == [2] and not journal.exists()
        printed = capsys.readouterr().out
        assert "3 images (" in printed and "1 kept from an interrupted run" in printed, printed
        resumed = json.loads(out.read_text())
        assert _tool_main("understand.py")(command(root / "und_resume" / "straight.json")) == 0
    finally:
        mpd.initialize(seed=0)
    assert resumed == json.loads((root / "und_resume" / "straight.json").read_text())


def test_sigterm_is_one_line_keeps_finished_batches_and_a_second_one_is_ignored(artefacts, monkeypatch, capsys):
    """A scheduler's SIGTERM (twice, as a kill-after does) during the second batch: exit 143 with one line, the first
    batch in the journal, the tool's handlers gone afterwards. Before, SIGTERM ended the tool without a word."""
    import shutil
    import signal

    import megatron_puffin.inference as inference

    root, _, _, originals = artefacts
    out = root / "und_term" / "predictions.json"
    (root / "term_images").mkdir()
    images = [Path(shutil.copy(image, root / "term_images" / image.name)) for image in originals]
    real, calls = inference.understand, []

    def terminated(*a, **k):
        calls.append(len(a[2]))
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(inference, "understand", terminated)
    try:
        code = _tool_main("understand.py")(["--checkpoint", str(root / "run"), "--images", *map(str, images),
                                            "--output", str(out), "--max-new-tokens", str(NEW_TOKENS),
                                            "--batch-size", "2", "--no-progress"])
        assert code == 128 + signal.SIGTERM
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            "understand.py: stopped by SIGTERM; the outputs finished so far are kept: run the same command again "
            "(it resumes)")
        journal = out.with_name("predictions.json.partial.jsonl")
        assert [json.loads(line)["id"] for line in journal.read_text().splitlines()[1:]] == [p.name for p in images[:2]]
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    finally:
        mpd.initialize(seed=0)


def test_every_unreadable_image_is_named_at_once_and_skip_bad_images_describes_the_others(artefacts, capsys):
    """A folder with two good images and three bad ones: one line naming the count and the first ones, before the
    model loads; with --skip-bad-images the good ones are described and the summary counts the others."""
    import shutil

    root, _, _, images = artefacts
    folder = root / "mixed"
    folder.mkdir()
    for image in images[:2]:
        shutil.copy(image, folder / image.name)
    (folder / "a_empty.jpg").write_bytes(b"")
    (folder / "b_text.png").write_text("not an image")
    (folder / "c_cut.jpg").write_bytes(images[2].read_bytes()[:200])
    out = root / "mixed_out" / "predictions.json"
    command = ["--checkpoint", str(root / "run"), "--images", str(folder), "--output", str(out),
               "--max-new-tokens", str(NEW_TOKENS), "--no-progress"]
    try:
        assert _tool_main("understand.py")(command) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("understand.py: error: 3 of 5 images cannot be read: "), lines
        assert "a_empty.jpg does not decode (image_empty" in lines[0] and "c_cut.jpg" in lines[0], lines
        assert lines[0].endswith("or pass --skip-bad-images to describe the others"), lines
        assert not out.exists()
        assert _tool_main("understand.py")(command + ["--skip-bad-images"]) == 0
    finally:
        mpd.initialize(seed=0)
    assert [r["id"] for r in json.loads(out.read_text())] == sorted(p.name for p in images[:2])
    assert "3 unreadable left out" in capsys.readouterr().out


def test_image_folders_are_searched_with_their_sub_folders(tmp_path, caplog):
    """A Puffin-4M image folder keeps its images in numbered sub-folders (local_folder/000000/*.jpg); the folder
    itself must work as --images, in path order, files of other suffixes are skipped with a warning that says so,
    and two images of one name stay an error (ids are file names)."""
    import importlib.util
    import logging

    from megatron_puffin.inference.cli import UsageError

    spec = importlib.util.spec_from_file_location("understand_tool", ROOT / "tools" / "understand.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for name in ("000001/b.jpg", "000000/a.png", "000000/notes.txt", "c.jpg"):
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "images" / name).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="understand"):
        found = tool.collect_images([str(tmp_path / "images")])
    assert [p.relative_to(tmp_path / "images").as_posix() for p in found] == ["000000/a.png", "000001/b.jpg", "c.jpg"]
    assert f"1 file(s) without an image suffix (.jpg, .jpeg, .png, .webp, .bmp) skipped, e.g. " \
           f"{tmp_path / 'images' / '000000' / 'notes.txt'}" in caplog.text
    (tmp_path / "images" / "000001" / "a.png").write_bytes(b"")
    with pytest.raises(UsageError, match="several images are named a.png"):
        tool.collect_images([str(tmp_path / "images")])


def test_a_checkpoint_retrained_at_the_same_path_is_another_checkpoint_for_resuming(artefacts, tmp_path):
    """The resume key holds a digest of the checkpoint's manifest (every file's SHA-256), not only its path."""
    import shutil

    from megatron_puffin.inference.journal import checkpoint_fingerprint

    root = artefacts[0]
    copy = Path(shutil.copytree(root / "run" / "iter_0000002", tmp_path / "iter_0000002"))
    assert checkpoint_fingerprint(str(copy)) == checkpoint_fingerprint(str(root / "run" / "iter_0000002"))
    manifest = json.loads((copy / "puffin_manifest.json").read_text())
    name = next(iter(manifest["files"]))
    manifest["files"][name]["sha256"] = "0" * 64  # the same file names and sizes, other contents
    (copy / "puffin_manifest.json").write_text(json.dumps(manifest))
    assert checkpoint_fingerprint(str(copy)) != checkpoint_fingerprint(str(root / "run" / "iter_0000002"))


def test_inspect_batches_shows_the_prompt_and_the_trained_answer(artefacts):
    """examples/inspect_batches.py on preprocessed shards: the tensors, the first prompt with its image placeholder
    and the answer tokens the loss is taken on; a raw Puffin-4M folder is one line pointing to the preprocessing."""
    root, paths, _, _ = artefacts
    data = str(Path(paths["data"]) / "main")
    proc = run_script(ROOT / "examples" / "inspect_batches.py", "--tokenizer", paths["tokenizer"], "--image-size", 96,
                      "--task-stream", f"image2text:{data}:2", "--task-stream", f"cam2image:{data}:1",
                      cwd=os.getcwd(), env=ENV)
    assert "--- micro-batch of task image2text" in proc.stdout and "vision_images    (2, 3, 96, 96)" in proc.stdout
    prompt = next(line for line in proc.stdout.splitlines() if "first sample, prompt" in line)
    assert "<image>" in prompt and "<|im_start|>assistant" in prompt
    answer = next(line for line in proc.stdout.splitlines() if "trained answer" in line)
    assert "The camera parameters (roll, pitch, and field-of-view) are:" in answer
    assert "trained on: the target image" in proc.stdout and "<query>" in proc.stdout
    bad = run_script(ROOT / "examples" / "inspect_batches.py", "--tokenizer", paths["tokenizer"], "--task-stream",
                     f"image2text:{root / 'tiny' / 'raw'}:2", cwd=os.getcwd(), env=ENV, check=False)
    assert bad.returncode == 2 and "looks like raw Puffin-4M data" in bad.stderr and "Traceback" not in bad.stderr
    (root / "garbled_tokenizer").mkdir(exist_ok=True)
    (root / "garbled_tokenizer" / "tokenizer.json").write_text("[1, 2]")  # was the tokenizers library's traceback
    bad = run_script(ROOT / "examples" / "inspect_batches.py", "--tokenizer", root / "garbled_tokenizer",
                     "--task-stream", f"image2text:{data}:2", cwd=os.getcwd(), env=ENV, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    line = bad.stderr.strip()
    assert "\n" not in line and line.startswith(f"inspect_batches.py: error: {root / 'garbled_tokenizer'} cannot be "
                                               "loaded as a tokenizer (Exception: "), line
    assert line.endswith("); give an HF tokenizer directory or a SentencePiece .model"), line
    bad = run_script(ROOT / "examples" / "inspect_batches.py", "--tokenizer", paths["tokenizer"], "--image-size", -5,
                     "--task-stream", f"image2text:{data}:2", cwd=os.getcwd(), env=ENV, check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == (  # two problems, one line: was "... >= 1 --image-size ..."
        "inspect_batches.py: error: invalid data flags: --image-size (-5) must be >= 1; --image-size (-5) must be a "
        "multiple of --image-size-unit (32)"), bad.stderr


def test_inspect_batches_names_the_samples_that_do_not_decode(artefacts, tmp_path):
    """The tool checks a user's own data, so bad images are shown, not a traceback: with the first half of a shard's
    image bytes garbled, each skipped sample is one line naming shard and index and the end counts them (training
    skips them the same way); with every image garbled, one error line and exit 1."""
    import shutil

    paths = artefacts[1]
    data = Path(shutil.copytree(Path(paths["data"]) / "main", tmp_path / "main"))
    images = next(data.glob("shard-*/image.bin"))
    raw = bytearray(images.read_bytes())

    def inspect(fraction):
        garbled = bytearray(raw)
        for index in range(0, int(len(garbled) * fraction), 7):
            garbled[index] = 0x41
        images.write_bytes(bytes(garbled))
        return run_script(ROOT / "examples" / "inspect_batches.py", "--tokenizer", paths["tokenizer"], "--image-size",
                          96, "--task-stream", f"image2text:{data}:4", cwd=os.getcwd(), env=ENV, check=False)

    half = inspect(0.5)
    skipped = [line for line in half.stderr.splitlines() if line.startswith("bad sample skipped")]
    assert half.returncode == 0 and skipped and "Traceback" not in half.stderr, half.stderr[-3000:]
    assert f"shard {images.parent} index" in skipped[0] and "field image: its bytes do not match their stored " \
        "CRC-32" in skipped[0], skipped[0]
    assert f"{len(skipped)} sample(s) failed to decode and were replaced" in half.stdout, half.stdout[-2000:]
    every = inspect(1.0)
    assert every.returncode == 1 and "Traceback" not in every.stderr, every.stderr[-3000:]
    assert every.stderr.strip().splitlines()[-1].startswith("inspect_batches.py: error: stream image2text#0: none of "
                                                            "its"), every.stderr[-3000:]


def test_a_full_disk_is_one_line_and_the_same_command_resumes(artefacts, tmp_path, capsys):
    """A write that fails mid-run (ENOSPC; here EFBIG from a per-file size limit below one generated PNG): one line
    and exit 1, not a traceback; what was finished stays, and the same command without the limit completes."""
    root = artefacts[0]
    command = ["--checkpoint", str(root / "run"), "--output-dir", str(tmp_path / "gen"), "--caption", "a room",
               "--roll", "0.1", "--pitch", "0", "--vfov", "1.0", "--steps", str(STEPS), "--no-progress"]
    try:
        with file_size_limit(LIMIT_BYTES):
            code = _tool_main("generate.py")(command)
    finally:
        mpd.initialize(seed=0)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == ("generate.py: error: File too large; the outputs finished so far are "
                                            "kept: fix that and run the same command again (it resumes)"), err
    try:
        assert _tool_main("generate.py")(command) == 0
    finally:
        mpd.initialize(seed=0)
    assert (tmp_path / "gen" / "contact_sheet.png").is_file()
    assert "wrote 1 image, " in capsys.readouterr().out  # not "1 images"
    result = run_script(ROOT / "tools" / "understand.py", "--checkpoint", root / "run", "--images",
                        tmp_path / "gen" / "contact_sheet.png", "--output", tmp_path / "answers.json",
                        "--max-new-tokens", 2, "--no-progress", cwd=tmp_path, env=ENV)
    assert ": 1 image (" in result.stdout, result.stdout


def test_a_trained_checkpoint_finds_its_relative_tokenizer_from_any_directory(tmp_path):
    """The tiny run's flags name tiny/tokenizer.model relative to the directory it trained in; understand.py run
    from another directory stopped with "--tokenizer tiny/tokenizer.model: not found". Checkpoints now record that
    directory (run_directory), and stored relative paths are found through it."""
    from helpers.puffin import tiny_run

    root = tiny_run()
    image = sorted((root / "tiny" / "raw" / "local_folder").rglob("*.jpg"))[0]
    result = run_script(ROOT / "tools" / "understand.py", "--checkpoint", root / "run", "--images", image,
                        "--output", tmp_path / "answers.json", "--max-new-tokens", 4, "--no-progress",
                        cwd=tmp_path, env=ENV, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [entry["id"] for entry in json.loads((tmp_path / "answers.json").read_text())] == [image.name]


def test_an_empty_id_cell_takes_the_row_number(tmp_path):
    """A CSV whose id cell is blank named its image '.png' (hidden, and the same for every blank row)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_tool", ROOT / "tools" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    requests = tmp_path / "r.csv"
    requests.write_text("id,caption,roll,pitch,vfov\n,a room,0.1,0.0,1.0\nk,a hall,0.0,0.0,1.0\n , a yard,0,0,1\n")
    args = module.build_parser().parse_args(["--checkpoint", "x", "--output-dir", "o", "--prompts", str(requests)])
    assert [request["id"] for request in module.read_requests(args)] == ["0000", "k", "0002"]


def test_request_seeds_are_whole_numbers_and_angles_are_not_booleans(tmp_path):
    """A JSON request's seed 1.5 was taken for 1 and a roll of true for 1 rad (an image of another camera than
    asked, with a warning about the range at best); both are now named. Whole seeds, as JSON integers, integral
    floats or CSV digits, still pass."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_seed_tool", ROOT / "tools" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [{"id": "a", "roll": 0, "pitch": 0, "vfov": 1, "seed": 7}, {"id": "b", "roll": 0, "pitch": 0, "vfov": 1,
                                                                        "seed": 8.0}]
    requests = tmp_path / "r.json"
    requests.write_text(json.dumps(rows))
    args = module.build_parser().parse_args(["--checkpoint", "x", "--output-dir", "o", "--prompts", str(requests)])
    assert [request["seed"] for request in module.read_requests(args)] == [7, 8]
    (tmp_path / "r.csv").write_text("id,caption,roll,pitch,vfov,seed\nc,a room,0.1,0.0,1.0, 9\n")
    args.prompts = str(tmp_path / "r.csv")
    assert [request["seed"] for request in module.read_requests(args)] == [9]
    requests.write_text(json.dumps([dict(rows[0], seed=1.5), dict(rows[1], roll=True), dict(rows[1], id="c",
                                                                                            seed=True)]))
    args.prompts = str(requests)
    with pytest.raises(module.UsageError) as refused:
        module.read_requests(args)
    assert str(refused.value) == (f"3 of 3 requests are wrong: --prompts {requests} row 0: seed 1.5 is not a whole "
                                  f"number; --prompts {requests} row 1: roll True is not a number of radians; "
                                  f"--prompts {requests} row 2: seed True is not a whole number")


def test_the_contact_sheet_shows_at_most_its_limit_of_images(artefacts, caplog):
    """10,000 requests at 512² made a 2.8-gigapixel contact sheet; it now holds the first CONTACT_SHEET_MAX."""
    import importlib.util

    from PIL import Image

    root, _, _, _ = artefacts
    spec = importlib.util.spec_from_file_location("generate_sheet_tool", ROOT / "tools" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.CONTACT_SHEET_MAX = 2
    requests = root / "sheet.json"
    requests.write_text(json.dumps([{"id": f"s{i}", "roll": 0.0, "pitch": 0.0, "vfov": 1.0} for i in range(3)]))
    out = root / "sheet_out"
    try:
        assert module.main(["--checkpoint", str(root / "run"), "--prompts", str(requests), "--output-dir", str(out),
                            "--steps", "2", "--guidance-scale", "1.0", "--no-progress"]) == 0
    finally:
        mpd.initialize(seed=0)
    assert sorted(p.name for p in out.glob("s*.png")) == ["s0.png", "s1.png", "s2.png"]
    side = Image.open(out / "s0.png").size[0]
    scale = -(-300 // side)  # contact_sheet.MIN_TILE
    with Image.open(out / "contact_sheet.png") as sheet:  # 2 tiles: one row of two, not a 2 x 2 grid
        assert sheet.size == (2 * (side * scale + 8), side * scale + 30 + 8)
    assert "contact_sheet.png shows the first 2 of the 3 images" in caplog.text
