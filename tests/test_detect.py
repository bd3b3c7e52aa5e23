import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from ultralytics import YOLO

from mhmd_builder.cli import main
from mhmd_builder.demo import Segment, make_film
from mhmd_builder.detect import DetectSettings, DetectStage, detect, keep_decision, plan_detection
from mhmd_builder.extract import ExtractSettings, extract
from mhmd_builder.manifest import manifest
from mhmd_builder.media import Sampling
from mhmd_builder.persons import PERSON, Detections
from mhmd_builder.quality import QualityThresholds
from mhmd_builder.runners import LocalRunner
from mhmd_builder.workdir import WorkDir

from conftest import assert_equal_but_on_edges, assert_same_detections, ultralytics_person_mask

# Consecutive frames of a slow zoom are near-duplicates: keep them all here, detection is under test.
NO_DUPLICATES = QualityThresholds(max_hash_distance=-1)


@pytest.fixture(scope="module")
def persons_workdir(tmp_path_factory) -> WorkDir:
    """One film: 3 s of zidane.jpg (two persons, close up), 3 s of bus.jpg (walking persons),
    3 s of a test pattern (nobody); extracted at 1 frame per second."""
    root = tmp_path_factory.mktemp("persons")
    film = make_film(root / "films" / "persons.mp4",
                     [Segment("photo:zidane.jpg", 3), Segment("photo:bus.jpg", 3), Segment("testsrc2=alpha=0", 3)])
    work = WorkDir(root / "extracted")
    extract([film], work, ExtractSettings(sampling=Sampling("fps", 1.0), quality=NO_DUPLICATES), LocalRunner(1))
    return work


def copy_workdir(work: WorkDir, tmp_path: Path) -> WorkDir:
    import shutil

    shutil.copytree(work.root, tmp_path / "work")
    return WorkDir(tmp_path / "work")


def test_keep_rule_and_reasons():
    settings = DetectSettings(min_persons=1, max_persons=3, min_person_area=0.05)

    def boxes(*areas):
        return Detections(np.array([[0, 0, a, 1] for a in areas], np.float32), np.ones(len(areas), np.float32))

    assert keep_decision(boxes(), settings) == "no_person"
    assert keep_decision(boxes(0.2, 0.1, 0.1, 0.1), settings) == "too_many_persons"
    assert keep_decision(boxes(0.04, 0.01), settings) == "person_too_small"
    assert keep_decision(boxes(0.3, 0.01), settings) is None
    assert keep_decision(boxes(), DetectSettings(min_persons=0)) is None


def test_opencv_detector_keeps_frames_of_persons_and_drops_the_test_pattern(persons_workdir, tmp_path):
    work = copy_workdir(persons_workdir, tmp_path)
    results = detect(work, DetectSettings(detector="opencv"), LocalRunner(1))
    assert [r.ok for r in results] == [True]
    frames = manifest(work).set_index("timestamp")
    assert frames.loc[0:2.9].kept.all() and (frames.loc[0:2.9].persons >= 1).all()  # zidane, zooming in
    assert frames.loc[0].persons == 2
    assert frames.loc[3:5.9].kept.all() and (frames.loc[3:5.9].persons >= 1).all()  # bus
    assert not frames.loc[6:].kept.any() and set(frames.loc[6:].reject_reason) == {"no_person"}
    assert frames.persons.notna().all()
    detections = work.read_table("detect")
    for boxes in detections.boxes:
        for box in boxes:
            assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1


def test_corrupt_and_missing_frames_are_recorded_and_the_run_goes_on(persons_workdir, tmp_path):
    work = copy_workdir(persons_workdir, tmp_path)
    jpegs = sorted(work.root.glob("frames/*/*.jpg"))
    jpegs[0].write_bytes(b"not a jpeg")
    jpegs[1].unlink()
    detect(work, DetectSettings(detector="opencv"), LocalRunner(1))
    detections = work.read_table("detect").set_index("frame_id")
    assert detections.loc[[jpegs[0].stem, jpegs[1].stem], "reject_reason"].tolist() == ["unreadable_frame"] * 2
    assert detections.kept.sum() >= 4


def predicted_by_ultralytics(work: WorkDir, model: Path, settings: DetectSettings) -> dict:
    """ultralytics' own predict on every kept frame's JPEG: frame id -> its result."""
    frames = work.read_table("extract").query("kept")
    results = YOLO(model).predict([str(work.root / jpeg) for jpeg in frames.jpeg], imgsz=settings.imgsz,
                                  conf=settings.conf, iou=settings.iou, classes=[PERSON], device="cpu", verbose=False)
    return dict(zip(frames.frame_id, results, strict=True))


