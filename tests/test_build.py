import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from click.testing import CliRunner

from mhmd_builder.build import PIPELINES, PipelineError, build, load_pipeline
from mhmd_builder.cli import main
from mhmd_builder.demo import DEMO_FILMS
from mhmd_builder.errors import InputError
from mhmd_builder.labeler import default_checkpoint
from mhmd_builder.manifest import manifest
from mhmd_builder.workdir import WorkDir

from conftest import OFFLINE_ENV
from test_sample import copy_films

# The settings test_sample's two films were extracted and detected with: building them again with
# this recipe finds extraction and detection done and goes on from there.
RECIPE = """
extract:
  sampling: {mode: fps, fps: 2.0}
  quality: {max_hash_distance: -1}
detect: {detector: opencv}
sample: {fraction: 0.5, seed: 1}
labeler: {arch: resnet18, weights: none, epochs: 1, batch_size: 8, image_size: 64, device: cpu}
predict: {device: cpu}
shard: {maxcount: 5, test_fraction: 0.3}
"""


@pytest.fixture
def films(tmp_path_factory, tmp_path):
    work = copy_films(tmp_path_factory, tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    movies = [s["path"] for s in work.done("extract").values()]
    return work, recipe, movies


def test_shipped_recipes_load_and_bad_ones_are_refused_with_file_and_key(tmp_path):
    paper = load_pipeline(PIPELINES / "mhmd.yaml")
    assert paper.sample.fraction == 0.01 and abs(paper.shard.test_fraction - 100_001 / 1_353_166) < 1e-4
    assert paper.labeler.arch == "resnet50" and paper.labels is None
    assert load_pipeline("demo.yaml").extract.sampling.fps == 2.0  # a shipped recipe by name
    assert paper.extract.chunk_seconds == 60
    bad = tmp_path / "bad.yaml"
    for text, message in [("detect: {max_persns: 3}", "detect: unknown setting 'max_persns'"),
                          ("shard: {maxcount: many}", "shard.maxcount: expected int"),
                          ("extract: {sampling: {fps: 1.5x}}", "extract.sampling.fps: expected float"),
                          ("extract: {crop_letterbox: 1}", "expected true or false"),
                          ("extract: {chunk_seconds: -1}", r"extract.chunk_seconds: -1.0 is not in the range 0 <= x"),
                          ("extract: {chunk_seconds: soon}", "extract.chunk_seconds: expected float"),
                          ("extract: [1, 2]", "extract: expected a map"),
                          ("detect: {detector: yolo", "not valid YAML")]:
        bad.write_text(text)
        with pytest.raises(PipelineError, match=message) as error:
            load_pipeline(bad)
        assert str(bad) in str(error.value)
    bad.write_text("labels: ../l.csv\nmovies: m.csv")
    assert load_pipeline(bad).labels == str((tmp_path.parent / "l.csv").resolve())
    assert load_pipeline(bad).movies == str(tmp_path / "m.csv")


LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))


def test_hostile_recipes_are_refused_in_one_short_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    for text, message in [(LAUGHS, r"bad.yaml:2: not valid YAML \(more than 8 aliases \(\*name\)\)$"),
                          ("extract: " + "x" * (1 << 20), r"bad.yaml: larger than 1,048,576 bytes"),
                          ("- extract\n- detect\n", r"bad.yaml: a recipe is a map of sections .*, not a list$"),
                          ("extract: [" + ", ".join(["1"] * 10000) + "]", r"bad.yaml.extract: expected a map .{,80}$"),
                          ("a: &x 1\nb: *x\nc: *x\ndetect: {batch: *x}\n", "unknown setting 'a'")]:
        bad.write_text(text)
        with pytest.raises(PipelineError, match=message) as error:
            load_pipeline(bad)
        assert len(str(error.value).splitlines()) == 1 and len(str(error.value)) < 300


@pytest.mark.parametrize("setting, value, option", [
    ("extract: {sampling: {fps: -2}}", "-2.0 is not in the range 0 < x", ["extract", "--fps", "-2"]),
    ("extract: {sampling: {fps: .nan}}", "nan is not a finite number", ["extract", "--fps", "nan"]),
    ("extract: {sampling: {fps: .inf}}", "inf is not a finite number", ["extract", "--fps", "inf"]),
    ("shard: {maxcount: 0}", "0 is not in the range 1 <= x", ["shard", "--maxcount", "0"]),
    ("shard: {test_fraction: 7}", "7.0 is not in the range 0 <= x < 1", ["shard", "--test-fraction", "7"]),
    ("detect: {batch: 0}", "0 is not in the range 1 <= x", ["detect", "--batch", "0"]),
    ("extract: {quality: {min_colorfulness: .nan}}", "nan is not a finite number", None),
])
def test_recipe_values_are_checked_with_the_ranges_of_the_cli(tmp_path, setting, value, option):
    bad = tmp_path / "bad.yaml"
    bad.write_text(setting)
    with pytest.raises(PipelineError, match=rf"^{bad}\.[a-z_.]+: {value}"):
        load_pipeline(bad)
    if option:
        result = CliRunner().invoke(main, option)
        assert result.exit_code == 2 and f"Invalid value for '{option[1]}'" in result.output


