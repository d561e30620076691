"""Collation: left padding per task family, masks and position ids (§8), stacked/list images, camera maps."""
import pytest
import torch

from megatron_puffin.camera import camera_map, normalize_camera_map
from megatron_puffin.data.collate import Collator, left_pad, position_ids_from_mask
from megatron_puffin.data.task_encoders import EncodedSample

PAD = 151643


def _und(ids, labels, size=64):
    return EncodedSample("image2text", torch.tensor(ids), torch.tensor(labels),
                         vision_image=torch.zeros(3, size, size), num_image_tokens=ids.count(-200), text="t")


def _gen(ids, camera, height, width, dropped=False):
    return EncodedSample("cam2image", torch.tensor(ids + [-400] * 4), target_image=torch.rand(3, height, width) * 2 - 1,
                         camera=torch.tensor(camera, dtype=torch.float32), cfg_dropped=dropped)


def test_understanding_batch_is_left_padded_with_zero_and_ignore_labels():
    batch = Collator(PAD)([_und([5, -200, -200, 6, 7], [-100, -100, -100, 6, 7]), _und([8, 9], [-100, 9])])
    assert batch["task"] == "image2text"
    assert batch["input_ids"].tolist() == [[5, -200, -200, 6, 7], [0, 0, 0, 8, 9]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 6, 7], [-100, -100, -100, -100, 9]]
    assert batch["attention_mask"].tolist() == [[True] * 5, [False, False, False, True, True]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 0, 1]]
    assert batch["vision_images"].shape == (2, 3, 64, 64)
    assert batch["num_image_tokens"].tolist() == [2, 0] and batch["texts"] == ["t", "t"]


def test_generation_batch_pads_with_tokenizer_pad_keeps_queries_last_and_builds_camera_maps():
    cameras = [(0.1, -0.2, 1.0), (0.3, 0.2, 0.7), (-0.4, 0.0, 1.48)]
    samples = [_gen([1, 2, 3], cameras[0], 64, 96), _gen([4], cameras[1], 64, 96, dropped=True),
               _gen([6, 7], cameras[2], 96, 64)]
    batch = Collator(PAD)(samples)
    assert batch["input_ids"][:, -4:].eq(-400).all() and "labels" not in batch
    assert batch["input_ids"][1].tolist() == [PAD, PAD, 4, -400, -400, -400, -400]
    assert batch["position_ids"][1].tolist() == [0, 0, 0, 1, 2, 3, 4]
    assert isinstance(batch["target_images"], list) and isinstance(batch["camera_maps"], list)
    for index, (roll, pitch, vfov) in enumerate(cameras):
        height, width = samples[index].target_image.shape[-2:]
        expected = normalize_camera_map(camera_map(roll, pitch, vfov, height, width))
        torch.testing.assert_close(batch["camera_maps"][index], expected)
    assert batch["cameras"].shape == (3, 3) and batch["num_cfg_dropped"] == 1
    same_size = Collator(PAD)(samples[:2])
    assert same_size["camera_maps"].shape == (2, 3, 64, 96) and same_size["target_images"].shape == (2, 3, 64, 96)
    assert "camera_maps" not in Collator(PAD, compute_camera_maps=False)(samples[:2])


def test_mixed_tasks_and_empty_batches_are_rejected():
    with pytest.raises(ValueError, match="one task"):
        Collator(PAD)([_und([1], [1]), _gen([1], (0.0, 0.0, 1.0), 32, 32)])
    with pytest.raises(ValueError, match="empty"):
        Collator(PAD)([])


def test_helpers():
    assert left_pad([torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)], 9).tolist() == [[1, 2], [9, 9]]
    mask = torch.tensor([[False, True, True], [False, False, False]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 1], [0, 0, 0]]
