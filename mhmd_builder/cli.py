"""The `mhmd` command: thin click wrappers over the plain Python functions of each stage."""
from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dataclasses import fields

import click

from . import __version__, logs
from .devices import machine_cores
from .errors import InputError, MhmdError, storage_error
from .quality import QualityThresholds, with_overrides
from .ranges import choice_type, option_type
from .runners import make_runner
from .shards import INDEX, format_index, require_index
from .workdir import WorkDir

if TYPE_CHECKING:  # extract (cv2, numpy) is imported by its command: `mhmd status` need not pay for it
    from .extract import MovieOutcome

log = logging.getLogger("mhmd_builder.cli")  # not __name__, which is __main__ under `python -m`
COMMAND_LINE = "mhmd.command_line"  # ctx.meta key: the arguments `mhmd` was given, for the log


class NoWorkDir(click.ClickException):
    """A command that reads a work directory was given one that does not exist (a typo, most often)."""

    exit_code = 2


def _logged(ctx: click.Context, workdir: str | None) -> str | None:
    """Start the work directory's log (W/mhmd.log) for this command."""
    if workdir is not None:
        logs.log_to(Path(workdir), shlex.join(["mhmd", *ctx.meta.get(COMMAND_LINE, [])]))
    return workdir


def _existing_workdir(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not Path(value).is_dir():
        raise NoWorkDir(f"{value}: no such work directory")
    return _logged(ctx, value)


def _new_workdir(ctx: click.Context, param: click.Parameter, value: str) -> str:
    return _logged(ctx, value)


WORKDIR_HELP = "Work directory that holds every stage's records (and their log, mhmd.log)."
workdir_option = click.option("-w", "--workdir", required=True, type=click.Path(file_okay=False),
                              callback=_existing_workdir, help=WORKDIR_HELP)
new_workdir_option = click.option("-w", "--workdir", required=True, type=click.Path(file_okay=False),
                                  callback=_new_workdir, help=f"{WORKDIR_HELP} Created if needed.")


def say(text: str) -> None:
    """A result: printed on stdout, and each of its lines added to the work directory's log."""
    click.echo(text)
    for line in text.splitlines():
        log.info(line, extra=logs.FILE_ONLY)


def _needs_ray(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value and ctx.params.get("runner") != "ray":  # --runner is eager: already parsed
        raise click.BadParameter("goes with --runner ray", ctx, param)
    return value


def runner_options(func):
    """--runner and --ray-address, for the commands whose stage runs partitions."""
    func = click.option("--ray-address", metavar="ADDRESS", default=None, callback=_needs_ray,
                        help="The Ray cluster to join (ray://HOST:10001, HOST:6379, auto) [default: RAY_ADDRESS, "
                             "a cluster `ray start`ed here, else a new local Ray instance].")(func)
    return click.option("--runner", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                        is_eager=True, help="local: processes on this machine; ray: actors on a Ray cluster "
                        "(WORKDIR on storage every node sees).")(func)


def quality_options(func):
    """One option per quality threshold (QualityThresholds' fields); an option not given is None."""
    for f in reversed(fields(QualityThresholds)):
        func = click.option(f"--{f.name.replace('_', '-')}", f.name, type=type(f.default), default=None,
                            help=f"{f.metadata['help']} [default: {f.default:g}]")(func)
    return func


class MhmdGroup(click.Group):
    """Every expected error (an MhmdError, or a full, read-only or forbidden file system) ends the
    command with its one-line message and exit status 1; Ctrl-C with one line and 130 (what was
    committed stays, so the same command resumes); anything else is a bug and keeps its traceback.
    However it ends, the work directory's log gets its exit status (and its error)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[COMMAND_LINE] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            result = self._invoke(ctx)
        except BaseException as error:
            logs.finish(*_ending(error))
            raise
        logs.finish(0)
        return result

    def _invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            log.error("interrupted: rerun the same command to resume")
            ctx.exit(130)
        except MhmdError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            if (error := storage_error(e)) is None:
                raise
            raise click.ClickException(str(error)) from None


def _ending(error: BaseException) -> tuple[int, str | None]:
    """The exit status an exception ends the command with, and the error message to log."""
    if isinstance(error, click.exceptions.Exit):
        return error.exit_code, None
    if isinstance(error, click.ClickException):
        return error.exit_code, error.format_message()
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) else 1, None
    return 1, f"{type(error).__name__}: {error}"  # a bug: its traceback follows on stderr


@click.group(cls=MhmdGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mhmd")
@click.option("-v", "--verbose", is_flag=True, help="Also debug detail on stderr (e.g. each partition's time).")
@click.option("-q", "--quiet", is_flag=True, help="No notices or progress on stderr, only errors.")
def main(verbose: bool, quiet: bool) -> None:
    """Build MHMD colorization training data from movie files, stage by stage. Results go to stdout,
    notices and progress to stderr; commands on a work directory append to WORKDIR/mhmd.log."""
    if verbose and quiet:
        raise click.UsageError("-v and -q exclude each other")
    logs.show_notices(logging.DEBUG if verbose else logging.ERROR if quiet else logging.INFO)


def status_text(workdir: WorkDir, report: dict | None = None) -> str:
    # manifest (pandas) is imported on use: it costs a second, which `mhmd extract` need not pay.
    from .manifest import format_status, status

    return format_status(report if report is not None else status(workdir))


def report_partitions(workdir: WorkDir, results: list, describe) -> None:
    """A line per partition (`describe(summary)` when it went well), the funnel, exit 1 on failures."""
    for r in results:
        say(f"FAILED   {r.id}: {r.reason}" if not r.ok else f"ok       {r.id}: {describe(r.summary)}")
    say(status_text(workdir))
    if any(not r.ok for r in results):
        sys.exit(1)


def format_outcomes(outcomes: list[MovieOutcome]) -> str:
    lines = []
    for o in outcomes:
        s = o.summary
        if o.status == "failed":
            lines.append(f"FAILED   {o.path}: {o.reason}")
        elif o.status == "copy":
            lines.append(f"same     {o.path}: {o.reason} (not extracted again)")
        else:
            when = "" if o.status == "done" else " (done earlier)"
            lines.append(f"ok       {o.movie_id}: {s.get('frames_out', 0)}/{s.get('frames_in', 0)} frames kept{when}")
            lines += [f"         warning: {w}" for w in s.get("warnings", [])]
    failed, copies = (sum(o.status == status for o in outcomes) for status in ("failed", "copy"))
    frames_in = sum(o.summary.get("frames_in", 0) for o in outcomes if o.status != "failed")
    frames_out = sum(o.summary.get("frames_out", 0) for o in outcomes if o.status != "failed")
    same = f", {copies} with the same footage as another file" if copies else ""
    lines.append(f"{len(outcomes) - failed - copies} movies extracted, {failed} failed{same}; "
                 f"{frames_out} of {frames_in} sampled frames kept")
    return "\n".join(lines)


@main.command("extract")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@new_workdir_option
@click.option("--fps", type=option_type("extract.sampling.fps"), default=1.0, show_default=True,
              help="Frames per second, uniform in time.")
@click.option("--keyframes", is_flag=True, help="Only key frames (the decoder skips the others: fast).")
@click.option("--scenes", is_flag=True, help="A few frames per shot (ffmpeg's scene score).")
@click.option("--scene-threshold", type=option_type("extract.sampling.scene_threshold"), default=0.3, show_default=True)
@click.option("--scene-max-gap", type=option_type("extract.sampling.scene_max_gap"), default=10.0, show_default=True,
              help="With --scenes, also one frame every this many seconds inside long shots.")
@click.option("--max-side", type=option_type("extract.max_side", int), default=640, show_default=True,
              help="Scale frames (inside ffmpeg) so that the longer side is at most this; 0 keeps the size.")
@click.option("--skip-head", type=option_type("extract.skip_head"), default=0.0, show_default=True,
              help="Seconds left out at the start (opening credits).")
@click.option("--skip-tail", type=option_type("extract.skip_tail"), default=0.0, show_default=True,
              help="Seconds left out at the end (closing credits).")
@click.option("--crop/--no-crop", default=True, show_default=True, help="Detect and crop letterbox bars.")
@click.option("--jpeg-quality", type=option_type("extract.jpeg_quality", int), default=95, show_default=True)
@click.option("--decoder", type=choice_type("extract.decoder"), default="auto", show_default=True,
              help="Where ffmpeg decodes: cuda (NVIDIA NVDEC; a film it cannot decode fails), cpu, or auto "
                   "(cuda when ffmpeg can use a GPU here, a film it cannot decode decoded again on the CPU).")
@click.option("--chunk-seconds", type=option_type("extract.chunk_seconds"), default=None,
              help="Record each film in chunks of about this many seconds: a killed run loses one chunk at most, "
                   "and one film's chunks run on several workers when films are fewer than workers. The frames "
                   "are those of an undivided decode. 0: whole films. [default: 60; whole films with --scenes, "
                   "which cannot be cut]")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help=f"Movies decoded at once [default: the machine's cores, {machine_cores()}; "
                   "with --runner ray, what the cluster's CPUs hold].")
@click.option("--redo", is_flag=True, help="Extract again movies already done (e.g. with new thresholds).")
@runner_options
@quality_options
def extract_command(inputs, workdir, fps, keyframes, scenes, scene_threshold, scene_max_gap, max_side,
                    skip_head, skip_tail, crop, jpeg_quality, decoder, chunk_seconds, workers, redo, runner,
                    ray_address, **thresholds) -> None:
    """Extract frames from movies (files or folders) into WORKDIR, resumably."""
    from .extract import SCENES_IN_CHUNKS, ExtractSettings, extract
    from .media import Sampling

    if keyframes and scenes:
        raise click.UsageError("--keyframes and --scenes exclude each other")
    mode = "keyframes" if keyframes else "scenes" if scenes else "fps"
    settings = ExtractSettings(
        sampling=Sampling(mode, fps, scene_threshold, scene_max_gap), max_side=max_side or None,
        skip_head=skip_head, skip_tail=skip_tail, crop_letterbox=crop, jpeg_quality=jpeg_quality,
        decoder=decoder, quality=with_overrides(QualityThresholds(), thresholds),
        **({} if chunk_seconds is None else {"chunk_seconds": chunk_seconds}))
    if scenes and chunk_seconds:  # asked for, not the default (which scene cuts leave aside)
        raise InputError(SCENES_IN_CHUNKS)
    outcomes = extract(list(inputs), WorkDir(workdir), settings, make_runner(runner, workers, ray_address), redo)
    say(format_outcomes(outcomes))
    if any(o.status == "failed" for o in outcomes):
        sys.exit(1)


@main.command("filter")
@workdir_option
@quality_options
def filter_command(workdir, **given) -> None:
    """Re-apply quality thresholds to the recorded scores, without decoding anything. Thresholds
    not given keep the values the current decisions were made with."""
    from .filter import format_refilter, recorded_thresholds, refilter

    work = WorkDir(workdir)
    summary = refilter(work, with_overrides(recorded_thresholds(work), given))
    say(format_refilter(summary))


@main.command("detect")
@workdir_option
@click.option("--detector", type=choice_type("detect.detector"), default="yolo", show_default=True,
              help="opencv: OpenCV 4's own HOG and Haar detectors, for machines without YOLO weights.")
@click.option("--model", default="yolo11n.pt", show_default=True,
              help="A YOLO model name (downloaded, SHA-256 checked), a .yaml config, or a path.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Local weights file (offline use); overrides --model.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch", type=option_type("detect.batch", int), default=32, show_default=True)
@click.option("--imgsz", type=option_type("detect.imgsz", int), default=640, show_default=True)
@click.option("--conf", type=option_type("detect.conf"), default=0.25, show_default=True)
@click.option("--iou", type=option_type("detect.iou"), default=0.7, show_default=True)
@click.option("--min-persons", type=option_type("detect.min_persons", int), default=1, show_default=True)
@click.option("--max-persons", type=option_type("detect.max_persons", int), default=5, show_default=True)
@click.option("--min-person-area", type=option_type("detect.min_person_area"), default=0.02, show_default=True,
              help="Fraction of the frame the largest person must cover.")
@click.option("--masks", is_flag=True, help="Write a person mask PNG per kept frame (segmentation model).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Movies at once, each worker with its own model [default: 1; with --runner ray, "
                   "what the cluster's CPUs (or GPUs, on CUDA) hold].")
@runner_options
def detect_command(workdir, detector, model, weights, device, batch, imgsz, conf, iou, min_persons, max_persons,
                   min_person_area, masks, workers, runner, ray_address) -> None:
    """Detect persons in the frames that passed quality; keep frames with a few, large enough persons."""
    from .detect import DetectSettings, detect

    settings = DetectSettings(detector=detector, model=weights or model, device=device, batch=batch, imgsz=imgsz,
                              conf=conf, iou=iou, min_persons=min_persons, max_persons=max_persons,
                              min_person_area=min_person_area, masks=masks)
    wd = WorkDir(workdir)
    results = detect(wd, settings, make_runner(runner, workers, ray_address))
    report_partitions(wd, results, lambda s: f"{s['frames_out']}/{s['frames_in']} frames kept")


taxonomy_option = click.option("--taxonomy", type=click.Path(exists=True, dir_okay=False), default=None,
                               help="Taxonomy CSV [default: the shipped MHMD labels].")
movies_option = click.option("--movies", type=click.Path(exists=True, dir_okay=False), default=None,
                             help="Movie metadata CSV (movie, era, nationality): frames inherit what is known.")

LABEL_STUDIO_HOWTO = """Label Studio: start it with
  LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={root}
create a project with the labeling config {config}, add a "Local files" source storage with the
absolute path {root}/frames (do not sync it), import {tasks}, label, and export JSON (or JSON-MIN, CSV)
for `mhmd labels import`."""


def label_context(work: WorkDir, taxonomy: str | None, movies: str | None):
    """The taxonomy and the movie metadata (or None), their problems as click errors."""
    from .labels import load_movie_metadata
    from .taxonomy import load_taxonomy

    labels = load_taxonomy(taxonomy)
    return labels, load_movie_metadata(movies, work, labels) if movies else None


@main.command("sample")
@workdir_option
@click.option("--fraction", type=option_type("sample.fraction"), default=0.01, show_default=True,
              help="Share of each film's frames that passed detection (at least one per film).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="TODO file: a CSV, or the tasks JSON for label-studio (its labeling config goes beside it, .xml).")
@click.option("--format", "fmt", type=click.Choice(["csv", "label-studio"]), default="csv", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--uncertain", type=click.IntRange(min=1), default=None,
              help="Instead of a sample: the N model-labelled frames the labeler is least sure of.")
@movies_option
@taxonomy_option
def sample_command(workdir, fraction, output, fmt, seed, uncertain, movies, taxonomy) -> None:
    """Pick frames for people to label, spread over films and time; never frames labelled already."""
    from .sample import sample_frames, uncertain_frames, write_sample

    work = WorkDir(workdir)
    labels, metadata = label_context(work, taxonomy, movies)
    frames = (uncertain_frames(work, uncertain, metadata) if uncertain
              else sample_frames(work, fraction, seed, movie_metadata=metadata))
    written = write_sample(frames, output, fmt, labels)
    say(f"{len(frames)} frames of {frames.movie_id.nunique()} movies: {', '.join(map(str, written))}")
    if fmt == "label-studio":
        say(LABEL_STUDIO_HOWTO.format(root=work.root, tasks=written[0], config=written[1]))


@main.group("labels")
def labels_group() -> None:
    """Human labels: import what people labelled."""


@labels_group.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@workdir_option
@movies_option
@taxonomy_option
def labels_import_command(file, workdir, movies, taxonomy) -> None:
    """Check FILE (a CSV, or a Label Studio JSON, JSON-MIN or CSV export) and merge it into the human
    labels; on any problem, list them all and write nothing."""
    from .labels import import_labels

    work = WorkDir(workdir)
    labels, metadata = label_context(work, taxonomy, movies)
    s = import_labels(work, file, labels, metadata)
    say(f"{s['labelled']} labels in {file}: {s['new']} new, {s['changed']} changed, {s['unchanged']} "
               f"unchanged; {s['unlabelled']} not labelled yet; {s['total']} human labels in all")


@main.group("labeler")
def labeler_group() -> None:
    """The ResNet labeler: train on the human labels, label every other kept frame."""


@labeler_group.command("train")
@workdir_option
@click.option("--labels", "labels_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Human labels (CSV, or a Label Studio JSON, JSON-MIN or CSV export), imported before training.")
@taxonomy_option
@movies_option
@click.option("--arch", type=choice_type("labeler.arch"), default="resnet50", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint (.safetensors) [default: WORKDIR/label/labeler.safetensors].")
@click.option("--weights", default="imagenet", show_default=True,
              help="imagenet (torchvision's download, SHA-256 checked), none (random), or a local .pth.")
@click.option("--epochs", type=option_type("labeler.epochs", int), default=10, show_default=True)
@click.option("--batch-size", type=option_type("labeler.batch_size", int), default=32, show_default=True)
@click.option("--image-size", type=option_type("labeler.image_size", int), default=224, show_default=True)
@click.option("--split", type=choice_type("labeler.split"), default="films", show_default=True,
              help="Validation frames: films held out whole (a class in one film only: its latest frames), "
                   "or random frames (the paper's way; near-duplicates flatter it).")
@click.option("--val-fraction", type=option_type("labeler.val_fraction", float), default=0.2, show_default=True,
              help="Share of the human labels that validates.")
@click.option("--input", "input_", type=choice_type("labeler.input"), default="persons",
              show_default=True, help="What the labeler sees: the whole frame, or the box around the persons "
              "detect found (the whole frame where it found none); predict and relabel cut frames the same way.")
@click.option("--pseudo-label-rounds", type=option_type("labeler.pseudo_label_rounds", int), default=0,
              show_default=True, help="Self-training: train again N times on the human labels plus the unlabelled "
              "kept frames the last round was surest of (never of a validating film); for few labels.")
@click.option("--pseudo-label-per-class", type=option_type("labeler.pseudo_label_per_class", int), default=10,
              show_default=True, help="At most this many pseudo-labelled frames per label and round.")
@click.option("--pseudo-label-confidence", type=option_type("labeler.pseudo_label_confidence", float),
              default=0.9, show_default=True, help="The least confidence a pseudo label needs.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True)
def labeler_train_command(workdir, labels_file, taxonomy, movies, arch, output, weights, epochs, batch_size,
                          image_size, split, val_fraction, input_, pseudo_label_rounds, pseudo_label_per_class,
                          pseudo_label_confidence, device, seed) -> None:
    """Import --labels, train the labeler on every human label, print and save its validation metrics."""
    from .labeler_train import TrainSettings, train
    from .labels import import_labels

    wd = WorkDir(workdir)
    tax, metadata = label_context(wd, taxonomy, movies)
    settings = TrainSettings(arch=arch, output=output, weights=weights, epochs=epochs, batch_size=batch_size,
                             image_size=image_size, split=split, val_fraction=val_fraction, input=input_,
                             pseudo_label_rounds=pseudo_label_rounds, pseudo_label_per_class=pseudo_label_per_class,
                             pseudo_label_confidence=pseudo_label_confidence, device=device, seed=seed)
    imported = import_labels(wd, labels_file, tax, metadata)
    say(f"imported {imported['labelled']} labels ({imported['new']} new) from {labels_file}")
    train(wd, settings, tax)


@labeler_group.command("predict")
@workdir_option
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A labeler checkpoint (.safetensors, with its .json beside it).")
@taxonomy_option
@movies_option
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=option_type("predict.batch_size", int), default=64, show_default=True)
@runner_options
def labeler_predict_command(workdir, checkpoint, taxonomy, movies, device, batch_size, runner, ray_address) -> None:
    """Label every kept frame (label, confidence, top 3); human labels stay as they are."""
    from .label import PredictSettings, predict

    wd = WorkDir(workdir)
    tax, metadata = label_context(wd, taxonomy, movies)
    results = predict(wd, checkpoint, PredictSettings(device=device, batch_size=batch_size), tax, metadata,
                      make_runner(runner, None, ray_address))
    report_partitions(wd, results, lambda s: f"{s['model']} labeled by the model, {s['human']} by people")


@main.command("shard")
@workdir_option
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="SHARDDIR, or s3://bucket/prefix (rewritten whole).")
@click.option("--maxcount", type=option_type("shard.maxcount", int), default=1000, show_default=True, help="Samples per tar.")
@click.option("--maxsize", type=option_type("shard.maxsize", int), default=1 << 30, show_default=True, help="Bytes per tar.")
@click.option("--test-fraction", type=option_type("shard.test_fraction"), default=100_001 / 1_353_166,
              show_default="the paper's 0.0739", help="Share of frames in the test split; whole films.")
@click.option("--seed", type=int, default=0, show_default=True)
@taxonomy_option
@movies_option
@runner_options
def shard_command(workdir, output, maxcount, maxsize, test_fraction, seed, taxonomy, movies, runner,
                  ray_address) -> None:
    """Write the kept frames as WebDataset shards, split by film, deterministically. Unlabelled
    frames of films in --movies carry their film's era and nationality."""
    from .shard import ShardSettings, shard

    work = WorkDir(workdir)
    tax, metadata = label_context(work, taxonomy, movies)
    index = shard(work, output, ShardSettings(maxcount, maxsize, test_fraction, seed), tax,
                  make_runner(runner, None, ray_address), movie_metadata=metadata)
    say(format_index(index, output))


@main.command("relabel")
@click.argument("shard_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A labeler checkpoint (.safetensors, with its .json beside it).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="NEWDIR (rewritten whole).")
@click.option("--override-human", is_flag=True, help="Replace human labels too (kept by default).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@taxonomy_option
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Tars relabelled at once, each worker with its own model [default: 1 here; on Ray, what "
                   "the cluster holds].")
@runner_options
def relabel_command(shard_dir, checkpoint, output, override_human, device, batch_size, taxonomy, workers, runner,
                    ray_address) -> None:
    """Write SHARD_DIR's shards again with the checkpoint's labels: same images byte for byte, new
    json and cls; print how many labels changed, per label."""
    from .relabel import RelabelSettings, format_changes, relabel
    from .taxonomy import load_taxonomy

    index = relabel(shard_dir, checkpoint, output, RelabelSettings(device, batch_size, override_human),
                    load_taxonomy(taxonomy), make_runner(runner, workers, ray_address))
    say(format_changes(index["relabel"]["changes"]))
    say(f"index: {Path(output) / INDEX}")


@main.group("parsing")
def parsing_group() -> None:
    """Human parsing maps made by an external parser."""


@parsing_group.command("attach")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@workdir_option
def parsing_attach_command(folder, workdir) -> None:
    """Attach FOLDER/<frame_id>.png parsing maps (checked: ids, sizes; all or nothing)."""
    from .parsing import attach_parsing

    count = attach_parsing(WorkDir(workdir), folder)
    say(f"attached {count} parsing maps")


@main.command("report")
@click.argument("shard_dir", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("-w", "--workdir", type=click.Path(file_okay=False), default=None, callback=_existing_workdir,
              help="Work directory: the whole funnel (or give SHARD_DIR, a folder with index.json).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="report.html")
@click.option("--recipe", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The recipe the dataset was built with, shown with the settings.")
@taxonomy_option
def report_command(shard_dir, workdir, output, recipe, taxonomy) -> None:
    """One HTML page about a dataset that works offline: from WORKDIR the funnel, the labels as the
    paper's Table 1, the hue histogram, thumbnails, the labeler's metrics and the settings; from
    SHARD_DIR what its index.json and shards hold."""
    from .report import write_report
    from .taxonomy import load_taxonomy

    if (shard_dir is None) == (workdir is None):
        raise click.UsageError("give either -w WORKDIR or SHARD_DIR")
    if shard_dir:
        require_index(shard_dir)
    try:
        path = write_report(shard_dir or workdir, output, load_taxonomy(taxonomy), recipe)
    except OSError as e:
        raise click.ClickException(str(e)) from None
    say(f"report: {path}")


@main.group("historynet")
def historynet_group() -> None:
    """HistoryNet, the bundled colorization model: train, evaluate, colorize."""


HISTORYNET_VARIANTS = {(False, False): "historynet", (True, False): "no_parsing", (False, True): "no_classifier",
                       (True, True): "chromagan"}  # (--no-parsing, --no-classifier) -> model.VARIANTS


@historynet_group.command("train")
@click.option("--shards", required=True,
              help="Train shards: a folder (its train-*.tar), a brace pattern or a glob.")
@click.option("-o", "--output", "rundir", required=True, type=click.Path(file_okay=False),
              help="Run folder: checkpoints/, last.safetensors, tensorboard/, train.log.jsonl.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs [default: 8, the paper's].")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Stop after this many steps instead.")
@click.option("--epoch-samples", type=click.IntRange(min=1), default=None,
              help="Samples an epoch [default: the shards' count in their index.json].")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Per GPU.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-5, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--no-parsing", is_flag=True, help="Ablation: without the parsing branch (G3).")
@click.option("--no-classifier", is_flag=True, help="Ablation: without the info classifier (D2).")
@click.option("--preset", type=click.Choice(["recommended", "paper", "official", "l2"]), default="recommended",
              show_default=True,
              help="Loss weights, info term and warm-up: the paper's eq. 1, the official code's, L2(ab) alone (a "
                   "baseline), or recommended (not the paper's: the critics' weights lowered, the softmax info term "
                   "and a 200-step warm-up, which beat grey and match L2 alone where the paper's did not).")
@click.option("--info-term", type=click.Choice(["official", "softmax"]), default=None,
              help="How D2's recovery of G2's z is scored: the official code's KL on raw vectors clipped to "
                   "[1e-7, 1], or the KL between their softmax distributions (not the paper's) [default: the "
                   "preset's: softmax for recommended, else official].")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None,
              help="G's first steps with its supervised terms only, before the critics' terms join (not the "
                   "paper's; D1 and D2 train all along) [default: the preset's: 200 for recommended, else 0].")
@click.option("--critic-weight", type=click.FloatRange(min=0), default=None,
              help="G's weight on the critic's (D1's) term instead of the preset's (0.1; recommended 0.01).")
@click.option("--info-weight", type=click.FloatRange(min=0), default=None,
              help="G's weight on the info classifier's (D2's) term instead of the preset's (paper 0.003, official "
                   "0.002, recommended 0.0003).")
@click.option("--ema", type=click.FloatRange(min=0, max=1, max_open=True), default=0.0, show_default=True,
              help="Keep a moving average of G's weights with this decay (e.g. 0.999) for validation, evaluate and "
                   "colorize; 0: none, as the paper (not the paper's).")
@click.option("--vgg-weights", default="imagenet", show_default=True,
              help="G0's start: imagenet (torchvision's download), none (random), or a local vgg16 .pth.")
@click.option("--image-size", type=click.IntRange(min=32), default=224, show_default=True)
@click.option("--width", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True,
              help="The networks' channels as a fraction of the paper's (1): 0.25 trains ~16x fewer weights, "
                   "for CPU experiments; below 1 needs --vgg-weights none.")
@click.option("--workers", type=click.IntRange(min=0), default=4, show_default=True, help="Data loader processes.")
@click.option("--save-every", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Steps between checkpoints (one is also written at every epoch end).")
@click.option("--keep-checkpoints", type=click.IntRange(min=0), default=3, show_default=True,
              help="Step checkpoints kept besides those of epoch ends (newest first).")
@click.option("--log-every", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--val-shards", default=None,
              help="Shards for validation (L2(ab) beside grey's at every checkpoint, best.safetensors, the "
                   "TensorBoard image grid) [default: the test split beside --shards].")
@click.option("--val-samples", type=click.IntRange(min=0), default=64, show_default=True,
              help="Validation samples the L2(ab) at every checkpoint is measured on (0: none).")
@taxonomy_option
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in RUNDIR from its last.safetensors.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Autocast dtype of the training steps (fp16: CUDA only, with loss scaling) [default: fp32 with "
                   "--preset official (as the official code) and on the CPU; bf16 on CUDA, fp16 without bf16].")
def historynet_train_command(shards, rundir, epochs, steps, epoch_samples, batch_size, lr, device, no_parsing,
                             no_classifier, preset, info_term, warmup_steps, critic_weight, info_weight, ema,
                             vgg_weights, image_size, width, workers, save_every, keep_checkpoints, log_every,
                             val_shards, val_samples, taxonomy, seed, resume, precision) -> None:
    """Train HistoryNet (or one of its ablations) on shards; under torchrun, one process per GPU."""
    from .historynet.train import TrainSettings, train

    if epochs is not None and steps is not None:
        raise click.UsageError("give --epochs or --steps, not both")
    settings = TrainSettings(
        shards=shards, out=rundir, variant=HISTORYNET_VARIANTS[no_parsing, no_classifier], preset=preset,
        warmup_steps=warmup_steps, info_term=info_term, critic_weight=critic_weight,
        info_weight=info_weight, ema=ema,
        epochs=epochs or TrainSettings.epochs, steps=steps, epoch_samples=epoch_samples, batch_size=batch_size,
        lr=lr, image_size=image_size, width=width, device=device, workers=workers, seed=seed, save_every=save_every,
        keep_checkpoints=keep_checkpoints, log_every=log_every, vgg_weights=vgg_weights, val_shards=val_shards,
        val_samples=val_samples,
        taxonomy=taxonomy, resume=resume, precision=precision)
    result = train(settings)
    say(f"step {result['step']}, epoch {result['epoch']}: {result['images_per_second']:.1f} images/s; "
               f"checkpoint {result['last']}")


@historynet_group.command("evaluate")
@click.option("--shards", required=True,
              help="Test shards: a brace pattern (test-{000000..000009}.tar), a glob, or SHARDDIR "
                   "(its {split}-*.tar).")
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A HistoryNet checkpoint (.safetensors).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="Shard reading processes.")
@click.option("--lpips-backbone", type=click.Path(exists=True, dir_okay=False),
              help="A local copy of torchvision's alexnet-owt-7be5be79.pth, for LPIPS offline.")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate the first N samples only.")
@click.option("--split", default="test", show_default=True, help="The split read when --shards is a folder.")
@click.option("--protocol", type=click.Choice(["official", "rounded"]), default="official", show_default=True,
              help="official: ab truncated to 8 bits and a JPEG q95 round trip, as the paper's scripts; "
                   "rounded: ab rounded, no JPEG (the image colorize writes).")
def historynet_evaluate_command(shards, checkpoint, as_json, device, batch_size, workers, lpips_backbone, limit,
                                split, protocol) -> None:
    """The paper's protocol: ab predicted at the model's size, resized to each frame and joined with
    its own L; LPIPS, PSNR, SSIM and colourfulness, overall and per label, and the same for the grey
    baseline (the frame's own L, no colour) on the same frames."""
    from .historynet.evaluate import evaluate, format_evaluation

    result = evaluate(shards, checkpoint, device, batch_size, workers, lpips_backbone, limit, split,
                      protocol=protocol)
    click.echo(json.dumps(result, indent=1) if as_json else format_evaluation(result))


@historynet_group.command("colorize")
@click.argument("inputs", metavar="IMAGE_OR_DIR...", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A HistoryNet checkpoint (.safetensors).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="OUTDIR: one <stem>.png per image.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
def historynet_colorize_command(inputs, checkpoint, output, device, batch_size) -> None:
    """Colorize photos (files, or folders of jpg/jpeg/png/bmp/tif/tiff/webp) at their own size, keeping
    their L; exit 1 when some could not be read (the others are written)."""
    from .historynet.colorize import colorize

    result = colorize(inputs, checkpoint, output, device, batch_size)
    for failure in result.failures:
        click.echo(f"Error: {failure}", err=True)
    say(f"wrote {len(result.written)} colorized images to {output}")
    if result.failures:
        sys.exit(1)


@main.command("status")
@workdir_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status_command(workdir, as_json) -> None:
    """Per stage: partitions done / failed / pending, frames in and out."""
    from .manifest import status

    report = status(WorkDir(workdir))
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        say(status_text(WorkDir(workdir), report))


@main.group("manifest")
def manifest_group() -> None:
    """The one-row-per-frame manifest."""


@manifest_group.command("export")
@workdir_option
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="FILE.parquet")
def manifest_export_command(workdir, output) -> None:
    """Write every sampled frame, kept or not, with its scores and decisions."""
    from .manifest import export_manifest

    rows = export_manifest(WorkDir(workdir), output)
    say(f"wrote {rows} rows to {output}")


NEXT_STEP = """stopped: nobody has labelled frames yet. {what} in
  {todo}
Fill its `label` column with label names of the taxonomy ({taxonomy}), or label them in Label Studio
(`mhmd sample -w {workdir} --format label-studio ...`), then build again with the labels:
  mhmd build {pipeline} ... -w {workdir} -o {out} --labels {todo}
(or set `labels: none` in the recipe to shard without labels)"""


def report_build(result, workdir: WorkDir, pipeline, out: str) -> None:
    """What was done, the funnel, and what comes next; exit 1 on failures, 3 when labels are needed."""
    say(format_outcomes(result.outcomes))
    say(status_text(workdir))
    if result.needs_labels:
        what = (f"{result.sample[0]} frames of {result.sample[1]} films to label are" if result.sample
                else "The sample to label (written by an earlier build) is")
        say(NEXT_STEP.format(what=what, todo=result.needs_labels,
                                    taxonomy=pipeline.taxonomy or "the 42 MHMD labels", workdir=workdir.root,
                                    pipeline=pipeline.source, out=out))
    else:
        say(format_index(result.index, out))
    for failure in result.failures:
        say(f"FAILED   {failure}")
    if result.failures:
        sys.exit(1)
    if result.needs_labels:
        sys.exit(3)


@main.command("build")
@click.argument("pipeline", type=click.Path())
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@new_workdir_option
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="SHARDDIR (rewritten whole).")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Human labels (CSV or Label Studio JSON export) [default: the recipe's `labels`].")
@movies_option
@runner_options
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help=f"Partitions at once in every stage [default: each stage's own: one per core "
                   f"({machine_cores()}) for extract and shard, one for the stages that hold a model; "
                   "with --runner ray, what the cluster holds].")
def build_command(pipeline, inputs, workdir, output, labels, movies, runner, ray_address, workers) -> None:
    """Run every stage of the recipe PIPELINE (a YAML file, or a shipped one by name: mhmd.yaml,
    demo.yaml) on the movies: extract, detect, label (stops after writing the sample to label when
    there are no labels yet: exit code 3), shard. Resumes where a killed run stopped."""
    from .build import build, load_pipeline

    work = WorkDir(workdir)
    recipe = load_pipeline(pipeline)
    result = build(recipe, list(inputs), work, output, runner, workers, labels, movies, ray_address)
    report_build(result, work, recipe, output)


def _demo_logged(ctx: click.Context, param: click.Parameter, value: str) -> str:
    _logged(ctx, str(Path(value) / "work"))
    return value


@main.command("demo")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), callback=_demo_logged,
              help="OUTDIR (its work directory's log: OUTDIR/work/mhmd.log)")
@click.option("--workers", type=click.IntRange(min=1), default=None)
def demo_command(output, workers) -> None:
    """Make short films with ffmpeg and build a dataset from them with pipelines/demo.yaml:
    OUTDIR/films, OUTDIR/work, OUTDIR/labels.csv (the demo's own labels), OUTDIR/shards."""
    from .build import PIPELINES, load_pipeline
    from .demo import run_demo

    result = run_demo(Path(output), workers)
    report_build(result, WorkDir(Path(output) / "work"), load_pipeline(PIPELINES / "demo.yaml"),
                 str(Path(output) / "shards"))
    say(f"work directory: {Path(output) / 'work'}")
    say(f"report: {Path(output) / 'report.html'}")


if __name__ == "__main__":
    main()
