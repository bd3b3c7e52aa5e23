import csv
import functools
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mhmd_builder.demo import Segment, make_film
from mhmd_builder.detect import DetectSettings, detect
from mhmd_builder.extract import ExtractSettings, extract
from mhmd_builder.labels import import_labels, labelable_frames, load_movie_metadata
from mhmd_builder.media import Sampling
from mhmd_builder.quality import QualityThresholds
from mhmd_builder.runners import LocalRunner
from mhmd_builder.sample import CSV_COLUMNS, sample_frames, uncertain_frames, write_sample
from mhmd_builder.tables import LABEL as LABEL_STAGE, PREDICTION_SCHEMA, read_human_labels
from mhmd_builder.taxonomy import load_taxonomy
from mhmd_builder.workdir import WorkDir

TAXONOMY = load_taxonomy()


@functools.cache
def _films(basetemp: Path) -> WorkDir:
    """Two films at 2 frames/s, detected with OpenCV: "Zidane (1944)" (3 s of zidane.jpg, 3 s of
    bus.jpg, 1 s of a test pattern nobody is in: 12 frames kept, 2 rejected) and "Bus (1962)"
    (3 s of bus.jpg: 6 kept). Built once per session; test_labels uses it too."""
    root = basetemp / "films"
    films = [make_film(root / "films" / "Zidane (1944).mp4", [Segment("photo:zidane.jpg", 3),
                       Segment("photo:bus.jpg", 3), Segment("testsrc2=alpha=0", 1)]),
             make_film(root / "films" / "Bus (1962).mp4", [Segment("photo:bus.jpg", 3)])]
    work = WorkDir(root / "work")
    # Consecutive frames of a slow zoom are near-duplicates: keep them all here.
    settings = ExtractSettings(sampling=Sampling("fps", 2.0), quality=QualityThresholds(max_hash_distance=-1))
    extract(films, work, settings, LocalRunner(1))
    detect(work, DetectSettings(detector="opencv"), LocalRunner(1))
    return work


def copy_films(tmp_path_factory, tmp_path: Path) -> WorkDir:
    """A fresh copy of the two detected films (tests write labels into it)."""
    shutil.copytree(_films(tmp_path_factory.getbasetemp()).root, tmp_path / "work")
    return WorkDir(tmp_path / "work")


@pytest.fixture
def films(tmp_path_factory, tmp_path) -> WorkDir:
    return copy_films(tmp_path_factory, tmp_path)


def movie_ids(work: WorkDir) -> dict[str, str]:
    """Film title -> movie id."""
    return {Path(s["path"]).stem.split(" (")[0]: movie for movie, s in work.done("extract").items()}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, rows: list[dict], columns=CSV_COLUMNS) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_the_sample_is_spread_over_films_and_time_and_reproducible(films):
    kept = labelable_frames(films)
    ids = movie_ids(films)
    assert kept.movie_id.value_counts().to_dict() == {ids["Zidane"]: 12, ids["Bus"]: 6}
    sample = sample_frames(films, fraction=0.5, seed=3)
    assert sample.movie_id.value_counts().to_dict() == {ids["Zidane"]: 6, ids["Bus"]: 3}
    for movie, picks in sample.groupby("movie_id"):
        times = kept[kept.movie_id == movie].sort_values("timestamp").frame_id.to_numpy()
        for stratum in np.array_split(times, len(picks)):  # one pick in each stretch of the film
            assert picks.frame_id.isin(stratum).sum() == 1
    assert sample.equals(sample_frames(films, fraction=0.5, seed=3))
    assert not sample.frame_id.equals(sample_frames(films, fraction=0.5, seed=4).frame_id)
    # 1% of a short film rounds to nothing: each film still gets its one frame.
    assert sample_frames(films, fraction=0.01).movie_id.value_counts().to_dict() == {ids["Zidane"]: 1, ids["Bus"]: 1}
    assert all(Path(image).is_file() for image in sample.image)


def test_csv_round_trip_and_the_next_sample_skips_labelled_frames(films, tmp_path):
    todo = tmp_path / "out" / "todo.csv"
    assert write_sample(sample_frames(films, fraction=0.25), todo, "csv", TAXONOMY) == [todo]
    assert list(todo.parent.iterdir()) == [todo]
    rows = read_csv(todo)
    assert list(rows[0]) == CSV_COLUMNS and all(r["label"] == r["garment"] == "" for r in rows)
    rows[0]["label"] = "during_ww2/usa/military"
    rows[1].update(era="after_ww2", nationality="china", garment="informal")  # parts instead of a name
    # The rest are not labelled yet: they are left out, not errors.
    summary = import_labels(films, write_csv(tmp_path / "done.csv", rows), TAXONOMY)
    assert summary["new"] == 2 and summary["unlabelled"] == len(rows) - 2 and summary["total"] == 2
    human = read_human_labels(films).set_index("frame_id")
    assert human.loc[rows[0]["frame_id"]].label == "during_ww2/usa/military"
    assert human.loc[rows[1]["frame_id"]].label_id == TAXONOMY.by_name("after_ww2/china/informal").id
    assert human.loc[rows[1]["frame_id"]].line == 3
    labelled = set(human.index)
    for seed in range(5):
        assert not labelled & set(sample_frames(films, fraction=0.5, seed=seed).frame_id)


