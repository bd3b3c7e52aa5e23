"""HistoryNet's input pipeline on small shards written with the project's own tar writer."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio

from mhmd_builder.historynet.data import (eval_loader, lab_input, lightness, rgb_from_lab, train_loader,
                                          unit_float)
from mhmd_builder.shards import AtomicTar, encode_json, sample_members, shard_urls, tar_name

NUM_CLASSES = 5
PER_SHARD = 4
SIZES = [(240, 320), (180, 200), (300, 260)]  # (h, w): shrink, grow (bilinear), shrink


def gradient_frame(index: int, height: int, width: int) -> np.ndarray:
    """A smooth BGR frame: red across, green down, blue set by the index."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    blue = np.full((height, width), 40 * (index % 6), np.float32)
    return np.dstack([blue, y, x]).astype(np.uint8)


def parsing_map(height: int, width: int) -> np.ndarray:
    """A colour-coded parsing image: three regions of different colours."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2] = (0, 0, 255)
    image[:, width // 2:] = (255, 0, 0)
    image[: height // 3] = (0, 255, 0)
    return image


def make_sample(index: int) -> dict:
    """Even frames are labelled (index % NUM_CLASSES), every third one has a parsing map. Odd frames
    are unlabelled: `cls` -1, or (every other one) no `cls`, as in tars written before it was in
    every sample."""
    height, width = SIZES[index % len(SIZES)]
    key, label_id = f"film{index // PER_SHARD}_{index:06d}", index % NUM_CLASSES if index % 2 == 0 else None
    files = {"jpg": cv2.imencode(".jpg", gradient_frame(index, height, width))[1].tobytes()}
    if index % 3 == 0:
        files["mask.png"] = cv2.imencode(".png", parsing_map(height, width))[1].tobytes()
    sample = sample_members(key, encode_json({"frame_id": key, "label_id": label_id}), label_id, files)
    if index % 4 == 3:
        del sample["cls"]
    return sample


def label_id(sample: dict) -> int | None:
    """The label the sample was made with (its json)."""
    return json.loads(sample["json"])["label_id"]


def write_shards(folder: Path, samples: list[dict], split: str = "train") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(samples), PER_SHARD):
        paths.append(folder / tar_name(split, start // PER_SHARD))
        with AtomicTar(paths[-1]) as tar:
            for sample in samples[start:start + PER_SHARD]:
                tar.write(sample)
    return paths


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three train shards of four samples each: (folder, samples by key)."""
    folder = tmp_path_factory.mktemp("shards")
    samples = [make_sample(i) for i in range(3 * PER_SHARD)]
    write_shards(folder, samples)
    return folder, {s["__key__"]: s for s in samples}


def decoded(jpg: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)


def direct_lab224(bgr: np.ndarray) -> np.ndarray:
    interpolation = cv2.INTER_AREA if min(bgr.shape[:2]) >= 224 else cv2.INTER_LINEAR
    return cv2.cvtColor(cv2.resize(bgr, (224, 224), interpolation=interpolation), cv2.COLOR_BGR2LAB)


def all_batches(loader) -> list[dict]:
    return list(loader)


# -- shard lists ----------------------------------------------------------------------------------
def test_shard_patterns_directory_glob_and_list_name_the_same_files(shards):
    folder, _ = shards
    expected = [str(folder / f"train-{i:06d}.tar") for i in range(3)]
    assert shard_urls(str(folder / "train-{000000..000002}.tar")) == expected
    assert shard_urls(str(folder / "train-*.tar")) == expected
    assert shard_urls(folder) == expected
    assert shard_urls(expected[::-1]) == expected[::-1]


def test_a_pattern_that_matches_nothing_is_a_one_line_error_naming_it(shards, tmp_path):
    folder, _ = shards
    for pattern in (str(tmp_path / "train-{000000..000003}.tar"), str(tmp_path / "*.tar")):
        with pytest.raises(FileNotFoundError, match="no shards match") as error:
            shard_urls(pattern)
        assert pattern in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError, match=r"test-\*\.tar"):
        eval_loader(folder, NUM_CLASSES)  # the folder holds train shards only
    with pytest.raises(FileNotFoundError, match="1 of 4 shards do not exist"):
        shard_urls(str(folder / "train-{000000..000003}.tar"))