@pytest.mark.parametrize("setting, problem, option", [
    ("detect: {detector: yolov5}", "detect.detector: 'yolov5' is not one of yolo, opencv", ["detect", "--detector"]),
    ("labeler: {arch: vit}", "labeler.arch: 'vit' is not one of resnet50, resnet18", ["labeler", "train", "--arch"]),
    ("extract: {decoder: gpu}", "extract.decoder: 'gpu' is not one of auto, cpu, cuda", ["extract", "--decoder"]),
    ("labeler: {input: face}", "labeler.input: 'face' is not one of frame, persons", ["labeler", "train", "--input"]),
    ("extract: {sampling: {mode: every_frame}}", "extract.sampling.mode: 'every_frame' is not one of fps, "
     "keyframes, scenes", None),
    ("detect: {min_persons: 3, max_persons: 2}", "detect: min_persons (3) is larger than max_persons (2)", None),
])
def test_recipe_choices_and_rules_are_the_clis(tmp_path, setting, problem, option):
    bad = tmp_path / "bad.yaml"
    bad.write_text(setting)
    with pytest.raises(PipelineError) as error:
        load_pipeline(bad)
    assert str(error.value) == f"{bad}.{problem}"
    if option:  # the option offers exactly the recipe's choices
        result = CliRunner().invoke(main, [*option[:-1], "--help"])
        choices = problem.split("is not one of ")[1].replace(", ", "|")
        assert f"[{choices}]" in result.output.replace("\n", "").replace(" ", ""), result.output


def test_the_person_count_rule_holds_on_the_command_line_too(tmp_path):
    result = CliRunner().invoke(main, ["detect", "-w", str(tmp_path), "--min-persons", "3", "--max-persons", "2"])
    assert result.exit_code == 1 and result.output == "Error: min_persons (3) is larger than max_persons (2)\n"


@pytest.mark.parametrize("key, text, message", [
    ("labels", None, r"labels.csv: cannot read"),
    ("movies", None, r"movies.csv: cannot read"),
    ("taxonomy", None, r"taxonomy.csv: cannot read"),
    ("labels", "frame_id;label\n", r"labels.csv:1: looks semicolon-separated"),
    ("movies", "movie,era,nationality\nx.mp4,bronze_age,usa\n", r"movies.csv:2: unknown era 'bronze_age'"),
])
def test_input_files_a_recipe_names_are_checked_before_any_stage_runs(tmp_path, key, text, message):
    if text is not None:
        (tmp_path / f"{key}.csv").write_text(text)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"{key}: {key}.csv\n")
    work = tmp_path / "work"
    with pytest.raises(InputError, match=message):
        build(load_pipeline(recipe), [tmp_path / "no-movie.mp4"], work, tmp_path / "shards")
    assert list(work.iterdir()) == []  # the build held the work directory (its lock is gone with it); no stage ran


def test_build_stops_at_the_sample_then_labels_trains_and_shards(films, tmp_path):
    work, recipe, movies = films
    args = ["build", str(recipe), *movies, "-w", str(work.root), "-o", str(tmp_path / "shards")]
    stopped = CliRunner().invoke(main, args)
    assert stopped.exit_code == 3, stopped.output
    todo = work.root / "sample" / "to_label.csv"
    assert f"--labels {todo}" in stopped.output and "label` column" in stopped.output
    assert not (tmp_path / "shards").exists()
    sample = pd.read_csv(todo)
    kept = manifest(work).query("kept")
    assert set(sample.movie_id) == set(kept.movie_id) and len(sample) == pytest.approx(len(kept) / 2, abs=1)

    sample["label"] = "during_ww2/usa/military"
    sample.to_csv(tmp_path / "labels.csv", index=False)
    todo.write_text("someone is labelling this")  # a rerun without labels must not overwrite it
    assert CliRunner().invoke(main, args).exit_code == 3 and todo.read_text() == "someone is labelling this"

    done = CliRunner().invoke(main, [*args, "--labels", str(tmp_path / "labels.csv")])
    assert done.exit_code == 0, done.output
    first = {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir()}
    samples = [s for name in sorted(first) if name.endswith(".tar")
               for s in wds.WebDataset(str(tmp_path / "shards" / name), shardshuffle=False).decode()]
    assert sorted(s["__key__"] for s in samples) == sorted(kept.frame_id)
    sources = {s["json"]["label_source"] for s in samples}
    assert sources == {"human", "model"} and all(s["cls"] == s["json"]["label_id"] for s in samples)

    # Built again: nothing changed, so the labeler is not trained again and the shards are the same.
    checkpoint = default_checkpoint(work)
    trained_at = checkpoint.stat().st_mtime_ns
    again = CliRunner().invoke(main, [*args, "--labels", str(tmp_path / "labels.csv")])
    assert again.exit_code == 0, again.output
    assert checkpoint.stat().st_mtime_ns == trained_at
    assert {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir()} == first