def test_label_studio_round_trip(films, tmp_path):
    tasks_path = tmp_path / "tasks.json"
    sample = sample_frames(films, fraction=0.25)
    assert write_sample(sample, tasks_path, "label-studio", TAXONOMY) == [tasks_path, tmp_path / "tasks.xml"]
    config = ET.parse(tmp_path / "tasks.xml").getroot()
    assert config.find("Image").get("value") == "$image"
    groups = {c.get("name"): [choice.get("value") for choice in c] for c in config.iter("Choices")}
    # Label Studio's own check: a task cannot be submitted with a part left out.
    assert [c.get("required") for c in config.iter("Choices")] == ["true"] * 3
    assert groups["era"] == ["before_ww2", "during_ww2", "after_ww2"]
    assert set(groups["nationality"]) == {l.nationality for l in TAXONOMY.labels} and len(groups["garment"]) == 5
    tasks = json.loads(tasks_path.read_text())
    assert [t["data"]["frame_id"] for t in tasks] == sample.frame_id.tolist()
    for task in tasks:  # served from LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT = the work directory
        assert task["data"]["image"].startswith("/data/local-files/?d=frames/")
        assert (films.root / task["data"]["image"].split("?d=")[1]).is_file()

    # What Label Studio exports after labeling: its own task ids, the image URL, every annotation.
    def choices(era, nationality, garment):
        return [{"id": f"r{i}", "from_name": part, "to_name": "image", "type": "choices", "origin": "manual",
                 "value": {"choices": [value]}} for i, (part, value) in
                enumerate(zip(("era", "nationality", "garment"), (era, nationality, garment)))]

    def annotation(n, result, updated, cancelled=False):
        return {"id": n, "completed_by": 1, "result": result, "was_cancelled": cancelled, "ground_truth": False,
                "created_at": "2025-01-01T10:00:00.000000Z", "updated_at": updated, "lead_time": 4.2, "task": n}

    export = []
    for n, task in enumerate(tasks, start=1):
        entry = {"id": n, "data": {"image": task["data"]["image"]}, "meta": {}, "drafts": [], "predictions": [],
                 "annotations": [], "project": 1, "inner_id": n, "total_annotations": 1}
        if n == 1:  # first answer corrected later: the latest counts
            entry["annotations"] = [annotation(10, choices("during_ww2", "usa", "informal"), "2025-01-02T09:00:00Z"),
                                    annotation(11, choices("during_ww2", "usa", "military"), "2025-01-01T11:00:00Z")]
        elif n == 2:  # skipped: no label
            entry["annotations"] = [annotation(12, [], "2025-01-01T11:00:00Z", cancelled=True)]
        else:
            entry["data"]["frame_id"] = task["data"]["frame_id"]
            entry["annotations"] = [annotation(20 + n, choices("after_ww2", "russia", "formal"), "2025-01-01T11:00:00Z")]
        export.append(entry)
    exported = tmp_path / "project-1-at-2025-01-02.json"
    exported.write_text(json.dumps(export, indent=2))
    summary = import_labels(films, exported, TAXONOMY)
    assert summary["new"] == len(tasks) - 1 and summary["unlabelled"] == 1
    human = read_human_labels(films).set_index("frame_id")
    assert human.loc[tasks[0]["data"]["frame_id"]].label == "during_ww2/usa/informal"
    assert tasks[1]["data"]["frame_id"] not in human.index
    assert set(human.drop(tasks[0]["data"]["frame_id"]).label) == {"after_ww2/russia/formal"}
    # Line numbers point at each task in the export.
    lines = exported.read_text().splitlines()
    for frame, line in zip(human.index, human.line):
        assert lines[line - 1].strip() == "{" and lines[line].strip().startswith('"id"')