def test_yolo_records_the_persons_ultralytics_predict_finds(persons_workdir, person_yolo, tmp_path):
    work = copy_workdir(persons_workdir, tmp_path)
    model = person_yolo("yolo11n.yaml")
    settings = DetectSettings(model=str(model), device="cpu", batch=4, imgsz=160, max_persons=12)
    (result,) = detect(work, settings, LocalRunner(1))
    assert result.ok and result.summary["detector"]["device"] == "cpu" and result.summary["frames_in"] == 9
    rows = work.read_table("detect").set_index("frame_id")
    expected = predicted_by_ultralytics(work, model, settings)
    assert sorted(rows.index) == sorted(expected)
    for frame_id, theirs in expected.items():  # 9 frames in batches of 4: the last one short
        row = rows.loc[frame_id]
        assert row.persons == len(theirs.boxes)
        assert_same_detections(row.boxes.tolist(), row.confidences, theirs)
        reason = keep_decision(Detections(theirs.boxes.xyxyn.numpy(), theirs.boxes.conf.numpy()), settings)
        recorded = row.reject_reason if isinstance(row.reject_reason, str) else None  # pandas reads None as NaN
        assert (row.kept, recorded) == (reason is None, reason)
    assert rows.kept.any() and not rows.kept.all()
    # Same settings, same frames: nothing to do on a rerun. Other settings: the movie is detected again.
    assert detect(work, settings, LocalRunner(1)) == []
    assert len(detect(work, replace(settings, conf=0.3), LocalRunner(1))) == 1


