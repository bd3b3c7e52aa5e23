"""Person detectors with one output format: Ultralytics YOLO, and an offline OpenCV detector.

A detector is called with a list of BGR images and returns one `Detections` per image: boxes in
normalised xyxy, confidences, and (segmentation models only) the union mask of all persons.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .devices import pick_device
from .errors import MhmdError
from .weights import PINNED_SHA256, verify_sha256, weights_cache

PERSON = 0  # COCO class id
YOLO_NAMES = tuple(name for name in PINNED_SHA256 if name.endswith(".pt"))  # known to ultralytics' download


class DetectorError(MhmdError):
    """The detector cannot be set up; the message says what to do instead."""


@dataclass
class Detections:
    boxes: np.ndarray  # (n, 4) float32, normalised xyxy
    scores: np.ndarray  # (n,) float32
    mask: np.ndarray | None = None  # HxW uint8, 255 where a person is

    @property
    def count(self) -> int:
        return len(self.boxes)

    @property
    def largest_area(self) -> float:
        if not len(self.boxes):
            return 0.0
        return float(((self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])).max())


def resolve_weights(model: str) -> str:
    """A path for YOLO(): a config (.yaml: random weights), an existing file, or a known name,
    downloaded by ultralytics into the cache and checked against its pinned SHA-256."""
    if model.endswith((".yaml", ".yml")) or Path(model).is_file():
        return model
    name = Path(model).name
    if name not in YOLO_NAMES:
        raise DetectorError(f"{model}: no such file, and not a known model name ({', '.join(YOLO_NAMES)})")
    target = weights_cache() / name
    if not target.is_file():
        from ultralytics.utils.downloads import attempt_download_asset

        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            attempt_download_asset(target)
        except Exception as e:  # noqa: BLE001 - any download failure gets the same remedies
            raise DetectorError(f"cannot download {name} ({type(e).__name__}, offline?): give a local copy with "
                                f"--weights PATH, or use --detector opencv") from None
    return str(verify_sha256(target, PINNED_SHA256[name]))


# -- YOLO -----------------------------------------------------------------------------------------
def letterbox_shape(height: int, width: int, imgsz: int, stride: int) -> tuple[float, tuple[int, int], tuple[int, int]]:
    """Scale factor, resized (h, w) and padded (h, w) for the smallest stride-aligned rectangle
    that holds the image scaled to imgsz on its longer side (ultralytics' 'rect' inference)."""
    ratio = imgsz / max(height, width)
    new_h, new_w = round(height * ratio), round(width * ratio)
    pad_h, pad_w = -(-new_h // stride) * stride, -(-new_w // stride) * stride
    return ratio, (new_h, new_w), (pad_h, pad_w)


def letterbox(image: np.ndarray, imgsz: int, stride: int) -> np.ndarray:
    """RGB, CHW, uint8, resized and padded (grey 114, centred) as ultralytics does."""
    ratio, (new_h, new_w), (pad_h, pad_w) = letterbox_shape(*image.shape[:2], imgsz, stride)
    if (new_h, new_w) != image.shape[:2]:
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, left = (pad_h - new_h) // 2, (pad_w - new_w) // 2
    image = cv2.copyMakeBorder(image, top, pad_h - new_h - top, left, pad_w - new_w - left,
                               cv2.BORDER_CONSTANT, value=(114, 114, 114))
    return np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1))


def letterbox_tensor(image, imgsz: int, stride: int):
    """`letterbox` for an RGB CHW uint8 tensor (a JPEG decoded on the GPU), done where it lies:
    bilinear without antialiasing samples as cv2's INTER_LINEAR does, up to its fixed-point rounding."""
    import torch.nn.functional as F

    ratio, (new_h, new_w), (pad_h, pad_w) = letterbox_shape(*image.shape[1:], imgsz, stride)
    if (new_h, new_w) != tuple(image.shape[1:]):
        resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear", align_corners=False)
        image = resized[0].round_().clamp_(0, 255).to(image.dtype)
    top, left = (pad_h - new_h) // 2, (pad_w - new_w) // 2
    return F.pad(image, (left, pad_w - new_w - left, top, pad_h - new_h - top), value=114)


