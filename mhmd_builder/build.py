"""`mhmd build`: every stage in order with a recipe's settings, resumable after a kill at any moment.

A recipe (pipelines/*.yaml) holds one section per stage whose keys are the fields of that stage's
settings (ExtractSettings, DetectSettings, TrainSettings, PredictSettings, ShardSettings; nested
ones as nested maps), plus `sample` (fraction, seed) and the files `labels`, `movies`, `taxonomy`
(relative to the recipe). Every stage resumes from the work directory's records: extract, detect and
predict redo only unfinished films, the labeler is trained again only when its labels or settings
changed, and the shards are rewritten whole (each tar atomically, the index last). The same inputs
and recipe therefore give byte-identical shards, interrupted or not.

Labels: without a labels file (and without `labels: none`) the build stops after writing the sample
people should label, and says what to do next; with `labels: none` it shards without labels, the
frames of films with movie metadata carrying their film's era and nationality.
"""
from __future__ import annotations

import dataclasses
import reprlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from . import shipped
from .detect import DetectSettings, detect
from .errors import InputError
from .extract import ExtractSettings, MovieOutcome, extract
from .label import PredictSettings, predict
from .labeler_train import TrainSettings, checkpoint_is_current, train
from .labels import check_label_file, check_movie_metadata, import_labels, load_movie_metadata
from .ranges import RANGES, Range, choice_problem
from .runners import make_runner
from .sample import sample_frames, write_sample
from .shard import ShardSettings, shard
from .tables import SAMPLE, read_human_labels
from .taxonomy import load_taxonomy
from .workdir import WorkDir, writes

PIPELINES = shipped("pipelines")
NO_LABELS = "none"  # `labels: none`: shard without labelling


MAX_RECIPE_BYTES = 1 << 20
MAX_ALIASES = 8  # a few `*name` reuses; nested ones multiply (the "billion laughs"), so no more


class PipelineError(InputError):
    """A recipe that cannot be used; the message names the file and the key."""


class _RecipeLoader(yaml.SafeLoader):
    """yaml's safe loader that refuses a recipe with more than MAX_ALIASES aliases."""

    aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise yaml.MarkedYAMLError(problem=f"more than {MAX_ALIASES} aliases (*name)",
                                           problem_mark=self.peek_event().start_mark)
        return super().compose_node(parent, index)


def _read_yaml(path: Path):
    try:
        with open(path, "rb") as file:
            text = file.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise PipelineError(f"{path}: cannot read ({e.strerror})") from None
    if len(text) > MAX_RECIPE_BYTES:
        raise PipelineError(f"{path}: larger than {MAX_RECIPE_BYTES:,} bytes, too large for a recipe")
    try:
        return yaml.load(text, _RecipeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise PipelineError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or str(e).splitlines()[0]})") from None


@dataclass(frozen=True)
class SampleSettings:
    fraction: float = 0.01  # the paper labels 1% by hand
    seed: int = 0


@dataclass(frozen=True)
class Pipeline:
    source: str = "(defaults)"
    extract: ExtractSettings = field(default_factory=ExtractSettings)
    detect: DetectSettings = field(default_factory=DetectSettings)
    sample: SampleSettings = field(default_factory=SampleSettings)
    labeler: TrainSettings = field(default_factory=TrainSettings)
    predict: PredictSettings = field(default_factory=PredictSettings)
    shard: ShardSettings = field(default_factory=ShardSettings)
    labels: str | None = None  # a labels file, `none`, or None (stop after writing the sample)
    movies: str | None = None
    taxonomy: str | None = None


