"""The trail a command leaves: its log in the work directory, results on stdout and notices on
stderr, -v / -q, and a missing work directory refused."""
from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from conftest import make_movie
from mhmd_builder.cli import main
from mhmd_builder.logs import LOG_NAME

RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} pid \d+ (DEBUG|INFO|WARNING|ERROR) ")


def mhmd(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def movies(tmp_path_factory):
    folder = tmp_path_factory.mktemp("movies")
    make_movie(folder / "a.mp4", seconds=2)
    return folder


def test_a_command_appends_its_line_versions_results_and_exit_to_the_log(movies, tmp_path):
    work = tmp_path / "w"
    extracted = mhmd("extract", str(movies), "-w", str(work), "--workers", "1")
    assert extracted.exit_code == 0, extracted.output
    status = mhmd("status", "-w", str(work))
    lines = (work / LOG_NAME).read_text().splitlines()
    assert all(RECORD.match(line) for line in lines)  # one record a line
    text = "\n".join(lines)
    assert f"start: mhmd extract {movies} -w {work} --workers 1" in text
    assert re.search(r"versions: mhmd \S+, Python 3\.\d+\.\d+, torch ", text)
    assert "1 movies extracted, 0 failed" in text and "end: exit 0" in text
    assert f"start: mhmd status -w {work}" in text  # appended after, not over, the extract's
    assert status.stdout.splitlines()[-1] in text  # the funnel it printed


def test_an_error_ends_up_in_the_log_with_its_exit_status(tmp_path):
    work = tmp_path / "w"
    failed = mhmd("extract", str(tmp_path / "none.mp4"), "-w", str(work))
    assert failed.exit_code == 1 and failed.stdout == ""
    log = (work / LOG_NAME).read_text()
    assert re.search(r"ERROR error: .*none\.mp4", log) and "end: exit 1" in log


def test_results_go_to_stdout_and_notices_to_stderr_which_q_silences(movies, tmp_path):
    work = tmp_path / "w"
    plain = mhmd("extract", str(movies), "-w", str(work))
    # CliRunner's stderr is no terminal: the progress comes as a plain line there, never on stdout.
    assert "extract/chunks: 1/1 partitions, 0 failed" in plain.stderr  # the film's run of chunks
    assert "partitions" not in plain.stdout and "1 movies extracted" in plain.stdout
    quiet = mhmd("-q", "extract", str(movies), "-w", str(work), "--redo")
    assert quiet.exit_code == 0 and quiet.stderr == "" and "1 movies extracted" in quiet.stdout
    assert (work / LOG_NAME).read_text().count("extract/chunks: 1/1 partitions") == 2  # the log has it all the same


def test_v_adds_each_partitions_time(movies, tmp_path):
    verbose = mhmd("-v", "extract", str(movies), "-w", str(tmp_path / "w"))
    assert re.search(r"^extract/chunks: a-\w+@0 done after \d+\.\d s$", verbose.stderr, re.M)
    assert "DEBUG" not in (tmp_path / "w" / LOG_NAME).read_text()  # the log keeps INFO and above


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["filter"], ["manifest", "export", "-o", "m.pq"],
                                     ["detect"], ["labels", "import", "FILE"]])
def test_a_missing_work_directory_is_an_error_naming_it(tmp_path, command):
    typo = tmp_path / "wokr"
    args = [str(tmp_path / "labels.csv") if a == "FILE" else a for a in command]
    (tmp_path / "labels.csv").write_text("frame_id,label\n")
    result = mhmd(*args, "-w", str(typo))
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == f"Error: {typo}: no such work directory\n"
    assert not typo.exists()


def test_extract_creates_its_work_directory(movies, tmp_path):
    work = tmp_path / "new" / "w"
    assert mhmd("extract", str(movies), "-w", str(work)).exit_code == 0
    assert (work / LOG_NAME).is_file()


def test_status_imports_no_stage_of_frames_nor_pandas(synthetic_copy):
    """`mhmd status` reads json markers: importing extract (ffmpeg, xxhash), pandas or torch would
    cost it more than its reading does."""
    import subprocess
    import sys

    code = ("import sys; from mhmd_builder.cli import main\n"
            f"main(['status', '-w', {str(synthetic_copy.root)!r}], standalone_mode=False)\n"
            "print(sorted(m for m in ('mhmd_builder.extract', 'mhmd_builder.media', 'pandas', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]" and "extract" in out
