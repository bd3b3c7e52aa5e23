import subprocess

import cv2
import numpy as np
import pytest
import torch
from ultralytics import YOLO
from ultralytics.data.augment import LetterBox
from ultralytics.utils import ASSETS

from mhmd_builder.persons import (YOLO_NAMES, DetectorError, OpenCVPersonDetector, YoloPersonDetector, letterbox,
                                  resolve_weights)
from mhmd_builder.weights import WeightsError


def photo(name: str, side: int = 640) -> np.ndarray:
    """An ultralytics sample photo at the size extract gives frames (longer side 640)."""
    image = cv2.imread(str(ASSETS / name))
    scale = side / max(image.shape[:2])
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)


def pattern_frame(source: str) -> np.ndarray:
    joiner = ":" if "=" in source else "="
    raw = subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"{source}{joiner}size=640x360", "-frames:v", "1",
                          "-f", "rawvideo", "-pix_fmt", "bgr24", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(360, 640, 3)


@pytest.fixture(scope="module")
def opencv_detector():
    return OpenCVPersonDetector()


def test_opencv_finds_walking_persons_in_bus(opencv_detector):
    found = opencv_detector.detect(photo("bus.jpg"))
    assert found.count >= 2
    # Persons stand in the lower two thirds of the photo, taller than wide.
    heights, widths = found.boxes[:, 3] - found.boxes[:, 1], found.boxes[:, 2] - found.boxes[:, 0]
    assert (heights > widths).all() and (found.boxes[:, 3] > 0.6).all()


def test_opencv_finds_both_close_up_persons_in_zidane(opencv_detector):
    found = opencv_detector.detect(photo("zidane.jpg"))
    assert found.count == 2
    centres = np.sort((found.boxes[:, 0] + found.boxes[:, 2]) / 2)
    assert centres[0] < 0.3 and centres[1] > 0.6  # one on the left, one on the right
    assert found.largest_area > 0.1


@pytest.mark.parametrize("source", ["testsrc2", "smptebars", "mandelbrot", "color=c=teal"])
def test_opencv_finds_nobody_in_test_patterns(opencv_detector, source):
    assert opencv_detector.detect(pattern_frame(source)).count == 0


def test_letterbox_equals_ultralytics_rect_letterbox():
    image = photo("zidane.jpg", 320)
    for imgsz in (160, 640):
        reference = LetterBox(new_shape=(imgsz, imgsz), auto=True, stride=32)(image=image)
        ours = letterbox(image, imgsz, 32).transpose(1, 2, 0)[:, :, ::-1]
        assert ours.shape == reference.shape and np.array_equal(ours, reference)


def scoring_model(config: str) -> YOLO:
    """A model built from its config with random weights that still scores persons: ultralytics'
    own initialisation makes every anchor's output the same (nothing to compare), so the
    convolutions get He initialisation and the person logit a zero bias (scores around 0.5)."""
    torch.manual_seed(0)
    yolo = YOLO(config)
    for module in yolo.model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
    for branch in yolo.model.model[-1].cv3:
        branch[-1].bias.data[0] = 0.0
    yolo.model.fuse(verbose=False)
    return yolo


def test_yolo_detections_equal_ultralytics_predict():
    yolo = scoring_model("yolo11n.yaml")
    zidane = photo("zidane.jpg", 320)
    images = [zidane, zidane[:, ::-1].copy(), cv2.resize(zidane, (200, 200))]
    detector = YoloPersonDetector(yolo.model, "cpu", 160, conf=0.5, iou=0.7, batch=2, name="test")
    ours = []
    for group in (images[:2], images[2:]):  # extract gives one size per movie: batches of one shape
        ours += detector([detector.prepare(i) for i in group], [i.shape[:2] for i in group])
    theirs = yolo.predict(images[:2], imgsz=160, conf=0.5, iou=0.7, classes=[0], device="cpu", verbose=False)
    theirs += yolo.predict(images[2:], imgsz=160, conf=0.5, iou=0.7, classes=[0], device="cpu", verbose=False)
    for mine, ref in zip(ours, theirs):
        assert mine.count == len(ref.boxes) > 10
        # The same detections; equal scores may come out in either order.
        a = np.c_[mine.boxes, mine.scores]
        b = np.c_[ref.boxes.xyxyn.numpy(), ref.boxes.conf.numpy()]
        order = lambda rows: rows[np.lexsort(np.round(rows, 3).T[::-1])]  # noqa: E731
        np.testing.assert_allclose(order(a), order(b), atol=1e-5)


def test_yolo_segmentation_gives_one_person_mask_at_frame_size():
    detector = YoloPersonDetector(scoring_model("yolo11n-seg.yaml").model, "cpu", 160, conf=0.5, iou=0.7,
                                  batch=4, name="test")
    image = photo("zidane.jpg", 320)
    (found,) = detector([detector.prepare(image)], [image.shape[:2]])
    assert detector.makes_masks and found.count > 0
    assert found.mask.shape == image.shape[:2] and found.mask.dtype == np.uint8
    assert set(np.unique(found.mask)) == {0, 255}
    # The union mask lies inside the union of the boxes.
    inside = np.zeros(image.shape[:2], bool)
    h, w = image.shape[:2]
    for x0, y0, x1, y1 in found.boxes * [w, h, w, h]:
        inside[int(y0):int(np.ceil(y1)) + 1, int(x0):int(np.ceil(x1)) + 1] = True
    assert not (found.mask.astype(bool) & ~inside).any()


def test_yolo_halves_the_batch_on_cuda_out_of_memory():
    yolo = scoring_model("yolo11n.yaml")
    detector = YoloPersonDetector(yolo.model, "cpu", 128, conf=0.6, iou=0.7, batch=8, name="test")
    images = [photo("bus.jpg", 256)] * 5
    prepared, shapes = [detector.prepare(i) for i in images], [i.shape[:2] for i in images]
    expected = detector(prepared, shapes)
    real_forward = detector.model.forward
    seen = []

    def forward_with_little_memory(x, *args, **kwargs):
        seen.append(len(x))
        if len(x) > 2:  # what CUDA does when a batch does not fit
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(x, *args, **kwargs)

    detector.model.forward = forward_with_little_memory
    got = detector(prepared, shapes)
    assert detector.batch == 2 and seen[0] == 5 and max(seen[1:]) <= 2
    assert len(got) == 5
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-5)


def test_known_weights_offline_give_both_remedies(tmp_path, monkeypatch):
    monkeypatch.setenv("MHMD_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(DetectorError) as err:
        resolve_weights("yolo11n.pt")
    assert "--weights PATH" in str(err.value) and "--detector opencv" in str(err.value)


def test_weights_that_do_not_match_the_pinned_hash_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MHMD_WEIGHTS_DIR", str(tmp_path))
    (tmp_path / "yolo11n.pt").write_bytes(b"not the published file")
    with pytest.raises(WeightsError, match="does not match the published"):
        resolve_weights("yolo11n.pt")
    assert set(YOLO_NAMES) >= {"yolo11n.pt", "yolo11n-seg.pt"}


def test_configs_and_local_files_are_taken_as_they_are(tmp_path):
    local = tmp_path / "finetuned.pt"
    local.write_bytes(b"x")
    assert resolve_weights("yolo11n.yaml") == "yolo11n.yaml"
    assert resolve_weights(str(local)) == str(local)
    with pytest.raises(DetectorError, match="not a known model name"):
        resolve_weights("mystery.pt")
