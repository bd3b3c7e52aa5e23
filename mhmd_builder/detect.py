"""Stage 3: persons in every frame that passed quality; keep frames with a few, large enough persons.

Two detectors with the same output: Ultralytics YOLO (batched, on the GPU when there is one) and
an offline one built only from what ships inside OpenCV 4 (HOG pedestrians plus Haar face and
upper-body cascades). JPEGs are decoded and letterboxed in loader threads ahead of the model, so
the model does not wait on them; for a model on CUDA the threads only read the files, and each
batch is decoded (nvjpeg) and letterboxed on the GPU: at thousands of frames a second, decoding
on the CPU would take more cores than a GPU machine has per GPU.
"""
from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa

from .batching import batched, prefetched
from .devices import pick_device
from .errors import InputError
from .filter import current_decisions
from .images import decode_jpegs, load_frame, read_frame
from .persons import Detections, DetectorError, OpenCVPersonDetector, YoloPersonDetector, resolve_weights
from .runners import LocalRunner
from .tables import DETECT, DETECT_SCHEMA
from .stages import Partition, PartitionResult, Resources, inputs_digest
from .workdir import WorkDir, writes

STAGE = DETECT
REASONS = ("unreadable_frame", "no_person", "too_many_persons", "person_too_small")



@dataclass(frozen=True)
class DetectSettings:
    detector: str = "yolo"  # yolo | opencv
    model: str = "yolo11n.pt"  # a known name (downloaded, hash-checked), a .yaml config or a path
    device: str = "auto"
    batch: int = 32
    imgsz: int = 640
    conf: float = 0.25
    iou: float = 0.7
    min_persons: int = 1
    # The paper drops frames with "too many" persons: past 5, persons are a crowd, each one small
    # and partly hidden, and the frame no longer shows what one person wears.
    max_persons: int = 5
    # The largest person must cover this fraction of the frame: the dataset is about persons seen
    # closely enough to colour their clothes, not figures far away.
    min_person_area: float = 0.02
    masks: bool = False
    loader_threads: int = 4

    def __post_init__(self) -> None:
        if self.min_persons > self.max_persons:  # no frame could be kept
            raise InputError(f"min_persons ({self.min_persons}) is larger than max_persons ({self.max_persons})")

    def to_dict(self) -> dict:
        return asdict(self)


def keep_decision(det: Detections, s: DetectSettings) -> str | None:
    """The reject reason under the keep rule, or None when the frame is kept."""
    if det.count < s.min_persons:
        return "no_person"
    if det.count > s.max_persons:
        return "too_many_persons"
    if det.count and det.largest_area < s.min_person_area:
        return "person_too_small"
    return None


