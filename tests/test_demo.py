import json
import os
import re

import pandas as pd
import webdataset as wds

from mhmd_builder.demo import DEMO_FILMS, FORMAL, INFORMAL
from mhmd_builder.manifest import manifest
from mhmd_builder.workdir import WorkDir


def test_demo_keeps_only_colour_frames_of_persons(demo_run):
    out, output, code = demo_run
    assert code == 0, output
    assert "3 movies extracted, 0 failed" in output and "uses the OpenCV detector" in output
    work = WorkDir(out / "work")
    frames = manifest(work)
    colour_film = frames[frames.movie_id.str.startswith("colour-flashback")].set_index("timestamp")
    # 4 s zidane.jpg, 3 s black-and-white, 3 s sepia, 2 s black, 3 s blurred, 4 s bus.jpg (at 2 fps)
    segments = {"zidane": (0, 3.9), "grey": (4, 6.9), "sepia": (7, 9.9), "black": (10, 11.9),
                "blurred": (12, 14.9), "bus": (15, 18.9)}
    reasons = {name: set(colour_film.loc[a:b].reject_reason.dropna()) for name, (a, b) in segments.items()}
    assert reasons["grey"] == {"grayscale"} and reasons["sepia"] == {"tinted"}
    assert reasons["blurred"] == {"blurry"} and reasons["black"] <= {"grayscale", "dark"}
    for name in ("zidane", "bus"):
        kept = colour_film.loc[slice(*segments[name])].query("kept")
        assert len(kept) >= 1 and (kept.persons >= 1).all(), name
        assert reasons[name] <= {"duplicate"}, name  # a slow zoom gives near-duplicates, nothing worse
    scope = frames[frames.movie_id.str.startswith("scope")].set_index("timestamp")
    assert set(scope.loc[0:3.9].reject_reason.dropna()) <= {"no_person", "duplicate"} and not scope.loc[0:3.9].kept.any()
    assert scope.loc[4:].kept.any()
    crops = {s["movie_id"].split("-")[0]: s["crop"] for s in work.done("extract").values()}
    assert crops["colour"] is None and crops["scope"]["h"] == 272
    assert "detect rejected: no_person" in output


def test_demo_labels_its_sample_trains_a_labeler_and_writes_shards(demo_run):
    out, output, code = demo_run
    frames = manifest(WorkDir(out / "work"))
    kept = frames[frames.kept.astype(bool)]
    labels = pd.read_csv(out / "labels.csv")
    # The demo labelled its sample (half of each film's kept frames) with what its films show.
    assert set(labels.label) <= {FORMAL, INFORMAL} and set(labels.movie_id) == set(kept.movie_id)
    assert 0.3 * len(kept) <= len(labels) <= 0.7 * len(kept)
    assert set(kept.label_source) == {"human", "model"} and kept.label.notna().all()
    assert (kept.set_index("frame_id").label[labels.frame_id] == labels.set_index("frame_id").label).all()

    index = json.loads((out / "shards" / "index.json").read_text())
    samples = [s for e in index["shards"] for s in wds.WebDataset(str(out / "shards" / e["name"]),
                                                                     shardshuffle=False).decode("rgb")]
    assert sorted(s["__key__"] for s in samples) == sorted(kept.frame_id)
    assert all(s["cls"] == s["json"]["label_id"] for s in samples)
    # Film names with spaces, commas, dots and non-ASCII letters give plain keys (no dot: webdataset
    # would split the key there).
    assert all(re.fullmatch(r"[a-z0-9-]+-[0-9a-f]{8}_\d+", s["__key__"]) for s in samples)
    assert {s["__key__"].split("-")[0] for s in samples} == {"colour", "scope", "street"}
    films = {split: {s["json"]["movie"] for s, e in zip(samples, _splits(index)) if e == split} for split in ("train", "test")}
    assert films["train"] and films["test"] and not films["train"] & films["test"]
    assert len(films["train"] | films["test"]) == len(DEMO_FILMS)
    assert (out / "report.html").stat().st_size > 10_000 and f"report: {out / 'report.html'}" in output
    # The funnel and where the shards are.
    for line in ("stage       done", "label          3", f"shard {len(index['shards']):>10}", "extract rejected:",
                 f"index: {out / 'shards' / 'index.json'}"):
        assert line in output


def _splits(index):
    return [e["split"] for e in index["shards"] for _ in range(e["count"])]


def test_the_demo_holds_its_work_directory_between_its_two_builds(demo_run):
    """It labels its sample between two builds: no other command may write the work directory then."""
    out, _, code = demo_run
    seen = (out.parent / "lock-while-labelling").read_text()
    assert code == 0 and seen.startswith(f"{(out / 'work').resolve()}: in use by pid {os.getpid()} on "), seen
    assert seen.rstrip().endswith(": wait for it to end")
