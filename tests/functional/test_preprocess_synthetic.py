"""The documented path on synthetic data: make_synthetic_dataset.py -> preprocess_data.py -> loader batches."""
import os
from pathlib import Path

from helpers.puffin import run_script
from megatron_puffin.data import DataConfig, PuffinDataset, build_data_loader

ROOT = Path(__file__).resolve().parents[2]


def _tool(name, *args):
    # the real command, forked from the suite's pre-imported server (helpers.puffin.run_script)
    return run_script(ROOT / "tools" / name, *args, cwd=os.getcwd(), env=dict(os.environ, PYTHONPATH=str(ROOT)),
                      timeout=180).stdout


def test_synthetic_dataset_through_preprocessing_into_the_loader(tmp_path):
    out = _tool("make_synthetic_dataset.py", "--output", tmp_path / "raw", "--num-samples", 16, "--image-size", 96,
                "--seed", 7, "--workers", 1)
    assert "'main': 16, 'cross_view': 4, 'photography': 2" in out
    tokenizer = tmp_path / "raw" / "tokenizer" / "puffin_synthetic.model"
    assert tokenizer.is_file()
    report = _tool("preprocess_data.py", "--input", tmp_path / "raw", "--output-prefix", tmp_path / "idx",
                   "--workers", 2)
    assert '"samples": 22' in report and '"bad_samples": {}' in report
    dataset = PuffinDataset(tmp_path / "idx")
    assert len(dataset) == 22
    config = DataConfig(
        task_stream=[f"image2text_thinking:{tmp_path / 'idx' / 'main'}:4", f"image2image:{tmp_path / 'idx' / 'cross_view'}:2"],
        tokenizer=str(tokenizer), num_workers=0, pin_memory=False)
    batches = iter(build_data_loader(config, seed=0))
    understanding, generation = next(batches), next(batches)
    assert understanding["task"] == "image2text" and understanding["labels"].shape == understanding["input_ids"].shape
    assert understanding["vision_images"].shape == (4, 3, 96, 96) and understanding["num_image_tokens"].tolist() == [9] * 4
    assert generation["task"] == "image2image" and generation["camera_maps"].shape == (2, 3, 96, 96)
    assert generation["input_ids"][:, -64:].eq(-400).all()