class YoloPersonDetector:
    """Batched YOLO: letterboxing happens in the loader threads (`prepare`), the batch goes to the
    device in one copy, half precision on CUDA; on CUDA out-of-memory the batch is halved."""

    makes_masks: bool

    def __init__(self, model, device: str, imgsz: int, conf: float, iou: float, batch: int, name: str):
        import torch

        self.device = torch.device(device)
        self.half = self.device.type == "cuda"
        self.model = model.to(self.device).eval()
        self.model = self.model.half() if self.half else self.model.float()
        self.stride = int(self.model.stride.max())
        self.nc = len(self.model.names)
        self.makes_masks = type(self.model).__name__ == "SegmentationModel"
        self.imgsz, self.conf, self.iou, self.batch, self.name = imgsz, conf, iou, batch, name

    @classmethod
    def load(cls, settings) -> "YoloPersonDetector":
        from ultralytics import YOLO

        weights = resolve_weights(settings.model)
        yolo = YOLO(weights)
        if yolo.task not in ("detect", "segment"):
            raise DetectorError(f"{settings.model}: a {yolo.task} model; person detection needs detect or segment")
        return cls(yolo.model.fuse(verbose=False), pick_device(settings.device), settings.imgsz, settings.conf, settings.iou,
                   settings.batch, Path(weights).name)

    def describe(self) -> dict:
        return {"detector": "yolo", "model": self.name, "device": str(self.device), "half": self.half,
                "imgsz": self.imgsz, "batch": self.batch}

    def prepare(self, image):
        """A BGR HWC array (`load_frame`) or an RGB CHW tensor (`decode_jpegs`), letterboxed."""
        if isinstance(image, np.ndarray):
            return letterbox(image, self.imgsz, self.stride)
        return letterbox_tensor(image, self.imgsz, self.stride)

    def __call__(self, images: list[np.ndarray], shapes: list[tuple[int, int]]) -> list[Detections]:
        """`images`: prepared (letterboxed) images of one shape, all arrays or all tensors;
        `shapes`: their original (h, w)."""
        import torch

        out: list[Detections] = []
        for start in range(0, len(images), self.batch):
            chunk = images[start:start + self.batch]
            try:
                out += self._run(chunk, shapes[start:start + len(chunk)])
            except torch.cuda.OutOfMemoryError:
                if self.batch == 1:
                    raise
                torch.cuda.empty_cache()
                self.batch = max(1, len(chunk) // 2)
                out += self(chunk, shapes[start:start + len(chunk)])
        return out

    def _run(self, images: list[np.ndarray], shapes: list[tuple[int, int]]) -> list[Detections]:
        import torch
        from ultralytics.utils import nms, ops

        batch = torch.stack(images) if torch.is_tensor(images[0]) else torch.from_numpy(np.stack(images))
        if batch.device.type != self.device.type:  # arrays from the loader threads, for a GPU
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        batch = (batch.half() if self.half else batch.float()) / 255
        with torch.inference_mode():
            out = self.model(batch)
            pred = out[0] if isinstance(out, (list, tuple)) else out
            det, proto = (pred[0], pred[1]) if isinstance(pred, (list, tuple)) else (pred, None)
            kept = nms.non_max_suppression(det, self.conf, self.iou, classes=[PERSON],
                                           nc=self.nc if proto is not None else 0)
            results = []
            for i, (p, (h, w)) in enumerate(zip(kept, shapes)):
                mask = None
                if proto is not None:
                    masks = ops.process_mask(proto[i], p[:, 6:], p[:, :4], batch.shape[2:], upsample=True)
                    mask = self._union_mask(masks, batch.shape[2:], (h, w))
                results.append(self._detections(p[:, :5].float().cpu().numpy(), batch.shape[2:], (h, w), mask))
        return results

    def _unpad(self, in_shape, shape) -> tuple[float, int, int]:
        ratio, (new_h, new_w), _ = letterbox_shape(*shape, self.imgsz, self.stride)
        return ratio, (in_shape[1] - new_w) // 2, (in_shape[0] - new_h) // 2

    def _detections(self, p: np.ndarray, in_shape, shape, mask) -> Detections:
        ratio, left, top = self._unpad(in_shape, shape)
        h, w = shape
        boxes = (p[:, :4] - [left, top, left, top]) / ratio / [w, h, w, h]
        return Detections(np.clip(boxes, 0, 1).astype(np.float32), p[:, 4].astype(np.float32), mask)

    def _union_mask(self, masks, in_shape, shape) -> np.ndarray:
        ratio, left, top = self._unpad(in_shape, shape)
        h, w = shape
        union = (masks.amax(0) if len(masks) else masks.new_zeros(in_shape)).float().cpu().numpy()
        inner = union[top:top + round(h * ratio), left:left + round(w * ratio)]
        return (cv2.resize(inner, (w, h), interpolation=cv2.INTER_LINEAR) > 0.5).astype(np.uint8) * 255


# -- OpenCV (offline) -----------------------------------------------------------------------------
def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    keep = cv2.dnn.NMSBoxes(boxes[:, :4].tolist(), scores.tolist(), 0.0, iou) if len(boxes) else []
    return np.array(sorted(np.asarray(keep).reshape(-1)), dtype=int)


def _inside(inner: np.ndarray, outer: np.ndarray) -> bool:
    cx, cy = (inner[0] + inner[2]) / 2, (inner[1] + inner[3]) / 2
    return bool(outer[0] <= cx <= outer[2] and outer[1] <= cy <= outer[3])


def skin_fraction(image: np.ndarray) -> float:
    """Fraction of skin-coloured pixels (a classic YCrCb box). Frames reaching detection are in
    colour (quality rejects grey and tinted ones), so a person shows some skin: a face, hands."""
    if image.size == 0:
        return 0.0
    ycrcb = cv2.cvtColor(image, cv2.COLOR_BGR2YCrCb)
    return float(cv2.inRange(ycrcb, (40, 133, 77), (255, 173, 127)).mean() / 255)


class OpenCVPersonDetector:
    """Persons from OpenCV 4's own models: the HOG pedestrian detector finds whole standing
    persons; Haar face and upper-body cascades find the close-ups HOG misses. A face or upper body
    inside a HOG person is the same person; otherwise it stands for a person around it. Each
    candidate must show some skin where a head would be: HOG and the cascades also fire on
    stripes and test patterns, which show none."""

    makes_masks = False

    def __init__(self, work_side: int = 640, hog_threshold: float = 0.5):
        self.work_side, self.hog_threshold = work_side, hog_threshold
        self.hog = cv2.HOGDescriptor()
        self.hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
        self.face = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        self.upper = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_upperbody.xml")
        if self.face.empty() or self.upper.empty():
            raise DetectorError("OpenCV's Haar cascades are missing from this OpenCV build (need opencv-python < 5)")

    def describe(self) -> dict:
        return {"detector": "opencv", "models": ["hog-people", "haar-frontalface", "haar-upperbody"]}

    def prepare(self, image: np.ndarray) -> np.ndarray:
        return image

    def __call__(self, images: list[np.ndarray], shapes=None) -> list[Detections]:
        return [self.detect(image) for image in images]

    def detect(self, image: np.ndarray) -> Detections:
        h, w = image.shape[:2]
        scale = min(1.0, self.work_side / max(h, w))
        small = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA) if scale < 1 else image
        gray = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_BGR2GRAY))
        bodies = self._hog(small)
        parts = [p for p in self._faces(small, gray) + self._upper_bodies(small, gray)
                 if not any(_inside(p[:4], b) for b in bodies)]
        found = np.array(bodies + parts, dtype=np.float32).reshape(-1, 5)
        keep = _nms(np.c_[found[:, :2], found[:, 2:4] - found[:, :2]], found[:, 4], 0.3)
        found = found[keep] if len(keep) else found[:0]
        sh, sw = small.shape[:2]
        boxes = np.clip(found[:, :4] / [sw, sh, sw, sh], 0, 1).astype(np.float32)
        return Detections(boxes, found[:, 4].astype(np.float32))

    def _hog(self, image: np.ndarray) -> list[list[float]]:
        rects, weights = self.hog.detectMultiScale(image, winStride=(8, 8), padding=(8, 8), scale=1.05)
        return [[x, y, x + w, y + h, min(1.0, float(s))] for (x, y, w, h), s in zip(rects, np.ravel(weights))
                if s > self.hog_threshold and skin_fraction(image[y:y + h // 2, x:x + w]) >= 0.01]

    def _faces(self, image: np.ndarray, gray: np.ndarray) -> list[list[float]]:
        """A face stands for the person around it: about 3 face widths wide, down 4 face heights."""
        h, w = gray.shape
        found = []
        for x, y, fw, fh in self.face.detectMultiScale(gray, 1.1, 6, minSize=(max(24, min(h, w) // 20),) * 2):
            if skin_fraction(image[y:y + fh, x:x + fw]) >= 0.3:
                found.append([max(0, x - fw), max(0, y - fh // 2), min(w, x + 2 * fw), min(h, y + 4 * fh), 0.6])
        return found

    def _upper_bodies(self, image: np.ndarray, gray: np.ndarray) -> list[list[float]]:
        h, w = gray.shape
        found = []
        for x, y, bw, bh in self.upper.detectMultiScale(gray, 1.05, 4, minSize=(max(48, min(h, w) // 8),) * 2):
            if skin_fraction(image[y:y + bh // 2, x:x + bw]) >= 0.02:
                found.append([x, y, min(w, x + bw), min(h, y + bh * 2), 0.5])
        return found
