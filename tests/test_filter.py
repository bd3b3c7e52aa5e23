"""Films of known kinds through the extract pass (their quality verdicts), then `mhmd filter`:
new thresholds on the recorded scores, without decoding."""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from mhmd_builder.cli import main
from mhmd_builder.extract import ExtractSettings, extract
from mhmd_builder.filter import MovieDecisions, current_decisions, decide, fresh_decisions, recorded_thresholds, refilter
from mhmd_builder.errors import DamagedFileError
from mhmd_builder.manifest import export_manifest, status
from mhmd_builder.quality import REASONS, SCORE_NAMES, QualityThresholds
from mhmd_builder.runners import LocalRunner
from mhmd_builder.tables import decisions_path
from mhmd_builder.workdir import WorkDir

from conftest import Terminal, make_movie

DEFAULT = QualityThresholds()

# -- films of known kinds through the extract pass, then `mhmd filter` ----------------------------
SEPIA = "colorchannelmixer=.393:.769:.189:0:.349:.686:.168:0:.272:.534:.131"
FILMS = {  # name: (make_movie options, the reason every frame must get; None: kept)
    "colour": ({}, None),
    "grey": ({"vf": "hue=s=0"}, "grayscale"),
    "sepia": ({"vf": SEPIA}, "tinted"),
    "blurred": ({"vf": "scale=512:-2,gblur=sigma=3:steps=4"}, "blurry"),
    "black": ({"source": "color=c=black"}, "grayscale"),
    "letterboxed": ({"size": "640x272", "vf": "pad=640:360:0:44:black"}, None),
    "frozen": ({"vf": "trim=end_frame=1,loop=74:1,noise=alls=12:allf=t"}, "duplicate"),
}


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """Every film of FILMS extracted once (1 fps, 3 s) with the default thresholds."""
    root = tmp_path_factory.mktemp("quality")
    (root / "movies").mkdir()
    for name, (options, _) in FILMS.items():
        make_movie(root / "movies" / f"{name}.mp4", **{"seconds": 3, "size": "640x360", **options})
    work = WorkDir(root / "work")
    # Letterbox detection (nine seeks per movie) only where it is under test; inline runner: no worker start-up.
    plain = [root / "movies" / f"{name}.mp4" for name in FILMS if name != "letterboxed"]
    outcomes = extract(plain, work, ExtractSettings(crop_letterbox=False), LocalRunner(1))
    outcomes += extract([root / "movies" / "letterboxed.mp4"], work, ExtractSettings(), LocalRunner(1))
    assert all(o.status == "done" for o in outcomes), [o.reason for o in outcomes]
    return root, work