def test_movie_metadata_prefills_the_sample_and_is_inherited_on_import(films, tmp_path):
    ids = movie_ids(films)
    movies = write_csv(tmp_path / "movies.csv", [{"movie": "Zidane (1944).mp4", "era": "during_ww2", "nationality": "germany"},
                                                 {"movie": ids["Bus"], "era": "after_ww2", "nationality": ""}],
                       ["movie", "era", "nationality"])
    metadata = load_movie_metadata(movies, films, TAXONOMY)
    assert metadata == {ids["Zidane"]: {"era": "during_ww2", "nationality": "germany"},
                        ids["Bus"]: {"era": "after_ww2", "nationality": None}}
    write_sample(sample_frames(films, fraction=0.25, movie_metadata=metadata), tmp_path / "todo.csv", "csv", TAXONOMY)
    rows = read_csv(tmp_path / "todo.csv")
    zidane = [r for r in rows if r["movie_id"] == ids["Zidane"]]
    bus = [r for r in rows if r["movie_id"] == ids["Bus"]]
    assert all((r["era"], r["nationality"]) == ("during_ww2", "germany") for r in zidane)
    assert all((r["era"], r["nationality"]) == ("after_ww2", "") for r in bus)
    for r in zidane:
        r.update(era="", nationality="", garment="military")  # cleared: inherited all the same
    for r in bus:
        r.update(nationality="usa", garment="formal")
    import_labels(films, write_csv(tmp_path / "done.csv", rows), TAXONOMY, metadata)
    human = read_human_labels(films).set_index("frame_id")
    assert set(human.loc[[r["frame_id"] for r in zidane]].label) == {"during_ww2/germany/military"}
    assert set(human.loc[[r["frame_id"] for r in bus]].label) == {"after_ww2/usa/formal"}

    tasks = json.loads((write_sample(sample_frames(films, 0.25, seed=1, movie_metadata=metadata),
                                     tmp_path / "t.json", "label-studio", TAXONOMY)[0]).read_text())
    prefilled = {t["data"]["movie_id"]: [r["value"]["choices"][0] for r in t["predictions"][0]["result"]] for t in tasks}
    assert prefilled == {ids["Zidane"]: ["during_ww2", "germany"], ids["Bus"]: ["after_ww2"]}


def test_bad_movie_metadata_is_reported_with_line_numbers(films, tmp_path):
    from mhmd_builder.labels import LabelFileError

    ids = movie_ids(films)
    path = tmp_path / "movies.csv"
    path.write_text("movie,era,nationality\n"
                    "Zidane (1944).mp4,during_ww2,usa\n"
                    "Casablanca (1942).mp4,during_ww2,usa\n"
                    f"{ids['Zidane']},during_ww2,usa\n"
                    "Bus (1962).mp4,1960s,usa\n"
                    "Bus (1962).mp4,after_ww2,japan\n"
                    "Bus (1962).mp4,after_ww2\n")
    with pytest.raises(LabelFileError) as error:
        load_movie_metadata(path, films, TAXONOMY)
    assert error.value.problems == [
        f"{path}:3: unknown movie 'Casablanca (1942).mp4' (neither the file name nor the id of an extracted movie)",
        f"{path}:4: movie {ids['Zidane']} also on line 2",
        f"{path}:5: unknown era '1960s'",
        f"{path}:6: no label of the taxonomy is after_ww2/japan",  # in file order; a line's own problems first
        f"{path}:6: movie {ids['Bus']} also on line 5",
        f"{path}:7: 2 fields, the header has 3",
    ]


def write_predictions(work: WorkDir, movie: str, confidences: dict[str, float], human=()) -> None:
    """A label stage partition as the labeler writes it; frames in `human` carry a person's label."""
    label = TAXONOMY.labels[0]
    rows = [{"frame_id": f, "movie_id": movie, "label": label.name, "label_id": label.id,
             "label_source": "human" if f in human else "model", "label_confidence": c,
             "top3": [label.name], "top3_confidence": [c]} for f, c in confidences.items()]
    work.begin(LABEL_STAGE, movie)
    work.commit(LABEL_STAGE, movie, pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA), {"frames_in": len(rows)})