def test_labels_none_shards_without_labels_with_what_movie_metadata_says(films, tmp_path):
    work, recipe, movies = films
    (tmp_path / "movies.csv").write_text("movie,era,nationality\nZidane (1944).mp4,during_ww2,usa\n")
    pipeline = load_pipeline(recipe)
    result = build(pipeline, movies, work, tmp_path / "shards", labels="none", movies=str(tmp_path / "movies.csv"))
    assert result.needs_labels is None and not result.failures
    samples = [s for e in result.index["shards"]
               for s in wds.WebDataset(str(tmp_path / "shards" / e["name"]), shardshuffle=False).decode()]
    assert samples and all(s["cls"] == -1 and s["json"]["label"] is None for s in samples)
    known = {s["json"]["movie"].startswith("zidane"): (s["json"]["era"], s["json"]["nationality"],
                                                         s["json"]["label_source"]) for s in samples}
    assert known == {True: ("during_ww2", "usa", "movie"), False: (None, None, None)}
    assert not (work.root / "sample").exists()


@pytest.mark.slow
def test_a_build_killed_at_random_moments_resumes_to_the_same_shards(demo_run, tmp_path):
    """The demo's build, killed with SIGKILL (the whole process group: workers too) at seeded random
    moments and restarted each time, ends with shards byte-identical to the demo's own."""
    out, output, code = demo_run
    assert code == 0, output
    recipe = tmp_path / "demo.yaml"
    recipe.write_text((PIPELINES / "demo.yaml").read_text().replace("detector: yolo", "detector: opencv"))
    films = [str(out / "films" / name) for name in DEMO_FILMS]
    command = [sys.executable, "-m", "mhmd_builder.cli", "build", str(recipe), *films, "-w", str(tmp_path / "work"),
               "-o", str(tmp_path / "shards"), "--labels", str(out / "labels.csv"), "--workers", "2"]
    env = {**os.environ, **OFFLINE_ENV, "MHMD_WEIGHTS_DIR": str(out.parent / "no-weights")}  # as the demo ran
    rng = np.random.default_rng(7)
    kills = 0
    for delay in rng.uniform(2, 8, size=4):  # a build from scratch takes longer: the first kills land mid-build
        run = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
        try:
            run.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
            kills += 1
        time.sleep(0.1)
    assert kills >= 2  # the kills really interrupted builds
    final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stdout + final.stderr
    expected = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    assert {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir()} == expected


def test_a_build_on_ray_gives_the_same_manifest_and_shards_as_the_local_runner(demo_run, ray_cluster, tmp_path,
                                                                                 monkeypatch):
    """`mhmd build --runner ray` of the demo's films (a local Ray instance on 2 CPUs: every stage runs
    in actors) ends with the manifest and byte-identical shards of the demo's local build."""
    out, output, code = demo_run
    assert code == 0, output
    recipe = tmp_path / "demo.yaml"
    recipe.write_text((PIPELINES / "demo.yaml").read_text().replace("detector: yolo", "detector: opencv"))
    monkeypatch.setenv("MHMD_WEIGHTS_DIR", str(out.parent / "no-weights"))
    films = [str(out / "films" / name) for name in DEMO_FILMS]
    result = CliRunner().invoke(main, ["build", str(recipe), *films, "-w", str(tmp_path / "work"), "-o",
                                       str(tmp_path / "shards"), "--labels", str(out / "labels.csv"),
                                       "--workers", "2", "--runner", "ray"])
    assert result.exit_code == 0, result.output
    columns = ["frame_id", "kept", "reject_reason", "persons", "label"]
    local, ray = (manifest(WorkDir(w))[columns].sort_values("frame_id", ignore_index=True)
                  for w in (out / "work", tmp_path / "work"))
    pd.testing.assert_frame_equal(ray, local)
    assert local.label.notna().any()
    expected = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    assert {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir()} == expected
