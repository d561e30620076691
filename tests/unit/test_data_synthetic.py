"""Synthetic Puffin-4M: layout, determinism by seed, camera statistics, geometry consistent with camera maps."""
import csv
import hashlib
import json
import math

import numpy as np
import pytest

from megatron_puffin.camera import Camera, camera_map, split_caption, split_thinking_caption
from megatron_puffin.data.synthetic import SyntheticOptions, make_synthetic_dataset
from megatron_puffin.data.synthetic_scene import (
    Scene,
    SceneObject,
    _ray_directions,
    render,
    sample_scene,
    visible_objects,
)
from megatron_puffin.data.tokenizer import PuffinTokenizer


def _make(root, seed=0, workers=1, num_samples=40, tokenizer=True):
    options = SyntheticOptions(root, num_samples=num_samples, image_size=96, seed=seed, num_cross_view=8,
                               num_photography=3, workers=workers, supersample=1,
                               tokenizer_out=root / "tokenizer" / "t.model" if tokenizer else None,
                               tokenizer_vocab_size=400)
    return make_synthetic_dataset(options)


def _digest(root):
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".model"):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    _make(root)
    return root


def _rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_layout_matches_puffin4m(dataset):
    for subset, folders in {".": ["local_folder", "cap_folder", "cap_folder_cot"],
                            "cross_view": ["local_folder", "local_folder_init", "cap_folder", "cap_folder_scene",
                                           "cap_folder_cam"],
                            "photography": ["local_folder", "cap_folder"]}.items():
        root = dataset / subset
        records = json.loads((root / "summary.json").read_text())
        assert records
        for record in records:
            assert (root / "local_folder" / record["image"]).is_file()
            for folder in folders[1:]:
                if folder == "local_folder_init":
                    assert (root / folder / record["image_init"]).is_file()
                else:
                    assert (root / folder / record["annotation"]).is_file()
    tokenizer = PuffinTokenizer(dataset / "tokenizer" / "t.model")
    assert tokenizer.decode(tokenizer.encode("<|im_start|>user\nA red sphere.")) == "<|im_start|>user\nA red sphere."


def test_camera_statistics_and_captions_agree_with_ground_truth(dataset):
    rows = _rows(dataset / "cameras.csv")
    values = np.array([[float(row[k]) for k in ("roll", "pitch", "vfov")] for row in rows])
    assert values[:, :2].min() >= -0.7854 and values[:, :2].max() <= 0.7854
    assert values[:, 2].min() >= 0.3491 and values[:, 2].max() <= 1.8326
    assert values.std(axis=0).min() > 0.15  # spread over the ranges, not a constant
    for row in rows[:10]:
        caption = json.loads((dataset / "cap_folder" / row["fname"].replace(".jpg", ".json")).read_text())["caption"]
        thinking = json.loads((dataset / "cap_folder_cot" / row["fname"].replace(".jpg", ".json")).read_text())["caption"]
        description, camera = split_caption(caption)
        assert description and (camera.roll, camera.pitch, camera.vfov) == (
            float(row["roll"]), float(row["pitch"]), float(row["vfov"]))
        assert split_thinking_caption(thinking)[1] == camera
    cross = _rows(dataset / "cross_view" / "cameras.csv")
    assert all(float(row["vfov"]) == 1.48 and 0 <= float(row["yaw"]) < 2 * math.pi for row in cross)
    assert all(abs(float(row["roll"])) <= 0.3927 and abs(float(row["pitch"])) <= 0.3927 for row in cross)


