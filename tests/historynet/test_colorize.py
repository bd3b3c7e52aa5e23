"""`colorize` on real black-and-white photos, colour and broken inputs, with a random-weight checkpoint."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_data import NUM_CLASSES, gradient_frame
from test_images import huge_png, peak_rss_growth

from mhmd_builder.historynet import colorize as colorize_module
from mhmd_builder.historynet.checkpoint import save_checkpoint
from mhmd_builder.historynet.colorize import ColorizeError, colorize, input_images
from mhmd_builder.historynet.model import build_networks

IMAGE_SIZE = 32
WIDTH = 0.25  # the tests' networks: a quarter of the paper's channels, ~1/16 of its weights
# The 8-bit Lab -> RGB -> Lab round trip moves L by at most this much where no RGB channel was clipped
# (measured: 2, on the sample photos with colours as strong as a trained model's, chroma 10-17). Where
# the predicted colour is outside the RGB gamut for its L (strong ab on near-black or near-white),
# OpenCV clips each channel and L moves much more (up to 23 levels here, ~30 with stronger colours):
# the official reconstruction does the same.
L_ROUND_TRIP = 2


def make_checkpoint(path: Path, colour_gain: float = 50.0) -> Path:
    """Random weights; the last colour convolution scaled so that ab varies as strongly as a trained
    model's (random weights alone give ab close to neutral grey; 50 at width 0.25 as 400 at width 1)."""
    torch.manual_seed(0)
    networks = build_networks("historynet", NUM_CLASSES, IMAGE_SIZE, WIDTH)
    with torch.no_grad():
        networks.generator.g1.out_2[1].weight.mul_(colour_gain)
    config = {"variant": "historynet", "num_classes": NUM_CLASSES, "image_size": IMAGE_SIZE, "width": WIDTH,
              "label_names": [f"label_{i}" for i in range(NUM_CLASSES)]}
    return save_checkpoint(path, networks, config)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "g.safetensors")


def lab(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2LAB).astype(int)


def assert_same_lightness(source: Path, output: Path) -> None:
    """Same size; L within the round trip's bound wherever the output's RGB was not clipped."""
    original, colorized = lab(source), lab(output)
    assert colorized.shape == original.shape
    rgb = cv2.imread(str(output))
    unclipped = ((rgb > 0) & (rgb < 255)).all(axis=-1)
    assert unclipped.mean() > 0.5
    assert np.abs(colorized[..., 0] - original[..., 0])[unclipped].max() <= L_ROUND_TRIP


def chroma(lab_image: np.ndarray) -> float:
    return float(np.hypot(lab_image[..., 1] - 128, lab_image[..., 2] - 128).mean())


def test_a_folder_of_black_and_white_photos_is_colorized_in_batches(shared_samples, checkpoint, tmp_path,
                                                                     monkeypatch):
    photos = sorted((shared_samples / "photos" / "bw").iterdir())
    batch_sizes = []
    predict = colorize_module.predict_ab

    def counting(generator, gray, device):
        batch_sizes.append(len(gray))
        return predict(generator, gray, device)

    monkeypatch.setattr(colorize_module, "predict_ab", counting)
    result = colorize([shared_samples / "photos" / "bw"], checkpoint, tmp_path / "out", device="cpu", batch_size=8)
    assert result.failures == []
    assert result.written == [tmp_path / "out" / f"{photo.stem}.png" for photo in photos]
    assert batch_sizes == [8] * (len(photos) // 8) + [len(photos) % 8] * (len(photos) % 8 > 0)
    assert any(cv2.imread(str(photo), cv2.IMREAD_UNCHANGED).ndim == 2 for photo in photos)  # 1-channel input too
    for photo, output in zip(photos, result.written):
        assert_same_lightness(photo, output)
        assert chroma(lab(output)) > 5  # the model's colours, not the grey input


def test_a_colour_photo_keeps_its_lightness_and_gets_the_models_colours(checkpoint, tmp_path):
    source = tmp_path / "in" / "colour.png"
    source.parent.mkdir()
    cv2.imwrite(str(source), gradient_frame(3, 150, 210))
    grey = tmp_path / "in" / "grey3.png"  # grey stored as 3 equal channels
    cv2.imwrite(str(grey), cv2.cvtColor(cv2.cvtColor(gradient_frame(1, 90, 70), cv2.COLOR_BGR2GRAY),
                                        cv2.COLOR_GRAY2BGR))
    result = colorize([source, grey], checkpoint, tmp_path / "out", device="cpu")
    assert result.written == [tmp_path / "out" / "colour.png", tmp_path / "out" / "grey3.png"]
    for given, output in zip([source, grey], result.written):
        assert_same_lightness(given, output)
    assert np.abs(lab(result.written[0])[..., 1:] - lab(source)[..., 1:]).mean() > 5  # not the input's ab


@pytest.mark.timeout(120)
def test_unreadable_huge_and_fifo_images_are_named_undecoded_and_the_others_are_written(checkpoint, tmp_path):
    folder, result = tmp_path / "in", []
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "empty.png").write_bytes(b"")
    huge_png(folder / "huge.png", 9000, 9000)
    cv2.imwrite(str(folder / "good.jpg"), gradient_frame(0, 40, 60))
    os.mkfifo(folder / "fifo.png")  # not a photo: skipped, never opened
    growth = peak_rss_growth(lambda: result.append(colorize([folder], checkpoint, tmp_path / "out", device="cpu")))
    assert growth < 100 << 20
    assert result[0].failures == [f"{folder / 'broken.jpg'}: cannot be read as an image",
                                  f"{folder / 'empty.png'}: cannot be read as an image",
                                  f"{folder / 'huge.png'}: 9000x9000, more pixels than the 67,108,864 an image may have"]
    assert result[0].written == [tmp_path / "out" / "good.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png"]


def test_folders_give_their_images_sorted_by_name(tmp_path):
    for name in ["b.JPEG", "a.png", "notes.txt", "._a.jpg", "c.webp"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.jpg").mkdir()
    assert input_images([tmp_path]) == [tmp_path / "a.png", tmp_path / "b.JPEG", tmp_path / "c.webp"]


def test_inputs_that_cannot_work_are_refused_before_any_work(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"")
    (tmp_path / "b" / "x.png").write_bytes(b"")
    os.mkfifo(tmp_path / "fifo.png")
    never = tmp_path / "no-checkpoint.safetensors"  # never opened: the inputs are checked first
    cases = [([tmp_path / "a", tmp_path / "b"], tmp_path / "out", r"a/x\.jpg and .*b/x\.png would both be written to "
                                                                   r".*out/x\.png: rename one$"),
             ([tmp_path / "b"], tmp_path / "b", r"b/x\.png: its output would overwrite it"),
             ([tmp_path / "empty"], tmp_path / "out", r"empty: no images in this folder"),
             ([tmp_path / "nope.jpg"], tmp_path / "out", r"nope\.jpg: no such file or folder$"),
             ([tmp_path / "fifo.png"], tmp_path / "out", r"fifo\.png: not a regular file or folder$")]
    for inputs, out, message in cases:
        with pytest.raises(ColorizeError, match=message) as error:
            colorize(inputs, never, out, device="cpu")
        assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