# -- samples --------------------------------------------------------------------------------------
def test_eval_batches_hold_opencv_lab_labels_and_parsing(shards):
    folder, samples = shards
    batches = all_batches(eval_loader(folder, NUM_CLASSES, batch_size=5, num_workers=0, split="train"))
    assert [len(b["key"]) for b in batches] == [5, 5, 2]
    for batch in batches:
        n = len(batch["key"])
        assert batch["lightness"].shape == (n, 1, 224, 224) and batch["lightness"].dtype == torch.uint8
        assert batch["ab"].shape == (n, 2, 224, 224) and batch["ab"].dtype == torch.uint8
        assert batch["onehot"].shape == (n, NUM_CLASSES)
        assert batch["parsing"].shape == (n, 1, 224, 224) and batch["parsing"].dtype == torch.uint8
        assert batch["has_label"].dtype == torch.bool and batch["has_parsing"].dtype == torch.bool
        for i, key in enumerate(batch["key"]):
            sample = samples[key]
            lab = direct_lab224(decoded(sample["jpg"]))
            np.testing.assert_array_equal(batch["lightness"][i, 0].numpy(), lab[..., 0])
            np.testing.assert_array_equal(batch["ab"][i].numpy(), lab[..., 1:].transpose(2, 0, 1))

            assert bool(batch["has_label"][i]) == (label_id(sample) is not None)
            expected_onehot = np.zeros(NUM_CLASSES, np.float32)
            if label_id(sample) is not None:
                expected_onehot[label_id(sample)] = 1
            np.testing.assert_array_equal(batch["onehot"][i].numpy(), expected_onehot)

            assert bool(batch["has_parsing"][i]) == ("mask.png" in sample)
            if "mask.png" in sample:
                coded = cv2.cvtColor(decoded(sample["mask.png"]), cv2.COLOR_BGR2LAB)[..., 0]
                target = cv2.resize(coded, (224, 224), interpolation=cv2.INTER_NEAREST)
                np.testing.assert_array_equal(batch["parsing"][i, 0].numpy(), target)
                assert len(np.unique(batch["parsing"][i].numpy())) == 3  # nearest: no blended codes
            else:
                assert not batch["parsing"][i].any()


def test_a_known_colour_gives_its_lab_values(tmp_path):
    colour = np.array([[[30, 160, 220]]], np.uint8)  # BGR: an orange
    sample = {"__key__": "orange", "jpg": cv2.imencode(".jpg", np.tile(colour, (300, 300, 1)))[1].tobytes()}
    write_shards(tmp_path, [sample], split="test")
    batch = next(iter(eval_loader(tmp_path, NUM_CLASSES, num_workers=0)))
    lab = cv2.cvtColor(colour, cv2.COLOR_BGR2LAB)[0, 0].astype(np.float32)
    assert abs(float(batch["lightness"][0].float().mean()) - lab[0]) < 2
    np.testing.assert_allclose(batch["ab"][0].float().mean(dim=(1, 2)).numpy(), lab[1:], atol=2)
    assert not batch["has_label"][0] and not batch["onehot"].any()


def test_originals_are_kept_at_full_size_on_request(shards):
    folder, samples = shards
    batches = all_batches(eval_loader(folder, NUM_CLASSES, batch_size=4, num_workers=0, keep_original=True,
                                      split="train"))
    for batch in batches:
        assert isinstance(batch["original"], list)
        for key, original in zip(batch["key"], batch["original"]):
            np.testing.assert_array_equal(original, decoded(samples[key]["jpg"]))
    assert "original" not in next(iter(eval_loader(folder, NUM_CLASSES, num_workers=0, split="train")))


def test_an_undecodable_jpg_stops_the_run_naming_shard_and_key(tmp_path):
    samples = [make_sample(0), {"__key__": "broken_000001", "jpg": b"not a jpeg"}]
    write_shards(tmp_path, samples, split="test")
    with pytest.raises(ValueError, match=r"test-000000\.tar: sample broken_000001: its jpg cannot be decoded"):
        all_batches(eval_loader(tmp_path, NUM_CLASSES, num_workers=0))