def test_yolo_writes_ultralytics_person_masks_for_the_kept_frames(persons_workdir, person_yolo, tmp_path):
    work = copy_workdir(persons_workdir, tmp_path)
    model = person_yolo("yolo11n-seg.yaml")
    settings = DetectSettings(model=str(model), device="cpu", batch=4, imgsz=160, max_persons=12, masks=True)
    detect(work, settings, LocalRunner(1))
    rows = work.read_table("detect").set_index("frame_id")
    assert rows.kept.any() and not rows.kept.all()
    for frame_id, theirs in predicted_by_ultralytics(work, model, settings).items():
        row = rows.loc[frame_id]
        if not row.kept:
            assert not isinstance(row["mask"], str)  # no mask: None, read as NaN
            continue
        assert row["mask"] == f"masks/{row.movie_id}/{frame_id}.png"
        mask = cv2.imread(str(work.root / row["mask"]), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (360, 640) and mask.any()
        assert_equal_but_on_edges(mask, ultralytics_person_mask(theirs))
    assert sorted(p.stem for p in (work.root / "masks").glob("*/*")) == sorted(rows.index[rows.kept])


def test_masks_with_a_detection_only_model_are_refused(persons_workdir, tmp_path):
    work = copy_workdir(persons_workdir, tmp_path)
    result = CliRunner().invoke(main, ["detect", "-w", str(work.root), "--model", "yolo11n.yaml", "--masks",
                                       "--device", "cpu"])
    assert result.exit_code == 1 and "--masks needs a segmentation model" in result.output
    result = CliRunner().invoke(main, ["detect", "-w", str(work.root), "--detector", "opencv", "--masks"])
    assert result.exit_code == 1 and "--masks needs a YOLO segmentation model" in result.output


def test_detect_cli_reports_the_funnel(persons_workdir, tmp_path):
    work = copy_workdir(persons_workdir, tmp_path)
    result = CliRunner().invoke(main, ["detect", "-w", str(work.root), "--detector", "opencv", "--max-persons", "1"])
    assert result.exit_code == 0, result.output
    rejected = next(line for line in result.output.splitlines() if line.startswith("detect rejected:"))
    assert "no_person 3" in rejected and "too_many_persons" in rejected
    report = json.loads(CliRunner().invoke(main, ["status", "-w", str(work.root), "--json"]).output)
    assert report["detect"]["frames_in"] == 9 and report["detect"]["partitions"]["done"] == 1


def test_offline_known_weights_fail_with_both_remedies(persons_workdir, tmp_path, monkeypatch):
    monkeypatch.setenv("MHMD_WEIGHTS_DIR", str(tmp_path / "weights"))
    work = copy_workdir(persons_workdir, tmp_path)
    result = CliRunner().invoke(main, ["detect", "-w", str(work.root)])
    assert result.exit_code == 1
    assert "--weights PATH" in result.output and "--detector opencv" in result.output
    assert not (work.root / "detect").exists()  # nothing started


def test_parsing_maps_are_checked_and_attached_all_or_nothing(persons_workdir, tmp_path):
    work = copy_workdir(persons_workdir, tmp_path)
    detect(work, DetectSettings(detector="opencv"), LocalRunner(1))
    frames = manifest(work)
    kept, rejected = frames[frames.kept], frames[~frames.kept]
    maps = tmp_path / "maps"
    maps.mkdir()
    for row in kept.itertuples():
        cv2.imwrite(str(maps / f"{row.frame_id}.png"), np.full((row.height, row.width, 3), 80, np.uint8))
    cv2.imwrite(str(maps / "stranger_0.png"), np.zeros((360, 640), np.uint8))
    cv2.imwrite(str(maps / f"{rejected.frame_id.iloc[0]}.png"), np.zeros((360, 640), np.uint8))
    cv2.imwrite(str(maps / f"{kept.frame_id.iloc[0]}.png"), np.zeros((100, 100), np.uint8))  # wrong size
    result = CliRunner().invoke(main, ["parsing", "attach", str(maps), "-w", str(work.root)])
    assert result.exit_code == 1 and "3 invalid parsing maps, nothing attached" in result.output
    assert "stranger_0.png: no extracted frame" in result.output and "100x100, but the frame is 640x360" in result.output
    assert "was rejected (no_person)" in result.output
    assert not (work.root / "parsing").exists()

    (maps / "stranger_0.png").unlink()
    (maps / f"{rejected.frame_id.iloc[0]}.png").unlink()
    cv2.imwrite(str(maps / f"{kept.frame_id.iloc[0]}.png"), np.zeros((360, 640), np.uint8))
    result = CliRunner().invoke(main, ["parsing", "attach", str(maps), "-w", str(work.root)])
    assert result.exit_code == 0 and f"attached {len(kept)} parsing maps" in result.output
    attached = manifest(work).set_index("frame_id").parsing.dropna()
    assert sorted(attached.index) == sorted(kept.frame_id)
    assert all((work.root / p).is_file() for p in attached)


def persons(*areas: float) -> Detections:
    """Full-height boxes whose widths are the given areas (1/2^k: exact in float32)."""
    return Detections(np.array([[0, 0, a, 1] for a in areas], np.float32), np.ones(len(areas), np.float32))


def test_the_keep_rule_at_its_edges():
    default = DetectSettings()
    assert (default.min_persons, default.max_persons, default.min_person_area) == (1, 5, 0.02)  # the paper's rule
    assert keep_decision(persons(*[0.5] * 5), default) is None  # exactly max_persons
    assert keep_decision(persons(*[0.5] * 6), default) == "too_many_persons"
    assert keep_decision(persons(0.5), default) is None  # exactly min_persons
    assert keep_decision(persons(0.021), default) is None
    assert keep_decision(persons(0.019, 0.015), default) == "person_too_small"
    two = DetectSettings(min_persons=2, max_persons=2, min_person_area=0.25)
    assert keep_decision(persons(0.5, 0.25), two) is None
    assert keep_decision(persons(0.5), two) == "no_person"
    assert keep_decision(persons(0.5, 0.5, 0.5), two) == "too_many_persons"
    assert keep_decision(persons(0.25, 0.125), two) is None  # largest area exactly min_person_area
    assert keep_decision(persons(0.125, 0.125), two) == "person_too_small"


def test_jpegs_decoded_on_the_models_device_give_the_loader_threads_detections(persons_workdir, person_yolo, tmp_path):
    """The path a model on CUDA takes (the threads read the files, torchvision decodes each batch and
    letterboxes it where the model runs), run here with the model on the CPU: the same persons as
    OpenCV's decode in the loader threads, and the same unreadable frames. At imgsz 640, the frames'
    size, nothing is resized: the pixels, so the detections, are the same to the bit."""
    work = copy_workdir(persons_workdir, tmp_path)
    jpegs = sorted(work.root.glob("frames/*/*.jpg"))
    jpegs[0].write_bytes(b"not a jpeg")
    jpegs[4].unlink()
    settings = DetectSettings(model=str(person_yolo("yolo11n.yaml")), device="cpu", batch=4, max_persons=12)
    [result] = detect(work, settings, LocalRunner(1))
    assert result.summary["jpeg_decoder"] == "opencv"
    expected = work.read_table("detect").set_index("frame_id").sort_index()
    stage = DetectStage(work, settings)
    stage.setup()
    assert not stage.decode_on_device  # a model on the CPU reads with OpenCV
    stage.decode_on_device = True
    [partition] = plan_detection(work, replace(settings, conf=0.26))  # planned again: the movie is done
    assert stage.process(partition, lambda *_: None)["jpeg_decoder"] == "torchvision on cpu"
    rows = work.read_table("detect").set_index("frame_id").sort_index()
    assert rows.index.tolist() == expected.index.tolist()
    assert rows.loc[[jpegs[0].stem, jpegs[4].stem], "reject_reason"].tolist() == ["unreadable_frame"] * 2
    columns = ["persons", "kept", "reject_reason", "largest_person_area"]
    assert rows[columns].fillna(-1).equals(expected[columns].fillna(-1))
    assert [list(map(list, boxes)) for boxes in rows.boxes.dropna()] == \
        [list(map(list, boxes)) for boxes in expected.boxes.dropna()]