def test_uncertain_picks_the_least_confident_model_labels_never_human_ones(films, tmp_path):
    with pytest.raises(ValueError, match="run `mhmd labeler predict` first"):
        uncertain_frames(films, 3)
    kept = labelable_frames(films)
    ids = movie_ids(films)
    zidane = kept[kept.movie_id == ids["Zidane"]].frame_id.tolist()
    bus = kept[kept.movie_id == ids["Bus"]].frame_id.tolist()
    write_predictions(films, ids["Zidane"], {f: 0.9 - 0.05 * i for i, f in enumerate(zidane)})
    write_predictions(films, ids["Bus"], {bus[0]: 0.01, bus[1]: 0.3, bus[2]: 0.35, bus[3]: 0.0}, human={bus[3]})
    # bus[0] is the least sure of all, but a person labelled it since.
    write_csv(tmp_path / "one.csv", [{"frame_id": bus[0], "label": "after_ww2/usa/formal"}], ["frame_id", "label"])
    import_labels(films, tmp_path / "one.csv", TAXONOMY)
    picked = uncertain_frames(films, 4)
    assert picked.frame_id.tolist() == [bus[1], bus[2], zidane[-1], zidane[-2]]
    assert picked.label_confidence.tolist() == pytest.approx([0.3, 0.35, 0.9 - 0.55, 0.9 - 0.5])
    assert uncertain_frames(films, 100).frame_id.isin(kept.frame_id).all()
    assert len(uncertain_frames(films, 100)) == len(zidane) + 2  # not bus[0] (human now), bus[3] (human)
    write_sample(picked, tmp_path / "next.csv", "csv", TAXONOMY)
    assert [r["frame_id"] for r in read_csv(tmp_path / "next.csv")] == picked.frame_id.tolist()


def test_sampling_before_detection_says_what_to_run(tmp_path):
    with pytest.raises(ValueError, match="run `mhmd detect` first"):
        sample_frames(WorkDir(tmp_path / "empty"))


def test_the_labeling_round_trip_through_the_command_line(films, tmp_path, monkeypatch):
    """sample -> people fill the CSV -> labeler train (imports it) -> predict: every kept frame labelled."""
    from click.testing import CliRunner

    from mhmd_builder.cli import main
    from mhmd_builder.manifest import manifest

    monkeypatch.setenv("MHMD_WEIGHTS_DIR", str(tmp_path / "no-weights"))
    cli = CliRunner()
    todo = tmp_path / "todo.csv"
    result = cli.invoke(main, ["sample", "-w", str(films.root), "--fraction", "0.5", "-o", str(todo)])
    assert result.exit_code == 0, result.output
    rows = read_csv(todo)
    ids = movie_ids(films)
    for row in rows:
        row["label"] = "during_ww2/usa/military" if row["movie_id"] == ids["Zidane"] else "after_ww2/usa/informal"
    write_csv(todo, rows)
    bad = write_csv(tmp_path / "bad.csv", [{**rows[0], "label": "during_ww2/narnia/military"}])
    result = cli.invoke(main, ["labels", "import", str(bad), "-w", str(films.root)])
    assert result.exit_code == 1 and "bad.csv:2:" in result.output

    checkpoint = tmp_path / "labeler.safetensors"
    result = cli.invoke(main, ["labeler", "train", "-w", str(films.root), "--labels", str(todo), "--arch", "resnet18",
                               "--weights", "none", "--epochs", "1", "--image-size", "64", "--device", "cpu",
                               "-o", str(checkpoint)])
    assert result.exit_code == 0, result.output
    assert f"imported {len(rows)} labels" in result.output and checkpoint.is_file()
    result = cli.invoke(main, ["labeler", "predict", "-w", str(films.root), "--checkpoint", str(checkpoint),
                               "--device", "cpu"])
    assert result.exit_code == 0, result.output
    frames = manifest(films)
    kept = frames[frames.kept]
    assert kept.label.notna().all() and set(kept.label_source) == {"human", "model"}
    assert (kept[kept.label_source == "human"].label_confidence == 1.0).all()


def test_the_sample_drawn_film_by_film_is_that_of_the_whole_manifest(synthetic_copy):
    """Read one film at a time, the sample is the one drawn from all the frames at once: per film
    its share of the frames that passed detection, spread over the open ones (not labelled yet)."""
    import zlib

    import pandas as pd

    from mhmd_builder import sample as sample_module
    from mhmd_builder.labels import write_human_labels

    work = synthetic_copy
    frames = labelable_frames(work)
    labelled = frames.iloc[::7]
    write_human_labels(work, pd.DataFrame({"frame_id": labelled.frame_id, "label": labelled.label, "label_id": 0,
                                           "source": "people.csv", "line": range(len(labelled))}))
    open_frames = frames[~frames.frame_id.isin(set(labelled.frame_id))]
    expected = []
    for movie, film in open_frames.groupby("movie_id", sort=True):
        count = min(len(film), max(1, int(0.05 * (frames.movie_id == movie).sum() + 0.5)))
        rng = np.random.default_rng([3, zlib.crc32(movie.encode())])
        expected += sample_module._spread(film, count, rng).frame_id.tolist()
    drawn = sample_frames(work, fraction=0.05, seed=3)
    assert drawn.frame_id.tolist() == expected and not set(expected) & set(labelled.frame_id)
    assert uncertain_frames(work, 20).frame_id.tolist() == open_frames.sort_values(
        ["label_confidence", "frame_id"]).frame_id.head(20).tolist()
