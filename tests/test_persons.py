import cv2
import numpy as np
import pytest
import torch
from ultralytics import YOLO
from ultralytics.data.augment import LetterBox
from ultralytics.utils import ASSETS

from mhmd_builder.detect import DetectSettings
from mhmd_builder.persons import (PERSON, YOLO_NAMES, DetectorError, OpenCVPersonDetector, YoloPersonDetector,
                                  letterbox, letterbox_tensor, resolve_weights)
from mhmd_builder.weights import WeightsError

from conftest import assert_equal_but_on_edges, assert_same_detections, pattern_frame, ultralytics_person_mask


def photo(name: str, side: int = 640) -> np.ndarray:
    """An ultralytics sample photo at the size extract gives frames (longer side 640)."""
    image = cv2.imread(str(ASSETS / name))
    scale = side / max(image.shape[:2])
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)


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


@pytest.mark.parametrize("height, width", [(360, 640), (720, 1280), (121, 161), (200, 200)])
def test_letterbox_of_a_decoded_tensor_is_letterbox_within_a_level(height, width):
    """The GPU path's letterbox (bilinear in torch) against OpenCV's: the same shape and padding,
    pixels at most one level apart (fixed-point rounding), and equal where nothing is resized."""
    image = cv2.resize(photo("zidane.jpg"), (width, height), interpolation=cv2.INTER_AREA)
    tensor = torch.from_numpy(image[:, :, ::-1].transpose(2, 0, 1).copy())
    for imgsz in (160, 640):
        ours, reference = letterbox_tensor(tensor, imgsz, 32).numpy(), letterbox(image, imgsz, 32)
        assert ours.shape == reference.shape and ours.dtype == reference.dtype
        difference = np.abs(ours.astype(int) - reference)
        assert difference.max() <= 1 and difference.mean() < 0.2
        if max(height, width) == imgsz:
            assert difference.max() == 0


def loaded(model, **settings) -> YoloPersonDetector:
    """The detector as the detect stage loads it, at a small size."""
    return YoloPersonDetector.load(DetectSettings(model=str(model), device="cpu", imgsz=160, **settings))


def detected(detector: YoloPersonDetector, images: list[np.ndarray]) -> list:
    return detector([detector.prepare(i) for i in images], [i.shape[:2] for i in images])


def predicted(model, images: list[np.ndarray], conf: float = DetectSettings.conf, iou: float = DetectSettings.iou):
    """ultralytics' own predict, with the detect stage's defaults."""
    return YOLO(model).predict(images, imgsz=160, conf=conf, iou=iou, classes=[PERSON], device="cpu", verbose=False)


def test_yolo_detections_equal_ultralytics_predict(person_yolo):
    model = person_yolo("yolo11n.yaml")
    zidane = photo("zidane.jpg", 320)
    groups = [[zidane, zidane[:, ::-1].copy(), zidane[::-1].copy()], [cv2.resize(zidane, (200, 200))]]
    detector = loaded(model, batch=2, conf=0.27, iou=0.5)  # 3 images of one shape: a full batch and a short one
    for images in groups:  # extract gives one size per movie: batches of one shape
        for mine, theirs in zip(detected(detector, images), predicted(model, images, 0.27, 0.5), strict=True):
            assert mine.count > 0
            assert_same_detections(mine.boxes, mine.scores, theirs)


def test_yolo_segmentation_gives_ultralytics_person_masks_at_frame_size(person_yolo):
    model = person_yolo("yolo11n-seg.yaml")
    detector = loaded(model)
    assert detector.makes_masks
    for image in (photo("zidane.jpg", 320), photo("bus.jpg", 256)):
        (found,), (theirs,) = detected(detector, [image]), predicted(model, [image])
        # (ultralytics drops a box whose mask is empty, mhmd counts it: these photos have none)
        assert_same_detections(found.boxes, found.scores, theirs)
        h, w = image.shape[:2]
        assert found.mask.shape == (h, w) and found.mask.dtype == np.uint8 and set(np.unique(found.mask)) == {0, 255}
        # The same pixels as ultralytics' own masks, united and scaled to the frame as mhmd does...
        in_shape = detector.prepare(image).shape[1:]
        assert np.array_equal(found.mask, detector._union_mask(theirs.masks.data, in_shape, (h, w)))
        # ...and where ultralytics itself scales them, and only inside the boxes.
        assert_equal_but_on_edges(found.mask, ultralytics_person_mask(theirs))
        inside = np.zeros((h, w), bool)
        for x0, y0, x1, y1 in found.boxes * [w, h, w, h]:
            inside[int(y0):int(np.ceil(y1)) + 1, int(x0):int(np.ceil(x1)) + 1] = True
        assert not (found.mask.astype(bool) & ~inside).any()


def test_yolo_halves_the_batch_on_cuda_out_of_memory(person_yolo):
    detector = loaded(person_yolo("yolo11n.yaml"), batch=8)
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
    assert len(got) == 5 and expected[0].count > 0
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
