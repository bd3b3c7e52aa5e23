"""The label stage: the labeler trained in test_labeler_train labels every kept frame of its films."""
import logging
import os

import numpy as np
import pytest

from mhmd_builder.label import STAGE, PredictSettings, predict
from mhmd_builder.labeler import (LabelerError, build_model, default_checkpoint, load_checkpoint, metrics_path,
                                  save_checkpoint)
from mhmd_builder.tables import human_labels_path, label_dir, read_human_labels
from mhmd_builder.runners import LocalRunner
from mhmd_builder.taxonomy import load_taxonomy
from mhmd_builder.workdir import WorkDir
from mhmd_builder.labeler_train import TrainSettings, train
from test_labeler import constant_checkpoint, softmax
from test_labeler_train import (CLASSES, FILMS, PER_CLASS, REJECTED, SMALL, TAXONOMY, copy_workdir, make_workdir,
                                set_human_labels, trained_labeler)


@pytest.fixture
def trained(tmp_path_factory):
    return trained_labeler(tmp_path_factory.getbasetemp())


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
    labels = work.read_table(STAGE).set_index("frame_id")
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
    assert work.done(STAGE)[held_out]["frames_out"] == PER_CLASS * len(CLASSES)
    # Nothing changed: nothing to do. New metadata for one film: only that film is labeled again.
    assert predict(work, checkpoint, settings, TAXONOMY, metadata) == []
    metadata[held_out] = {"nationality": "germany"}
    assert [r.id for r in predict(work, checkpoint, settings, TAXONOMY, metadata)] == [held_out]
    assert read_human_labels(work).shape[0] == 2


def test_every_kept_frame_gets_its_human_label_or_the_most_probable_label_its_film_allows(tmp_path):
    """A labeler that says the same of every frame (known logits): each kept frame's row is its
    human label, or the most probable label among those its film's metadata allows, with the
    probability of each of the top 3 among them."""
    work, truth = make_workdir(tmp_path / "work")
    logits = np.random.default_rng(0).normal(0, 2, len(TAXONOMY))
    logits[TAXONOMY.by_name("after_ww2/china/formal").id] = 9  # the most probable label of all
    checkpoint = constant_checkpoint(tmp_path / "c.safetensors", logits)
    human = {"film_a-0000": "after_ww2/usa/informal", "film_a-0001": "before_ww2/china/communist_military"}
    set_human_labels(work, human)
    metadata = {"film_b": {"era": "during_ww2", "nationality": "usa"}, "film_c": {"nationality": "germany"}}
    predict(work, checkpoint, PredictSettings(device="cpu", batch_size=8, loader_threads=2), TAXONOMY, metadata,
            LocalRunner(1))
    rows = work.read_table(STAGE)
    assert sorted(rows.frame_id) == sorted(f for f in truth if not f.endswith(REJECTED))
    for row in rows.itertuples():
        if row.frame_id in human:
            assert (row.label, row.label_source, row.label_confidence) == (human[row.frame_id], "human", 1.0)
            assert list(row.top3) == [row.label] and list(row.top3_confidence) == [1.0]
            continue
        ids = np.array(TAXONOMY.consistent_with(**metadata.get(row.movie_id, {})))
        probabilities = softmax(logits[ids])
        top = np.argsort(-probabilities)[:3]
        assert (row.label, row.label_id, row.label_source) == (TAXONOMY.names[ids[top[0]]], ids[top[0]], "model")
        assert list(row.top3) == [TAXONOMY.names[i] for i in ids[top]]
        np.testing.assert_allclose([row.label_confidence, *row.top3_confidence], probabilities[top[[0, 0, 1, 2]]],
                                   atol=1e-6)
    assert set(rows.label) >= {"after_ww2/china/formal", *human.values()}


def test_an_old_work_directory_is_read_and_its_label_files_moved_once(tmp_path, caplog):
    """Human labels used to be in W/labels/ and the default checkpoint in W/labeler/: the first
    look for them moves them into the label stage's folder, where they are read from then on."""
    work = WorkDir(tmp_path / "work")
    set_human_labels(work, {"film_a-0000": "during_ww2/usa/formal", "film_a-0001": "during_ww2/usa/military"})
    (work.root / "labels").mkdir()
    os.replace(work.root / "label" / "human.parquet", work.root / "labels" / "human.parquet")
    old_checkpoint = work.root / "labeler" / "labeler.safetensors"
    save_checkpoint(build_model("resnet18", len(TAXONOMY)), {"arch": "resnet18", "image_size": 32,
                    "taxonomy_sha256": TAXONOMY.sha256, "label_names": TAXONOMY.names}, old_checkpoint)
    metrics_path(old_checkpoint).write_text("{}")
    (work.root / "label").rmdir()

    caplog.set_level(logging.INFO, logger="mhmd_builder")
    assert read_human_labels(work).label_id.tolist() == [TAXONOMY.by_name("during_ww2/usa/formal").id,
                                                          TAXONOMY.by_name("during_ww2/usa/military").id]
    moved = [record.getMessage() for record in caplog.records]  # every old label file, the first look
    caplog.clear()
    assert len(moved) == 4 and moved[0] == (f"notice: moved {work.root / 'labels' / 'human.parquet'} to "
                                            f"{work.root / 'label' / 'human.parquet'} (new layout)")
    checkpoint = default_checkpoint(work)
    assert checkpoint == work.root / "label" / "labeler.safetensors" and label_dir(work) == work.stage_dir(STAGE)
    assert load_checkpoint(checkpoint, TAXONOMY)[1]["image_size"] == 32 and metrics_path(checkpoint).is_file()
    assert not (work.root / "labels").exists() and not (work.root / "labeler").exists()
    # Moved once: a file at the old place again is left there, never over the one in use.
    (work.root / "labels").mkdir()
    (work.root / "labels" / "human.parquet").write_bytes(b"stale")
    assert read_human_labels(work).shape[0] == 2 and human_labels_path(work).read_bytes() != b"stale"
    assert caplog.records == []