def test_deterministic_by_seed_and_independent_of_workers(tmp_path):
    _make(tmp_path / "a", seed=3, num_samples=6, tokenizer=False)
    _make(tmp_path / "b", seed=3, num_samples=6, workers=2, tokenizer=False)
    _make(tmp_path / "c", seed=4, num_samples=6, tokenizer=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_rendered_horizon_is_where_the_camera_map_latitude_changes_sign():
    rng = np.random.default_rng(0)
    scene = sample_scene(rng, 0.0)
    dark_ground = Scene(("black", "black"), 1.0, "clear blue", scene.sun_direction, (), scene.camera_height)
    for camera in (Camera(0.3, 0.1, 1.2), Camera(-0.5, -0.2, 0.8), Camera(0.0, 0.35, 1.7)):
        latitude = camera_map(camera.roll, camera.pitch, camera.vfov, 64, 80)[2].numpy()
        rays = _ray_directions(camera, 0.7, 64, 80, 1)
        assert ((rays[..., 2] > 0) == (latitude > 0))[np.abs(latitude) > 1e-4].all()
        pixels = render(dark_ground, camera, 0.7, 64, 80, supersample=1).astype(np.float64)
        is_sky = pixels[..., 2] - pixels[..., 0] > 35  # the sky is clearly blue, the (hazy) black ground is not
        confident = np.abs(latitude) > 0.02
        assert ((latitude > 0) == is_sky)[confident].mean() > 0.98, camera
        assert 0 < is_sky.mean() < 1


def test_positive_yaw_turns_left():
    ball = SceneObject("sphere", (0.0, 6.0, 0.5), (0.5,), "red")  # due +y: left of a camera heading +x
    scene = Scene(("grey", "white"), 1.0, "clear blue", (0.0, 0.0, 1.0), (ball,), 1.5)
    straight = visible_objects(scene, Camera(0.0, 0.0, 1.0), 0.0, 96, 96)
    turned_left = visible_objects(scene, Camera(0.0, 0.0, 1.0, yaw=math.pi / 2), 0.0 + math.pi / 2, 96, 96)
    assert straight == [] and turned_left[0][1] == "in the center"


def test_heldout_split_is_disjoint_and_leaves_the_training_split_unchanged(tmp_path):
    plain = _make(tmp_path / "plain", num_samples=4, tokenizer=False)
    options = SyntheticOptions(tmp_path / "split", num_samples=4, image_size=96, num_cross_view=8, num_photography=3,
                               supersample=1, num_heldout=8)
    sizes = make_synthetic_dataset(options)
    assert sizes == {**plain, "heldout/main": 8, "heldout/cross_view": 2, "heldout/photography": 1}
    heldout = tmp_path / "split" / "heldout"
    assert _digest(tmp_path / "plain") == _digest_without(tmp_path / "split", "heldout")
    for subset in (".", "cross_view", "photography"):
        train_images = {p.read_bytes() for p in (tmp_path / "split" / subset / "local_folder").rglob("*.jpg")}
        held_images = {p.read_bytes() for p in (heldout / subset / "local_folder").rglob("*.jpg")}
        assert held_images and not train_images & held_images
    train_cameras = {tuple(row[k] for k in ("roll", "pitch", "vfov")) for row in _rows(tmp_path / "split" / "cameras.csv")}
    held_rows = _rows(heldout / "cameras.csv")
    assert len(held_rows) == 8 and not train_cameras & {tuple(r[k] for k in ("roll", "pitch", "vfov")) for r in held_rows}


def _digest_without(root, folder):
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and folder not in p.relative_to(root).parts):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("changes, message", [
    ({"num_samples": 0, "image_size": 7}, r"--num-samples \(0\) must be >= 1; --image-size \(7\) must lie in \[96"),
    ({"image_size": 100_000}, r"--image-size \(100000\) must lie in \[96, 4096\]"),  # was a 298 GiB MemoryError
    ({"supersample": 0}, r"--supersample \(0\) must be >= 1"),  # was NaN images written without a word
    ({"tokenizer_vocab_size": 5}, r"--tokenizer-vocab-size \(5\) must be >= 400"),  # was sentencepiece's traceback
    ({"output": "FILE/out"}, "a_file is a file, not a folder"),
    ({"tokenizer_out": "FILE/tok/t.model"}, "--tokenizer-out .*a_file is a file, not a folder"),
])
def test_bad_options_are_named_before_anything_is_rendered(tmp_path, changes, message):
    (tmp_path / "a_file").write_text("")
    changes = {k: tmp_path / "a_file" / v[5:] if isinstance(v, str) else v for k, v in changes.items()}
    options = SyntheticOptions(**{"output": tmp_path / "out", "num_samples": 2,
                                  "tokenizer_out": tmp_path / "t.model", **changes})
    with pytest.raises(ValueError, match=message):
        make_synthetic_dataset(options)
    assert not (tmp_path / "out").exists()
