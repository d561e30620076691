"""Every flag mistake is reported by the one validation pass, before any process group, data loader or model
exists: one table of cases, each run through the real parse + validate (in this one process); the CLI's handling
is in tests/functional/test_flag_cli.py. Each case names a message fragment that must appear; the base flags alone
must validate."""

import pytest

from megatron_puffin.camera import Camera
from megatron_puffin.config import ConfigError, parse_args
from megatron_puffin.data.format import PuffinRecord, ShardWriter
from megatron_puffin.data.tokenizer import train_sentencepiece_tokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A real (tiny) shard of the main subset, a tokenizer file, a file, a JSON VAE config and flag files."""
    root = tmp_path_factory.mktemp("flags")
    writer = ShardWriter(root / "main" / "shard_0", "main")
    for index in range(3):
        writer.add(PuffinRecord(key=f"k{index}", image=b"\xff\xd8" + bytes(8), caption=f"caption {index}",
                                camera=Camera(0.1, 0.2, 0.9)))
    writer.finalize()
    import io

    from PIL import Image

    jpeg = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 120, 150)).save(jpeg, format="JPEG")
    writer = ShardWriter(root / "decodable" / "shard_0", "main")  # images that decode: the prompts get encoded
    writer.add(PuffinRecord(key="k0", image=jpeg.getvalue(), caption="a room", camera=Camera(0.1, 0.2, 0.9)))
    writer.finalize()
    (root / "empty").mkdir()
    train_sentencepiece_tokenizer(["a photo of a cat on a mat"] * 10, root / "tok.model", vocab_size=300)
    (root / "broken.model").write_bytes(b"not a tokenizer")
    (root / "a_file").write_text("x")
    (root / "vae.json").write_text('{"latent_channels": 4}')
    (root / "bad_vae.json").write_text("{not json")
    (root / "array_vae.json").write_text("[4, 16]")
    (root / "array_vae").mkdir()
    (root / "array_vae" / "config.json").write_text("null")
    (root / "quote.args").write_text("--lr 1e-4\n--stage-name 'unbalanced\n")
    (root / "binary.args").write_bytes(b"--lr \x00\xff\xfe 1e-4\n")
    (root / "self.args").write_text(f"--lr 1e-4\n@{root / 'self.args'}\n")
    (root / "streams.args").write_text(f"--task-stream image2text:{root / 'main'}:2\n"
                                       f"--task-stream cam2image:{root / 'main'}:2\n--vae-config {root / 'vae.json'}\n")
    return root


def _base(root):
    return ["--task-stream", f"image2text:{root / 'main'}:2", "--tokenizer", str(root / "tok.model")]


# (flags; {root} is the fixture directory) -> a fragment the error must contain
CASES = [
    ("--tensor-model-parallel-size 0", "--tensor-model-parallel-size (0) must be at least 1"),
    ("--pipeline-model-parallel-size 0", "--pipeline-model-parallel-size (0) must be at least 1"),
    ("--fp16", "--fp16 needs a CUDA GPU"),
    ("--ffn-hidden-size 0", "--ffn-hidden-size (0) must be at least 1"),
    ("--kv-channels 0", "--kv-channels (0) must be at least 1"),
    ("--max-position-embeddings 0", "--max-position-embeddings (0) must be at least 1"),
    # a mistyped query count: the path checks spent 200 s and 16 GB assembling one prompt of that length, then the
    # model's first allocation failed with a traceback
    ("--task-stream cam2image:{root}/decodable:2 --vae-config {root}/vae.json --dit-in-channels 4 "
     "--connector-num-queries 1000000000", "cam2image samples can hold 1000000256 LLM tokens (256 "
     "--max-generation-text-tokens + 1000000000 --connector-num-queries), more than the LLM's "
     "--max-position-embeddings (32768)"),
    ("--max-position-embeddings 1024", "image2text samples can hold 1280 LLM tokens (256 image tokens (--image-size) "
     "+ 1024 --max-understanding-text-tokens), more than the LLM's --max-position-embeddings (1024)"),
    ("--task-stream image2text:{root}/empty:2", "no shard"),
    ("--task-stream image2text_cross_view:{root}/main:2", "needs the field 'image_init'"),
    ("--task-stream image2text:{root}/main:2:-1", "REPEATS (-1) must be >= 1"),
    ("--task-stream cam2image:{root}/main:2 --vae-config {root}/nowhere.json", "--vae-config"),
    ("--task-stream cam2image:{root}/main:2 --vae-config {root}/bad_vae.json", "is not valid JSON"),
    # was a conv2d traceback at the first generation step, after every tower had been built
    ("--task-stream cam2image:{root}/main:2 --vae-config {root}/vae.json --dit-in-channels 16",
     "--dit-in-channels (16) must equal the VAE's latent_channels (4, {root}/vae.json)"),
    # was a traceback at the first generation step: "latent token grid 32x32 exceeds --dit-pos-embed-max-size"
    ("--task-stream cam2image:{root}/main:2 --vae-config {root}/vae.json --dit-in-channels 4 --image-size 512 "
     "--dit-pos-embed-max-size 16", "--image-size (512) gives latent grids of 256 MMDiT tokens per side (VAE factor 1, "
     "--dit-patch-size 2), more than --dit-pos-embed-max-size (16) holds; use --image-size <= 32"),
    # were found only once training ran: every sample skipped as undecodable, then "preprocess the shards again"
    ("--task-stream image2text:{root}/decodable:2 --max-understanding-text-tokens 8",
     "--task-stream image2text:{root}/decodable: the fixed part of the image2text prompt needs "),
    ("--task-stream cam2image:{root}/decodable:2 --vae-config {root}/vae.json --dit-in-channels 4 "
     "--max-generation-text-tokens 3", "the fixed part of the cam2image prompt needs "),
    ("--vae-path {root}/empty", "--vae-path ({root}/empty) has no config.json"),
    # were "cannot be read (AttributeError: 'list' object has no attribute 'get')" (--vae-path's config.json)
    ("--vae-config {root}/array_vae.json",
     "--vae-config ({root}/array_vae.json) holds an array, not a JSON object; give an AutoencoderKL config file"),
    ("--vae-path {root}/array_vae", "--vae-path ({root}/array_vae): config.json holds null, not a JSON object; "
     "give diffusers' AutoencoderKL folder (SD3's vae/)"),
    ("--lr nan", "--lr ('nan') is not a valid finite number"),
    ("--lr inf", "--lr ('inf') is not a valid finite number"),
    ("--lr -0.5", "--lr (-0.5) must be at least 0"),
    ("--adam-beta1 1.0", "--adam-beta1 (1.0) must lie in [0, 1)"),
    ("--adam-beta2 -0.1", "--adam-beta2 (-0.1) must lie in [0, 1)"),
    ("--adam-eps 0", "--adam-eps (0.0) must be positive"),
    ("--weight-decay -0.1", "--weight-decay (-0.1) must be at least 0"),
    ("--clip-grad -1", "--clip-grad (-1.0) must be at least 0"),
    ("--lr-warmup-iters -1", "--lr-warmup-iters (-1) must be at least 0"),
    ("--train-iters 10 --lr-warmup-iters 10", "--lr-warmup-iters (10) must be smaller than"),
    ("--lr-decay-iters 3 --lr-warmup-iters 5", "--lr-warmup-iters (5) must be smaller than --lr-decay-iters (3)"),
    ("--save {root}/run --save-interval 0", "--save-interval (0) must be at least 1"),
    ("--save {root}/run --save-interval -1", "--save-interval (-1) must be at least 1"),
    ("--distributed-timeout-minutes 0", "--distributed-timeout-minutes (0) must be at least 1"),
    ("--exit-duration-in-mins -1", "--exit-duration-in-mins (-1.0) must be a positive number"),
    ("--seed 99999999999999999999", "--seed (99999999999999999999) must lie in [-2^63, 2^63)"),
    ("--llm-checkpoint {root}/nowhere", "--llm-checkpoint ({root}/nowhere) does not exist"),
    ("--dit-checkpoint {root}/a_file", "--dit-checkpoint ({root}/a_file) is a file"),
    ("--vision-checkpoint {root}/empty", "is not a distributed checkpoint"),
    ("--tensorboard-dir {root}/a_file", "--tensorboard-dir ({root}/a_file) is a file"),
    ("--save {root}/a_file", "--save ({root}/a_file) is a file"),
    ("--metrics-file {root}/empty", "--metrics-file ({root}/empty) is a directory"),
    # under a file: before, training ran to its first checkpoint and lost every step there
    ("--save {root}/a_file/run", "--save ({root}/a_file/run): {root}/a_file is a file, not a folder"),
    ("--tensorboard-dir {root}/a_file/tb", "--tensorboard-dir ({root}/a_file/tb): {root}/a_file is a file"),
    ("--metrics-file {root}/a_file/m/x.jsonl", "--metrics-file ({root}/a_file/m/x.jsonl): {root}/a_file is a file"),
    # a folder nobody can create anything in (root passes permission checks; read-only mounts and /proc do not)
    ("--save /proc/puffin/run", "--save (/proc/puffin/run): the folder /proc is not writable"),
    ("--tensorboard-dir /proc/puffin_tb", "--tensorboard-dir (/proc/puffin_tb): the folder /proc is not writable"),
    ("--image-size-unit 24 --image-size 48", "--image-size-unit (24) must be a multiple of the vision patch size"),
    ("--world-size 4", "--world-size (4) contradicts the launch (WORLD_SIZE=1)"),
    ("--seq-length 1024", "--seq-length is not a flag of pretrain_puffin.py"),
    ("--task-stream text2text:{root}/main:2 --freeze-llm", "--task-stream text2text trains only the LLM"),
    ("--tokenizer {root}/broken.model", "--tokenizer: {root}/broken.model cannot be loaded as a tokenizer (RuntimeError"),
    ("--vocab-size 100", "--vocab-size (100) is smaller than the vocabulary of --tokenizer"),
    ("@{root}/quote.args", "flag file @{root}/quote.args line 2: No closing quotation (an unbalanced quote)"),
    ("@{root}/binary.args", "flag file @{root}/binary.args is not a text file"),
    ("@{root}/self.args", "includes itself"),
    ("@{root}/nowhere.args", "flag file @{root}/nowhere.args cannot be read"),
]


def _problems(flags):
    with pytest.raises(ConfigError) as info:
        parse_args(flags)
    return info.value.problems


def test_every_flag_mistake_is_reported_by_the_validation_pass(files, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    parse_args(_base(files))  # the base is valid: each case below fails for its own reason
    for flags, fragment in CASES:
        problems = _problems(_base(files) + flags.format(root=files).split())
        assert any(fragment.format(root=files) in p for p in problems), (flags, problems)


def test_validators_survive_each_others_bad_values(files):
    """Zero sizes that other rules divide by, all at once: every one is reported, nothing crashes."""
    flags = ("--tensor-model-parallel-size 0 --pipeline-model-parallel-size 0 --num-layers 0 --num-attention-heads 0 "
             "--num-query-groups 0 --hidden-size 0 --vision-patch-size 0 --vision-num-attention-heads 0 "
             "--dit-num-attention-heads 0 --connector-num-attention-heads 0 --micro-batch-size 0 --lr nan "
             "--train-iters 0 --image-size-unit 0").split()
    problems = _problems(_base(files) + flags + ["--task-stream", f"image2text:{files / 'decodable'}:2"])
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--num-layers", "--lr ('nan')",
                 "--train-iters", "--image-size-unit"):
        assert any(flag in p for p in problems), (flag, problems)


def test_a_later_task_stream_replaces_the_flag_files_streams(files):
    root = files
    args = parse_args(["--tokenizer", str(root / "tok.model"), f"@{root / 'streams.args'}"], validate=False)
    assert [s.split(":")[0] for s in args.data.task_stream] == ["image2text", "cam2image"]
    args = parse_args(["--tokenizer", str(root / "tok.model"), f"@{root / 'streams.args'}",
                       "--task-stream", f"text2text:{root / 'main'}:1", "--task-stream", f"image2text:{root / 'main'}:1"],
                      validate=False)
    assert [s.split(":")[0] for s in args.data.task_stream] == ["text2text", "image2text"]  # replaced, in order
    args = parse_args(["--tokenizer", str(root / "tok.model"), "--task-stream", f"text2text:{root / 'main'}:1",
                       f"@{root / 'streams.args'}"], validate=False)
    assert [s.split(":")[0] for s in args.data.task_stream] == ["image2text", "cam2image"]  # the file came later



@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le-bom", "utf-16-be-bom"])
def test_a_flag_file_saved_by_a_windows_editor_reads_like_a_plain_one(files, encoding):
    """Notepad's UTF-8 with a byte-order mark ended in "unknown flag '\\ufeff'"; PowerShell's `>` writes UTF-16,
    which read as binary. Both, CRLF line ends included, give the flags of the plain UTF-8 file."""
    text = "# stage flags\r\n--lr 3e-4 --stage-name 'my run'\r\n--micro-batch-size 3\r\n"
    data = {"utf-8-sig": text.encode("utf-8-sig"), "utf-16": text.encode("utf-16"),
            "utf-16-le-bom": b"\xff\xfe" + text.encode("utf-16-le"),
            "utf-16-be-bom": b"\xfe\xff" + text.encode("utf-16-be")}[encoding]
    (files / f"{encoding}.args").write_bytes(data)
    args = parse_args(_base(files) + [f"@{files / f'{encoding}.args'}"])
    assert (args.training.lr, args.checkpoint.stage_name, args.training.micro_batch_size) == (3e-4, "my run", 3)