@dataclass
class DetectStage:
    workdir: WorkDir
    settings: DetectSettings = field(default_factory=DetectSettings)
    name: str = STAGE
    resources: Resources = field(default_factory=lambda: Resources(local_workers=1))  # one model
    unit: str = "frames"

    def __post_init__(self) -> None:
        self.detector = None
        self.decode_on_device = False  # set in setup(), once the model's device is known
        if self.settings.detector == "yolo":
            self.resources = Resources.for_model_on(pick_device(self.settings.device))

    def setup(self) -> None:
        """Load the model once per worker."""
        if self.settings.detector == "opencv":
            self.detector = OpenCVPersonDetector()
        else:
            self.detector = YoloPersonDetector.load(self.settings)
        # Not a setting: where the model runs decides it, so CPU results stay those of OpenCV's decoder.
        self.decode_on_device = self.settings.detector == "yolo" and self.detector.device.type == "cuda"
        if self.settings.masks and not self.detector.makes_masks:
            raise DetectorError(f"--masks needs a segmentation model; {self.settings.model} only detects "
                                "(e.g. --model yolo11n-seg.pt)")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "detector": None}  # workers load their own model in setup()

    def process(self, partition: Partition, progress) -> dict:
        started = time.monotonic()
        movie = partition.id
        frames: list[dict] = partition.info["frames"]
        masks_staging = self.workdir.begin(STAGE, movie) / "masks"
        want_masks = self.settings.masks and self.detector.makes_masks
        if want_masks:
            masks_staging.mkdir()
        rows: list[dict] = []
        batch: list[tuple[dict, np.ndarray, tuple[int, int]]] = []

        def run_batch() -> None:
            found = self.detector([image for _, image, _ in batch], [shape for _, _, shape in batch])
            rows.extend(self._row(frame, det, masks_staging if want_masks else None)
                        for (frame, _, _), det in zip(batch, found))
            batch.clear()
            progress(len(rows), len(frames))

        for frame, loaded in self._loaded(frames):
            if loaded is None:
                rows.append(_unreadable_row(frame))
                continue
            batch.append((frame, *loaded))
            if len(batch) >= self.settings.batch:
                run_batch()
        if batch:
            run_batch()

        if want_masks:
            final = self.workdir.root / "masks" / movie
            shutil.rmtree(final, ignore_errors=True)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(masks_staging, final)
        reasons = Counter(r["reject_reason"] for r in rows if not r["kept"])
        summary = {
            "movie_id": movie,
            "inputs_digest": partition.info["inputs_digest"],
            "settings": self.settings.to_dict(),
            "detector": self.detector.describe(),
            "jpeg_decoder": f"torchvision on {self.detector.device}" if self.decode_on_device else "opencv",
            "frames_in": len(rows),
            "frames_out": sum(r["kept"] for r in rows),
            "rejected": dict(sorted(reasons.items())),
            "seconds": round(time.monotonic() - started, 3),
        }
        self.workdir.commit(STAGE, movie, pa.Table.from_pylist(rows, DETECT_SCHEMA), summary)
        return summary

    def _loaded(self, frames: list[dict]):
        """(frame, (prepared image, original (h, w)) or None when unreadable), in order, read ahead."""
        threads, ahead = self.settings.loader_threads, 2 * self.settings.batch
        if not self.decode_on_device:
            yield from prefetched(frames, self._load, threads, ahead)
            return
        read = prefetched(frames, lambda frame: read_frame(self.workdir.root / frame["jpeg"]), threads, ahead)
        for chunk in batched(read, self.settings.batch):
            readable = [(frame, data) for frame, data in chunk if data is not None]
            images = iter(decode_jpegs([data for _, data in readable], self.detector.device))
            for frame, data in chunk:
                image = None if data is None else next(images)
                yield frame, None if image is None else (self.detector.prepare(image), tuple(image.shape[1:]))

    def _load(self, frame: dict) -> tuple[np.ndarray, tuple[int, int]] | None:
        """Runs in a loader thread: decode the JPEG and prepare it for the detector."""
        image = load_frame(self.workdir.root / frame["jpeg"])
        return None if image is None else (self.detector.prepare(image), image.shape[:2])

    def _row(self, frame: dict, det: Detections, masks_staging: Path | None) -> dict:
        reason = keep_decision(det, self.settings)
        mask = None
        if masks_staging is not None and reason is None and det.mask is not None:
            cv2.imwrite(str(masks_staging / f"{frame['frame_id']}.png"), det.mask)
            mask = f"masks/{frame['movie_id']}/{frame['frame_id']}.png"
        return {"frame_id": frame["frame_id"], "movie_id": frame["movie_id"], "persons": det.count,
                "boxes": det.boxes.tolist(), "confidences": det.scores.tolist(),
                "largest_person_area": det.largest_area, "kept": reason is None, "reject_reason": reason,
                "mask": mask}


def _unreadable_row(frame: dict) -> dict:
    return {"frame_id": frame["frame_id"], "movie_id": frame["movie_id"], "persons": None, "boxes": None,
            "confidences": None, "largest_person_area": None, "kept": False,
            "reject_reason": "unreadable_frame", "mask": None}


def plan_detection(workdir: WorkDir, settings: DetectSettings) -> list[Partition]:
    """One partition per movie with frames that passed quality. A done partition is redone when
    its frames or the settings changed since (e.g. after `mhmd filter`)."""
    decisions = current_decisions(workdir)
    kept = decisions[decisions.kept.astype(bool) & ~decisions.needs_extraction.astype(bool)]
    frames = workdir.read_table("extract")
    if frames is None:
        raise InputError(f"{workdir.root}: no extracted movies yet: run `mhmd extract` first")
    kept = kept.merge(frames[["frame_id", "movie_id", "timestamp", "jpeg"]], on="frame_id", suffixes=("_d", ""))
    done = workdir.done(STAGE)
    partitions = []
    for movie, group in kept.sort_values("timestamp").groupby("movie_id", sort=True):
        listing = group[["frame_id", "movie_id", "jpeg"]].to_dict("records")
        digest = inputs_digest([f["frame_id"] for f in listing])
        workdir.plan(STAGE, movie, {"frames": len(listing), "inputs_digest": digest})
        summary = done.get(movie)
        if summary and summary.get("inputs_digest") == digest and summary.get("settings") == settings.to_dict():
            continue
        partitions.append(Partition(movie, {"frames": listing, "inputs_digest": digest}))
    return partitions


@writes("workdir")
def detect(workdir: WorkDir | str | Path, settings: DetectSettings | None = None, runner=None) -> list[PartitionResult]:
    """Detect persons in every frame that passed quality, movie by movie, resumably."""
    workdir = workdir if isinstance(workdir, WorkDir) else WorkDir(workdir)
    settings = settings or DetectSettings()
    if settings.masks and settings.detector != "yolo":
        raise DetectorError("--masks needs a YOLO segmentation model (e.g. --model yolo11n-seg.pt)")
    if settings.detector == "yolo":
        # Download and check the weights here, once, not in every worker.
        settings = replace(settings, model=resolve_weights(settings.model))
    partitions = plan_detection(workdir, settings)
    return (runner or LocalRunner()).run(DetectStage(workdir, settings), partitions)
