"""Training the ResNet labeler on generated frames whose label is their dominant colour (learnable in
seconds); test_label predicts with the labeler trained here."""
import functools
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest

from mhmd_builder.labeler_split import Split
from mhmd_builder.labeler_train import (MIN_VALIDATION_FRAMES, BalancedSampler, TrainSettings, classification_metrics,
                                        majority_baseline, selection_rule, train, train_transform,
                                        warn_if_no_better_than_majority)
from mhmd_builder.labels import write_human_labels
from mhmd_builder.tables import DETECT_SCHEMA, FRAME_SCHEMA
from mhmd_builder.taxonomy import load_taxonomy
from mhmd_builder.workdir import WorkDir

TAXONOMY = load_taxonomy()
# Three MHMD labels, each drawn as frames dominated by one colour (RGB) with a grey "person" in front.
CLASSES = {"during_ww2/usa/military": (170, 60, 50), "during_ww2/usa/formal": (50, 150, 60),
           "during_ww2/germany/military": (50, 70, 170)}
FILMS = ("film_a", "film_b", "film_c", "film_d")
PER_CLASS = 10  # frames per class and film
REJECTED = f"{PER_CLASS * len(CLASSES):04d}"  # the suffix of each film's frame rejected by detection


def frame_image(rng, colour) -> np.ndarray:
    """A 90x160 BGR frame: the class colour (jittered, noisy) with a random grey rectangle."""
    base = np.clip(np.array(colour) + rng.integers(-25, 26, 3), 0, 255)
    image = np.clip(base + rng.normal(0, 12, (90, 160, 3)), 0, 255).astype(np.uint8)
    x, y = rng.integers(0, 100), rng.integers(0, 40)
    image[y:y + 50, x:x + 40] = rng.integers(60, 200)
    return image[:, :, ::-1].copy()


def make_workdir(root: Path, films: dict[str, list[str]] | None = None,
                 boxes: dict[str, list] | None = None) -> tuple[WorkDir, dict[str, str]]:
    """Extract and detect records for `films` (movie -> the label of each frame; default: FILMS, each
    PER_CLASS frames of every class, interleaved), as the stages write them, and the true label of
    every frame. The last frame of each film was rejected by detection: it must not be labeled.
    `boxes`: each movie's person boxes, the same for all its frames (default: none)."""
    work, truth, rng = WorkDir(root), {}, np.random.default_rng(0)
    names = list(CLASSES)
    films = films or {movie: [names[k % len(names)] for k in range(PER_CLASS * len(names) + 1)] for movie in FILMS}
    for movie, labels in films.items():
        frames, detections = [], []
        for k, name in enumerate(labels):
            frame_id = f"{movie}-{k:04d}"
            jpeg = f"frames/{movie}/{frame_id}.jpg"
            (work.root / jpeg).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(work.root / jpeg), frame_image(rng, CLASSES[name]))
            kept = k < len(labels) - 1
            truth[frame_id] = name
            frames.append({"frame_id": frame_id, "movie_id": movie, "timestamp": float(k), "width": 160, "height": 90,
                           "kept": True, "reject_reason": None, "flags": [], "jpeg": jpeg})
            detections.append({"frame_id": frame_id, "movie_id": movie, "persons": int(kept),
                               "boxes": (boxes or {}).get(movie, []),
                               "confidences": [], "largest_person_area": 0.3, "kept": kept,
                               "reject_reason": None if kept else "no_person", "mask": None})
        for stage, rows, schema in (("extract", frames, FRAME_SCHEMA), ("detect", detections, DETECT_SCHEMA)):
            work.begin(stage, movie)
            work.commit(stage, movie, pa.Table.from_pylist(rows, schema), {"frames_in": len(rows)})
    return work, truth


def set_human_labels(work: WorkDir, labels: dict[str, str]) -> None:
    import pandas as pd

    write_human_labels(work, pd.DataFrame({"frame_id": list(labels), "label": list(labels.values()),
                                           "label_id": [TAXONOMY.by_name(n).id for n in labels.values()],
                                           "source": "test.csv", "line": range(2, len(labels) + 2)}))