# -- worker splitting and epochs ------------------------------------------------------------------
def test_evaluation_yields_every_key_once_with_two_workers(shards):
    folder, samples = shards
    keys = [key for batch in eval_loader(folder, NUM_CLASSES, batch_size=3, num_workers=2, split="train")
            for key in batch["key"]]
    assert sorted(keys) == sorted(samples)


def test_training_resamples_an_epoch_of_the_requested_length(shards):
    folder, samples = shards
    loader = train_loader(folder, NUM_CLASSES, epoch_samples=12, batch_size=3, num_workers=2, shuffle_buffer=8)
    assert len(loader) == 4
    epochs = []
    for _epoch in range(2):
        batches = all_batches(loader)
        assert len(batches) == 4 and all(b["lightness"].shape == (3, 1, 224, 224) for b in batches)
        epochs.append([key for b in batches for key in b["key"]])
        assert set(epochs[-1]) <= set(samples)
    assert epochs[0] != epochs[1]  # a new draw, not the first epoch replayed


def test_an_epoch_is_rounded_up_to_whole_batches_per_worker(shards):
    folder, _ = shards
    loader = train_loader(folder, NUM_CLASSES, epoch_samples=10, batch_size=3, num_workers=0)
    assert len(loader) == 4 and sum(len(b["key"]) for b in loader) == 12


def test_training_order_is_set_by_the_seed(shards):
    folder, _ = shards

    def keys(seed: int) -> list[str]:
        loader = train_loader(folder, NUM_CLASSES, epoch_samples=24, batch_size=4, num_workers=0, seed=seed)
        return [key for batch in loader for key in batch["key"]]

    assert keys(0) == keys(0)
    assert keys(0) != keys(1)


# -- one photo: colorize and evaluate -------------------------------------------------------------
def test_lab_input_is_what_the_loader_gives_the_network(shards):
    folder, samples = shards
    batch = next(iter(eval_loader(folder, NUM_CLASSES, batch_size=2, num_workers=0, split="train")))
    bgr = decoded(samples[batch["key"][0]]["jpg"])
    small, lightness_full = lab_input(bgr)
    assert torch.equal(small, batch["lightness"][0])
    assert lightness_full.shape == bgr.shape[:2] and lightness_full.dtype == np.uint8


def own_ab224(bgr: np.ndarray) -> np.ndarray:
    return direct_lab224(bgr)[..., 1:].transpose(2, 0, 1).astype(np.float32) / 255


def test_unit_float_scales_bytes_to_the_unit_interval():
    scaled = unit_float(torch.tensor([[0, 51, 255]], dtype=torch.uint8))
    assert scaled.dtype == torch.float32 and torch.equal(scaled, torch.tensor([[0.0, 0.2, 1.0]]))


def test_a_frames_own_ab_composes_back_to_the_frame():
    bgr = gradient_frame(3, 480, 640)
    rgb = rgb_from_lab(lightness(bgr), own_ab224(bgr))
    assert rgb.shape == (480, 640, 3) and rgb.dtype == np.uint8
    assert peak_signal_noise_ratio(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), rgb, data_range=255) > 30
    np.testing.assert_array_equal(rgb, rgb_from_lab(lab_input(bgr)[1], own_ab224(bgr)))  # colorize's path


def test_compose_keeps_the_full_resolution_lightness():
    """One-pixel stripes of lightness under smooth colour: lost at 224, kept only by the original L."""
    height, width = 480, 640
    lab = np.empty((height, width, 3), np.uint8)
    lab[..., 0] = np.where(np.arange(width) % 2, 170, 110)[None, :]
    lab[..., 1] = np.linspace(112, 144, width).astype(np.uint8)[None, :]
    lab[..., 2] = np.linspace(140, 116, height).astype(np.uint8)[:, None]
    bgr = cv2.cvtColor(lab, cv2.COLOR_LAB2BGR)
    lightness_full = cv2.cvtColor(bgr, cv2.COLOR_BGR2LAB)[..., 0].astype(int)
    back = cv2.cvtColor(rgb_from_lab(lightness(bgr), own_ab224(bgr)), cv2.COLOR_RGB2LAB)[..., 0].astype(int)
    assert np.abs(back - lightness_full).max() <= 1
