"""The ResNet labeler on generated frames whose label is their dominant colour (learnable in seconds)."""
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch

from mhmd_builder.detect import DETECT_SCHEMA
from mhmd_builder.extract import FRAME_SCHEMA
from mhmd_builder.labeler import (LabelerError, PredictSettings, TrainSettings, build_model, classification_metrics,
                                  initial_weights, load_checkpoint, predict, save_checkpoint, train)
from mhmd_builder.labels import read_human_labels, write_human_labels
from mhmd_builder.runners import LocalRunner
from mhmd_builder.taxonomy import load_taxonomy
from mhmd_builder.weights import WeightsError
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


def make_workdir(root: Path) -> tuple[WorkDir, dict[str, str]]:
    """Extract and detect records for FILMS (as the stages write them), and the true label of every
    frame. The last frame of each film was rejected by detection: it must not be labeled."""
    work, truth, rng = WorkDir(root), {}, np.random.default_rng(0)
    names = list(CLASSES)
    for movie in FILMS:
        frames, detections = [], []
        count = PER_CLASS * len(names) + 1
        for k in range(count):
            frame_id, name = f"{movie}-{k:04d}", names[k % len(names)]
            jpeg = f"frames/{movie}/{frame_id}.jpg"
            (work.root / jpeg).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(work.root / jpeg), frame_image(rng, CLASSES[name]))
            kept = k < count - 1
            truth[frame_id] = name
            frames.append({"frame_id": frame_id, "movie_id": movie, "timestamp": float(k), "width": 160, "height": 90,
                           "kept": True, "reject_reason": None, "flags": [], "jpeg": jpeg})
            detections.append({"frame_id": frame_id, "movie_id": movie, "persons": int(kept), "boxes": [],
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


SMALL = dict(arch="resnet18", weights="none", image_size=64, batch_size=16, device="cpu", lr=3e-3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every kept frame of the four films labeled by hand; a small ResNet-18 trained on them."""
    root = tmp_path_factory.mktemp("labeler")
    work, truth = make_workdir(root / "work")
    set_human_labels(work, {f: n for f, n in truth.items() if not f.endswith(REJECTED)})
    config = train(work, TrainSettings(**SMALL, epochs=6, val_fraction=0.25, output=str(root / "ckpt" / "l.safetensors")),
                   TAXONOMY)
    return work, truth, config


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


def test_trained_labeler_generalises_to_a_held_out_film(trained):
    work, truth, config = trained
    assert len(config["val_movies"]) == 1 and config["val_frames"] == PER_CLASS * len(CLASSES)
    assert config["metrics"]["accuracy"] >= 0.9, config["metrics"]
    assert config["taxonomy_sha256"] == TAXONOMY.sha256 and config["label_names"] == TAXONOMY.names
    metrics_file = Path(config["checkpoint"]).with_name("l.metrics.json")
    assert metrics_file.exists() and Path(config["checkpoint"]).with_suffix(".json").exists()


def test_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", len(TAXONOMY)).eval()
    save_checkpoint(model, {"arch": "resnet18", "image_size": 64, "taxonomy_sha256": TAXONOMY.sha256,
                            "label_names": TAXONOMY.names}, tmp_path / "m.safetensors")
    loaded, config = load_checkpoint(tmp_path / "m.safetensors", TAXONOMY)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert config["image_size"] == 64


def test_checkpoint_of_another_taxonomy_is_refused(trained, tmp_path):
    work, _, config = trained
    other = tmp_path / "mine.csv"
    other.write_text("id,name,era,nationality,garment\n0,a/b/c,a,b,c\n1,a/b/d,a,b,d\n")
    with pytest.raises(LabelerError, match="another taxonomy"):
        predict(work, config["checkpoint"], PredictSettings(device="cpu"), load_taxonomy(other))


def test_predict_fills_kept_frames_keeps_human_labels_and_respects_metadata(trained, tmp_path):
    work = copy_workdir(trained[0], tmp_path)
    truth, checkpoint, (held_out,) = trained[1], trained[2]["checkpoint"], trained[2]["val_movies"]
    # Two human labels on the held-out film, one of them against its colour: both stay as given.
    set_human_labels(work, {f"{held_out}-0000": "during_ww2/germany/military", f"{held_out}-0001": truth[f"{held_out}-0001"]})
    usa_only = next(f for f in FILMS if f != held_out)
    metadata = {usa_only: {"era": "during_ww2", "nationality": "usa"}}
    settings = PredictSettings(device="cpu", batch_size=8, loader_threads=2)
    results = predict(work, checkpoint, settings, TAXONOMY, metadata, LocalRunner(1))
    assert sorted(r.id for r in results) == list(FILMS) and all(r.ok for r in results)
    labels = work.read_table("label").set_index("frame_id")
    kept = {f for f in truth if not f.endswith(REJECTED)}
    assert set(labels.index) == kept and labels.label.notna().all()
    assert labels.loc[f"{held_out}-0000"].label == "during_ww2/germany/military"
    human = labels[labels.label_source == "human"]
    assert sorted(human.index) == [f"{held_out}-0000", f"{held_out}-0001"] and (human.label_confidence == 1).all()
    model = labels[(labels.label_source == "model") & (labels.movie_id == held_out)]
    accuracy = np.mean([label == truth[f] for f, label in model.label.items()])
    assert accuracy >= 0.9
    assert all(len(t) == 3 and c[0] >= c[1] >= c[2] for t, c in zip(model.top3, model.top3_confidence))
    restricted = labels[labels.movie_id == usa_only]
    usa = {TAXONOMY.names[i] for i in TAXONOMY.consistent_with("during_ww2", "usa")}
    assert set(restricted.label) <= usa and all(set(t) <= usa for t in restricted.top3)
    assert work.done("label")[held_out]["frames_out"] == PER_CLASS * len(CLASSES)
    # Nothing changed: nothing to do. New metadata for one film: only that film is labeled again.
    assert predict(work, checkpoint, settings, TAXONOMY, metadata) == []
    metadata[held_out] = {"nationality": "germany"}
    assert [r.id for r in predict(work, checkpoint, settings, TAXONOMY, metadata)] == [held_out]
    assert read_human_labels(work).shape[0] == 2


def test_training_is_reproducible_and_one_film_falls_back_to_a_frame_split(trained, tmp_path, capsys):
    work = copy_workdir(trained[0], tmp_path)
    one_film = {f: n for f, n in trained[1].items() if f.startswith("film_a-") and not f.endswith(REJECTED)}
    set_human_labels(work, one_film)
    runs = [train(work, TrainSettings(**{**SMALL, "image_size": 32}, epochs=1, output=str(tmp_path / f"{i}.safetensors")),
                  TAXONOMY) for i in range(2)]
    assert "random frame split" in capsys.readouterr().out
    assert runs[0]["metrics"] == runs[1]["metrics"]
    assert (tmp_path / "0.safetensors").read_bytes() == (tmp_path / "1.safetensors").read_bytes()


def test_weights_offline_pinned_and_none(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MHMD_WEIGHTS_DIR", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert initial_weights("resnet18", "imagenet")[0] is None
    assert "random initialisation" in capsys.readouterr().out
    fake = tmp_path / "resnet18-f37072fd.pth"
    fake.write_bytes(b"not the published file")
    with pytest.raises(WeightsError, match="does not match the published"):
        initial_weights("resnet18", str(fake))
    local = tmp_path / "my_resnet18.pth"
    torch.save(build_model("resnet18", 5).state_dict(), local)
    state, source = initial_weights("resnet18", str(local))
    assert source == str(local) and not any(k.startswith("fc.") for k in state)
    assert initial_weights("resnet18", "none") == (None, "random (--weights none)")