# 32 pixels and 4 epochs tell the colours apart (held-out accuracy 1.0) in half the time of 64 and 6.
SMALL = dict(arch="resnet18", weights="none", image_size=32, batch_size=16, device="cpu", lr=3e-3)


@functools.cache
def trained_labeler(basetemp: Path) -> tuple[WorkDir, dict[str, str], dict]:
    """Every kept frame of the four films labeled by hand; a small ResNet-18 trained on them. Trained
    once per session; test_label uses it too."""
    root = basetemp / "labeler"
    work, truth = make_workdir(root / "work")
    set_human_labels(work, {f: n for f, n in truth.items() if not f.endswith(REJECTED)})
    config = train(work, TrainSettings(**SMALL, epochs=4, val_fraction=0.25, output=str(root / "ckpt" / "l.safetensors")),
                   TAXONOMY)
    return work, truth, config


@pytest.fixture
def trained(tmp_path_factory) -> tuple[WorkDir, dict[str, str], dict]:
    return trained_labeler(tmp_path_factory.getbasetemp())


def copy_workdir(work: WorkDir, tmp_path: Path) -> WorkDir:
    shutil.copytree(work.root, tmp_path / "work")
    return WorkDir(tmp_path / "work")


def test_metrics_match_a_hand_computation():
    names = ["a", "b", "c", "unused"]
    m = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], names)
    # a: P 1/2 R 1/2 F1 1/2; b: P 2/3 R 1 F1 0.8; c: P 0 R 0 F1 0; "unused" is in neither: not averaged.
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0) / 3)
    assert m["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert "unused" not in m["per_class"]
    assert m["confusion"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


def test_the_sampler_draws_every_class_equally_and_no_frame_twice_before_the_rest_of_its_class():
    targets = np.array([0] * 10 + [1] * 2 + [2])
    sampler, seen = BalancedSampler(targets, seed=0), np.zeros(len(targets), int)
    for _ in range(6):
        drawn = list(sampler)
        assert len(drawn) == len(sampler) == 13
        assert sorted(np.bincount(targets[drawn])) == [4, 4, 5]  # 13 draws over 3 classes
        np.add.at(seen, drawn, 1)
        assert all(np.ptp(seen[targets == c]) <= 1 for c in range(3)), seen  # drawn in rounds
    assert list(BalancedSampler(targets, seed=0)) == list(BalancedSampler(targets, seed=0))


def test_the_sampler_draws_as_many_as_asked_an_epoch_whatever_the_number_of_frames():
    targets = np.array([0] * 10 + [1] * 2 + [2])
    sampler = BalancedSampler(targets, seed=0, draws=6)
    assert len(sampler) == 6 and [sorted(np.bincount(targets[list(sampler)])) for _ in range(2)] == [[2, 2, 2]] * 2


def test_training_augmentation_keeps_the_hue_of_every_colour_the_labels_are_told_apart_by():
    import torch

    torch.manual_seed(0)
    transform = train_transform(32)
    for rgb in CLASSES.values():
        image = torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, 48, 48).contiguous()
        for _ in range(20):
            out = np.ascontiguousarray(transform(image).permute(1, 2, 0).numpy())
            hue = cv2.cvtColor(out, cv2.COLOR_RGB2HSV_FULL)[..., 0].astype(int)
            expected = int(cv2.cvtColor(np.array([[rgb]], np.uint8), cv2.COLOR_RGB2HSV_FULL)[0, 0, 0])
            assert np.abs((hue - expected + 128) % 256 - 128).max() <= 3, rgb  # hue on a circle of 256


def test_training_crops_now_and_then_show_mostly_one_half_of_the_frame():
    import torch

    torch.manual_seed(0)
    transform = train_transform(32)
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    image[0, :, :32] = 255  # the left half red, the right half black
    red_shares = [float((transform(image)[0] > 127).float().mean()) for _ in range(100)]
    # Crops of 70% of the frame or more (ratio 3:4 to 4:3) are at least 72% as wide as it, so each
    # half fills 30% of them or more: most of a film's background would be in every view.
    assert min(red_shares) < 0.2 or max(red_shares) > 0.8, (min(red_shares), max(red_shares))


def test_the_majority_baseline_and_the_warning_when_the_labeler_does_no_better(caplog):
    import pandas as pd

    labeled = pd.DataFrame({"label_id": [1, 1, 0, 2, 1, 0, 0]})
    validating = np.array([False, False, False, False, True, True, True])
    majority = majority_baseline(labeled, validating, ["a", "b", "c"])  # b, the most frequent in training
    # Validation truth b, a, a all called b: accuracy 1/3; F1 of b 1/2 (P 1/3, R 1), of a 0.
    assert majority == pytest.approx({"label": "b", "accuracy": 1 / 3, "macro_f1": 0.25})
    warn_if_no_better_than_majority({"samples": 3, "macro_f1": 0.25, "majority": majority})
    [warning] = caplog.records
    assert warning.levelname == "WARNING"
    assert warning.getMessage().startswith("WARNING: on its validation frames the labeler does no better")
    caplog.clear()
    warn_if_no_better_than_majority({"samples": 3, "macro_f1": 0.26, "majority": majority})
    assert caplog.records == []


def test_trained_labeler_generalises_to_a_held_out_film(trained):
    work, truth, config = trained
    assert len(config["val_movies"]) == 1 and config["val_frames"] == PER_CLASS * len(CLASSES)
    assert config["metrics"]["accuracy"] >= 0.9, config["metrics"]
    assert config["taxonomy_sha256"] == TAXONOMY.sha256 and config["label_names"] == TAXONOMY.names
    metrics_file = Path(config["checkpoint"]).with_name("l.metrics.json")
    assert metrics_file.exists() and Path(config["checkpoint"]).with_suffix(".json").exists()


def test_training_is_reproducible_and_keeps_the_last_epoch_when_validation_cannot_score_a_class(trained, tmp_path,
                                                                                                 capsys):
    work = copy_workdir(trained[0], tmp_path)
    one_film = {f: n for f, n in trained[1].items() if f.startswith("film_a-") and not f.endswith(REJECTED)}
    one_film["film_a-0000"] = "during_ww2/britain_france/military"  # one frame: it trains, nothing validates it
    set_human_labels(work, one_film)
    runs = [train(work, TrainSettings(**SMALL, epochs=2, output=str(tmp_path / f"{i}.safetensors")),
                  TAXONOMY) for i in range(2)]
    out = capsys.readouterr().out
    assert "0 of 1 films held out, 3 classes split by time within a film" in out
    assert runs[0]["metrics"]["epoch"] == 2 and runs[0]["metrics"]["selected"].startswith("the last epoch")
    assert len(runs[0]["trained_labels"]) == 4 and runs[0]["val_movies"] == []
    assert runs[0]["metrics"] == runs[1]["metrics"]
    assert (tmp_path / "0.safetensors").read_bytes() == (tmp_path / "1.safetensors").read_bytes()


@pytest.mark.parametrize("val_frames, kept", [
    ((2, 3), None),  # every trained label validated on MIN_VALIDATION_FRAMES or more: the best epoch
    ((2, 1), "fewer than 2 frames of 1 of the 2 trained labels (b)"),  # one frame: F1 0 or 1, a coin flip
    ((0, 1), "no frame of 1 of the 2 trained labels (a)"),  # unscored comes first
])
def test_the_best_epoch_is_picked_only_when_validation_has_enough_frames_of_every_trained_label(val_frames, kept):
    assert MIN_VALIDATION_FRAMES == 2
    split = Split(val=np.array([]), how="", per_class=[{"label_id": i, "val_frames": n}
                                                       for i, n in enumerate(val_frames)])
    reason = selection_rule(split, [0, 1], ["a", "b"])
    assert reason is None if kept is None else (reason.startswith("the last epoch") and kept in reason)


def conv_statistics(conv, images: np.ndarray) -> tuple:
    """Per-channel mean and unbiased variance of `conv`'s output over `images` (NHWC uint8, normalised
    as the labeler's input), as BatchNorm computes them in training mode."""
    import torch

    from mhmd_builder.labeler import normalise

    with torch.no_grad():
        out = conv(normalise(torch.from_numpy(images).permute(0, 3, 1, 2), "cpu"))
    return out.mean((0, 2, 3)), out.transpose(0, 1).flatten(1).var(1, unbiased=True)


def test_the_checkpoint_keeps_batch_norm_statistics_of_the_training_frames_as_they_are(trained):
    from mhmd_builder.labeler import load_checkpoint, load_rgb

    work, truth, config = trained
    training = sorted(f for f in truth if not f.endswith(REJECTED) and f.split("-")[0] not in config["val_movies"])
    model, _ = load_checkpoint(config["checkpoint"], TAXONOMY)
    images = np.stack([load_rgb(work.root / f"frames/{f.split('-')[0]}/{f}.jpg", SMALL["image_size"])
                       for f in training])
    mean, variance = conv_statistics(model.conv1, images)
    # 90 frames in batches of 16 and a last one of 10, each weighed by its size: the plain mean.
    assert np.allclose(model.bn1.running_mean.numpy(), mean.numpy(), atol=1e-4)
    # The variance is the mean of the batches' own: close to, not equal to, the variance of them all.
    assert np.allclose(model.bn1.running_var.numpy(), variance.numpy(), rtol=0.1)


def test_recalibrated_statistics_weigh_each_batch_by_its_frames_and_leave_the_momentum_as_it_was():
    import torch

    from mhmd_builder.labeler_train import recalibrate_batch_norm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    batches = [(torch.from_numpy(images[:3]).permute(0, 3, 1, 2), None),
               (torch.from_numpy(images[3:]).permute(0, 3, 1, 2), None)]
    recalibrate_batch_norm(model, batches, "cpu")
    mean, _ = conv_statistics(model[0], images)
    assert torch.allclose(model[1].running_mean, mean, atol=1e-5)
    assert model[1].momentum == 0.1 and not model.training


def test_a_persons_labeler_trains_on_the_persons_box_and_its_checkpoint_says_so(tmp_path):
    from mhmd_builder.images import load_frame
    from mhmd_builder.labeler import Labeler, LabelerError, model_input
    from mhmd_builder.labeler_train import LabeledFrames, labeled_frames

    work, truth = make_workdir(tmp_path / "work", boxes={movie: [[0.5, 0.2, 0.9, 0.8]] for movie in FILMS[1:]})
    set_human_labels(work, {f: n for f, n in truth.items() if not f.endswith(REJECTED)})
    rows = labeled_frames(work)
    frames = LabeledFrames(work.root, rows, 32, "persons")
    for i in (0, len(rows) - 1):  # a frame of FILMS[0] (no box: whole) and of FILMS[-1] (its box)
        expected = model_input(load_frame(work.root / rows.jpeg[i]), 32, "persons", rows.boxes[i])
        assert np.array_equal(frames[i][0].permute(1, 2, 0).numpy(), expected)
    assert rows.frame_id[0].startswith(FILMS[0]) and not np.array_equal(
        frames[len(rows) - 1][0], LabeledFrames(work.root, rows, 32, "frame")[len(rows) - 1][0])
    output = tmp_path / "l.safetensors"
    with pytest.raises(LabelerError, match="input 'face' \\(--input\\): not one of frame, persons"):
        train(work, TrainSettings(**SMALL, epochs=1, input="face", output=str(output)), TAXONOMY)
    assert not output.exists()
    config = train(work, TrainSettings(**SMALL, epochs=1, input="persons", output=str(output)), TAXONOMY)
    assert config["input"] == "persons" and Labeler(output, TAXONOMY, "cpu").input == "persons"