def test_films_of_one_class_each_get_their_own_label_and_none_the_labeler_never_saw(tmp_path, caplog):
    """Each class in one film only, 30% of the frames labelled by hand: holding out a whole film
    would leave its class untrained (every frame once got a label nobody gave). Each class is
    validated on its latest frames instead, and every other frame gets its film's label."""
    names = list(CLASSES)
    films = {f"only_{i}": [name] * 31 for i, name in enumerate(names)}
    work, truth = make_workdir(tmp_path / "work", films)
    kept = [f for f in truth if not f.endswith("-0030")]
    set_human_labels(work, {f: truth[f] for f in kept[::3]})
    config = train(work, TrainSettings(**{**SMALL, "image_size": 32}, epochs=8,
                                       output=str(tmp_path / "l.safetensors")), TAXONOMY)
    assert config["val_movies"] == [] and [r["val_frames"] for r in config["split"]] == [2, 2, 2]
    assert config["metrics"]["selected"].startswith("the best")
    predict(work, config["checkpoint"], PredictSettings(device="cpu"), TAXONOMY)
    assert any("was trained on 3 of the 42 labels and gives only those" in record.getMessage()
               for record in caplog.records if record.levelno == logging.WARNING)
    model = work.read_table(STAGE).query("label_source == 'model'")
    assert len(model) == len(kept) - len(kept[::3]) and set(model.label) <= set(names)
    assert np.mean([label == truth[f] for f, label in zip(model.frame_id, model.label)]) >= 0.9


def test_a_film_whose_known_labels_the_labeler_never_saw_fails_alone(trained, tmp_path):
    work = copy_workdir(trained[0], tmp_path)
    set_human_labels(work, {f: n for f, n in trained[1].items() if not f.startswith(FILMS[0])})
    japan = {FILMS[0]: {"era": "during_ww2", "nationality": "japan"}}  # no japan label was trained
    results = {r.id: r for r in predict(work, trained[2]["checkpoint"], PredictSettings(device="cpu"), TAXONOMY,
                                        japan)}
    assert [m for m, r in results.items() if not r.ok] == [FILMS[0]]
    assert "was among the labeler's training labels: label some of its frames" in results[FILMS[0]].reason


def test_predict_shows_a_persons_labeler_each_frame_s_persons_box_and_redoes_a_film_whose_boxes_changed(
        tmp_path, monkeypatch):
    from mhmd_builder.images import load_frame
    from mhmd_builder.labeler import Labeler, model_input
    from test_labeler import checkpoint_of

    boxes = {movie: [[0.1 * i, 0.2, 0.5 + 0.1 * i, 0.9]] for i, movie in enumerate(FILMS)}
    work, truth = make_workdir(tmp_path / "work", boxes=boxes)
    checkpoint = checkpoint_of(build_model("resnet18", len(TAXONOMY)), tmp_path / "p.safetensors", input="persons")
    seen = {}
    predict_batch = Labeler.predict_batch

    def recording(self, batch, allowed):
        seen.update((frame["frame_id"], image) for frame, image in batch)
        return predict_batch(self, batch, allowed)

    monkeypatch.setattr(Labeler, "predict_batch", recording)
    settings = PredictSettings(device="cpu", batch_size=16, loader_threads=2)
    predict(work, checkpoint, settings, TAXONOMY, runner=LocalRunner(1))
    assert sorted(seen) == sorted(f for f in truth if not f.endswith(REJECTED))
    for frame_id in (f"{FILMS[0]}-0000", f"{FILMS[-1]}-0005"):
        movie = frame_id.split("-")[0]
        frame = load_frame(work.root / f"frames/{movie}/{frame_id}.jpg")
        assert np.array_equal(seen[frame_id], model_input(frame, 32, "persons", boxes[movie]))
    boxes[FILMS[1]] = [[0.0, 0.0, 0.3, 0.3]]  # detect ran again and found its persons elsewhere
    make_workdir(tmp_path / "work", boxes=boxes)
    assert [r.id for r in predict(work, checkpoint, settings, TAXONOMY, runner=LocalRunner(1))] == [FILMS[1]]