def by_film(frames: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {name: frames[frames.movie_id.str.startswith(f"{name}-")] for name in FILMS}


def test_films_of_known_kinds_get_their_reasons(extracted):
    _, work = extracted
    films = by_film(work.read_table("extract"))
    for name, (_, reason) in FILMS.items():
        frames = films[name]
        assert len(frames) == 3, name
        if reason is None:
            assert frames.kept.all(), (name, frames.reject_reason.tolist())
        elif reason == "duplicate":  # one frozen picture: its sharpest frame is kept
            assert frames.kept.sum() == 1 and (frames.reject_reason.dropna() == "duplicate").all()
        else:
            assert (frames.reject_reason == reason).all(), (name, frames.reject_reason.tolist())
    assert all("dark" in list(f) for f in films["black"]["flags"])
    assert (films["letterboxed"].short_side == 272).all() and (films["colour"].short_side == 360).all()


def test_manifest_export_shows_every_score_and_reason(extracted, tmp_path):
    _, work = extracted
    export_manifest(work, str(tmp_path / "m.parquet"))
    manifest = pd.read_parquet(tmp_path / "m.parquet")
    for name in SCORE_NAMES:
        assert manifest[name].dtype == np.float64 and manifest[name].notna().all(), name
    assert set(manifest.reject_reason.dropna()) <= set(REASONS)


@pytest.fixture
def workcopy(extracted, tmp_path):
    """A private copy of the extracted work directory, for tests that write to it."""
    root, work = extracted
    shutil.copytree(work.root, tmp_path / "work")
    return root, WorkDir(tmp_path / "work")


@pytest.fixture
def no_decoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("mhmd filter must not decode anything")
    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(cv2, "VideoCapture", refuse)


def test_refilter_with_the_same_thresholds_reproduces_the_extract_decisions(workcopy, no_decoding):
    _, work = workcopy
    summary = refilter(work, DEFAULT)
    assert summary["newly_rejected"] == summary["newly_accepted"] == 0 and not summary["needs_extraction"]
    extract_rows = work.read_table("extract").set_index("frame_id").sort_index()
    now = current_decisions(work).set_index("frame_id").sort_index()
    assert now.kept.equals(extract_rows.kept)
    assert [list(f) for f in now["flags"]] == [list(f) for f in extract_rows["flags"]]


def test_refilter_changes_decisions_without_decoding(workcopy, no_decoding):
    _, work = workcopy
    lenient = QualityThresholds(min_colorfulness=0, min_chroma_spread=0)
    summary = refilter(work, lenient)
    now = by_film(current_decisions(work).merge(work.read_table("extract")[["frame_id", "movie_id"]]))
    assert now["grey"].kept.all() and now["sepia"].kept.all() and now["grey"].needs_extraction.all()
    assert not now["colour"].needs_extraction.any() and not now["blurred"].kept.any()
    assert summary["newly_accepted"] == 6 and len(summary["needs_extraction"]) == 2
    [command] = summary["reextract_commands"]  # both movies were extracted the same way
    assert command.startswith("mhmd extract ") and "grey.mp4" in command and "sepia.mp4" in command
    assert "--redo --fps 1 --max-side 640" in command and "--no-crop" in command
    assert command.endswith("--min-colorfulness 0 --min-chroma-spread 0") and recorded_thresholds(work) == lenient

    strict = QualityThresholds(min_short_side=400)
    summary = refilter(work, strict)
    now = by_film(current_decisions(work).merge(work.read_table("extract")[["frame_id", "movie_id"]]))
    assert not now["colour"].kept.any() and (now["colour"].reject_reason == "low_resolution").all()
    assert summary["newly_rejected"] > 0 and not summary["needs_extraction"]
    assert (work.read_table("extract").kept.sum() > 0)  # extract's own records are untouched


def test_filter_decisions_give_way_to_a_later_extraction(workcopy):
    root, work = workcopy
    lenient = QualityThresholds(min_colorfulness=0, min_chroma_spread=0)
    refilter(work, lenient)
    grey = next(m for m in work.done("extract") if m.startswith("grey-"))
    extract([root / "movies" / "grey.mp4"], work, ExtractSettings(crop_letterbox=False, quality=lenient),
            LocalRunner(1), redo=True)
    now = current_decisions(work).merge(work.read_table("extract")[["frame_id", "movie_id", "jpeg"]])
    grey_now = now[now.movie_id == grey]
    assert grey_now.kept.all() and grey_now.jpeg.notna().all() and not grey_now.needs_extraction.any()


@pytest.mark.parametrize("damage", ["table", "marker"])
def test_after_a_filter_a_damaged_extract_partition_is_named_by_status_and_refused_by_the_manifest(workcopy, damage):
    _, work = workcopy
    refilter(work, DEFAULT)
    grey = next(m for m in work.done("extract") if m.startswith("grey-"))
    path = work.table_path("extract", grey) if damage == "table" else work.parts_dir("extract") / f"{grey}.done"
    path.write_bytes(path.read_bytes()[:40])
    report = status(work)  # counts what reads, never stops
    assert len(report["extract"]["damaged"]) == 1 and str(path) in report["extract"]["damaged"][0]
    assert report["extract"]["partitions"]["done"] == len(work.done("extract")) == len(FILMS) - 1
    with pytest.raises(DamagedFileError, match=f"^{path}: damaged .*: run `mhmd extract` again to redo it$"):
        export_manifest(work, work.root / "m.parquet")


def test_mhmd_filter_then_its_reextract_command(workcopy):
    cli = CliRunner()
    _, work = workcopy
    result = cli.invoke(main, ["filter", "-w", str(work.root), "--min-colorfulness", "0", "--min-chroma-spread", "0"])
    assert result.exit_code == 0, result.output
    assert "6 newly accepted" in result.output and current_decisions(work).needs_extraction.sum() == 6
    command = shlex.split(result.output.strip().splitlines()[-1])
    result = cli.invoke(main, [*command[1:], "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert not current_decisions(work).needs_extraction.any()
    result = cli.invoke(main, ["filter", "-w", str(work.root)])  # thresholds not given: the last ones
    assert result.exit_code == 0 and "0 newly rejected, 0 newly accepted" in result.output


def test_mhmd_filter_on_an_empty_work_directory_says_what_to_run(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["filter", "-w", str(tmp_path / "empty"), "--min-colorfulness", "5"])
    assert result.exit_code == 1 and "no extracted movies yet: run `mhmd extract` first" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_the_filter_decided_movie_by_movie_is_that_of_the_whole_extract_table(synthetic_copy):
    """Decided one extract table at a time, the decisions and counts are those of the whole table."""
    work = synthetic_copy
    before = current_decisions(work).set_index("frame_id").kept
    thresholds = QualityThresholds(min_colorfulness=1.5, min_sharpness=0)  # the grayscale frames kept now
    summary = refilter(work, thresholds)
    whole = decide(work.read_table("extract"), thresholds)
    written = pd.read_parquet(decisions_path(work))
    assert written.frame_id.tolist() == whole.frame_id.tolist() and written.kept.tolist() == whole.kept.tolist()
    assert written.reject_reason.fillna("").tolist() == whole.reject_reason.fillna("").tolist()
    assert [list(f) for f in written["flags"]] == [list(f) for f in whole["flags"]]
    now = written.set_index("frame_id").kept
    assert summary["newly_accepted"] == int((now & ~before.reindex(now.index)).sum()) > 0
    assert summary["kept"] == int(now.sum()) and summary["frames"] == len(whole) == 3000
    assert sum(summary["needs_extraction"].values()) == int(written.needs_extraction.sum()) > 0


def test_the_decisions_read_per_movie_are_the_whole_files_rows_of_it(synthetic_copy):
    """The filter writes a row group per movie, which a reader going movie by movie reads alone; a
    file an earlier version wrote whole (one row group) gives the same rows; a movie extracted
    again since the filter has none, as in `fresh_decisions`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    work = synthetic_copy
    refilter(work, QualityThresholds(min_colorfulness=0))
    movies = sorted(work.done("extract"))
    assert pq.ParquetFile(decisions_path(work)).num_row_groups == len(movies)
    work.commit("extract", movies[1], pq.read_table(work.table_path("extract", movies[1])).slice(1),
                work.done("extract")[movies[1]])  # extracted again: another table
    whole = fresh_decisions(work)
    assert set(whole["movie_id"].to_pylist()) == set(movies) - {movies[1]}

    def per_movie(decisions):
        return {movie: decisions.of(movie) for movie in [*movies, "film9999"]}

    for _ in ("as written", "as an earlier version wrote it"):
        got = per_movie(MovieDecisions(work))
        assert got[movies[1]] is None and got["film9999"] is None
        for movie in set(movies) - {movies[1]}:
            assert got[movie].equals(whole.filter(pa.compute.equal(whole["movie_id"], movie))), movie
        pq.write_table(pq.read_table(decisions_path(work)), decisions_path(work))  # one row group
        assert pq.ParquetFile(decisions_path(work)).num_row_groups == 1


def test_refilter_shows_a_bar_over_the_films(synthetic_copy, monkeypatch):
    """Half a minute at the paper's size: the films go by on a bar, not in silence."""
    monkeypatch.setattr(sys, "stderr", Terminal())
    refilter(synthetic_copy, DEFAULT)
    assert "filter:   0%" in sys.stderr.getvalue() and "0/6 [" in sys.stderr.getvalue()