def _settings(cls, values, where: str, key: str = ""):
    """An instance of the settings dataclass `cls` from a YAML map (at the recipe key `key`);
    unknown keys and numbers outside their ranges.RANGES (or not finite) are errors."""
    if not isinstance(values, dict):
        raise PipelineError(f"{where}: expected a map of settings, not {reprlib.repr(values)}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(key) for key in values if key not in known)
    if unknown:
        raise PipelineError(f"{where}: unknown setting {reprlib.repr(unknown[0])} (known: {', '.join(known)})")
    defaults = cls()
    given = {}
    for name, value in values.items():
        default, where_key, name_key = getattr(defaults, name), f"{where}.{name}", f"{key}.{name}".lstrip(".")
        if value is None and "None" not in str(known[name].type):
            raise PipelineError(f"{where_key}: needs a value")
        if default is None and name_key in RANGES:  # a number that may be left out (None): checked as a float
            default = 0.0
        if value is None or default is None:
            pass
        elif dataclasses.is_dataclass(default):
            value = _settings(type(default), value or {}, where_key, name_key)
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise PipelineError(f"{where_key}: expected true or false, not {reprlib.repr(value)}")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or (
                    isinstance(default, int) and not float(value).is_integer()):
                raise PipelineError(f"{where_key}: expected {type(default).__name__}, not {reprlib.repr(value)}")
            value = type(default)(value)
            problem = RANGES.get(name_key, Range()).problem(value)
            if problem:
                raise PipelineError(f"{where_key}: {problem}")
        elif isinstance(default, str) and not isinstance(value, str):
            raise PipelineError(f"{where_key}: expected text, not {reprlib.repr(value)}")
        elif isinstance(default, str) and (problem := choice_problem(name_key, value)):
            raise PipelineError(f"{where_key}: {problem}")
        given[name] = value
    try:
        return replace(defaults, **given)
    except InputError as e:  # a rule between settings (e.g. min_persons <= max_persons)
        raise PipelineError(f"{where}: {e}") from None


def load_pipeline(path: str | Path) -> Pipeline:
    """Read and check a recipe; file paths in it are taken relative to the recipe's folder."""
    path = Path(path)
    if not path.is_file() and (PIPELINES / path.name).is_file() and path.parent == Path("."):
        path = PIPELINES / path.name  # `mhmd build demo.yaml`: a shipped recipe by name
    values = _read_yaml(path) or {}
    if not isinstance(values, dict):
        raise PipelineError(f"{path}: a recipe is a map of sections (extract:, detect:, ...), not a {type(values).__name__}")
    values = dict(values)
    for key in ("labels", "movies", "taxonomy"):
        value = values.get(key)
        if value is not None and value != NO_LABELS:
            values[key] = str((path.parent / str(value)).resolve())
    return _settings(Pipeline, {**values, "source": str(path)}, str(path))


@dataclass
class BuildResult:
    outcomes: list[MovieOutcome]
    failures: list[str]  # "stage partition: reason" of every partition that failed
    needs_labels: Path | None = None  # the sample for people to label, when the build stopped there
    sample: tuple[int, int] | None = None  # (frames, films) of that sample when this build wrote it
    index: dict | None = None  # the shard index, when shards were written


def _failures(stage: str, results) -> list[str]:
    return [f"{stage} {r.id}: {r.reason}" for r in results if not r.ok]


@writes("workdir")  # SHARDDIR is locked by shard(), when it is written: a build that stops for labels makes none
def build(pipeline: Pipeline, inputs: list[str | Path], workdir: WorkDir | str | Path, out: str | Path,
          runner: str = "local", workers: int | None = None, labels: str | None = None,
          movies: str | None = None, ray_address: str | None = None) -> BuildResult:
    """Run the recipe on the movies; `labels` / `movies` given here win over the recipe's.
    `runner`: "local" (processes here) or "ray" (actors on the Ray cluster at `ray_address`, by
    default a new local one); `workers`: partitions at once in every stage (by default each stage's
    own count: one per core, or one for a stage that holds a model; on Ray what its cluster holds)."""
    workdir = workdir if isinstance(workdir, WorkDir) else WorkDir(workdir)
    taxonomy = load_taxonomy(pipeline.taxonomy)
    movies, labels = movies or pipeline.movies, labels or pipeline.labels
    if movies:  # the input files' own problems are found before any stage runs
        check_movie_metadata(movies, taxonomy)
    if labels and labels != NO_LABELS:
        check_label_file(labels)
    runner = make_runner(runner, workers, ray_address)
    outcomes = extract(list(inputs), workdir, pipeline.extract, runner)
    failures = [f"extract {o.path}: {o.reason}" for o in outcomes if o.status == "failed"]
    failures += _failures("detect", detect(workdir, pipeline.detect, runner))
    metadata = load_movie_metadata(movies, workdir, taxonomy) if movies else None
    if labels and labels != NO_LABELS:
        import_labels(workdir, labels, taxonomy, metadata)
    if labels != NO_LABELS:
        if read_human_labels(workdir) is None:
            todo = workdir.stage_dir(SAMPLE) / "to_label.csv"
            if todo.exists():  # never overwrite a file someone may be labelling
                return BuildResult(outcomes, failures, needs_labels=todo)
            frames = sample_frames(workdir, pipeline.sample.fraction, pipeline.sample.seed, movie_metadata=metadata)
            write_sample(frames, todo, "csv", taxonomy)
            return BuildResult(outcomes, failures, needs_labels=todo, sample=(len(frames), frames.movie_id.nunique()))
        checkpoint = pipeline.labeler.checkpoint(workdir)
        if not checkpoint_is_current(workdir, pipeline.labeler, taxonomy):
            train(workdir, pipeline.labeler, taxonomy)
        failures += _failures("label", predict(workdir, checkpoint, pipeline.predict, taxonomy, metadata, runner))
    index = shard(workdir, out, pipeline.shard, taxonomy, runner, movie_metadata=metadata)
    return BuildResult(outcomes, failures, index=index)
