"""Stage 1: one pass over each movie. Decode once, sample, score quality on the decoded pixels,
encode a JPEG only for frames that pass, and record a row for every sampled frame."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import cv2
import pyarrow as pa
import xxhash

from .devices import pick_decoder
from .errors import InputError
from .media import (Crop, DecodeStats, MediaError, MovieInfo, Sampling, content_hash, cuda_decodes, decode_frames,
                    detect_letterbox, find_movies, movie_id, output_size, probe, require_ffmpeg, slug)
from .runners import LocalRunner
from .quality import FrameVerdict, QualityFilter, QualityThresholds
from .tables import EXTRACT, FRAME_SCHEMA
from .stages import Partition, PartitionError, Resources
from .workdir import WorkDir, writes

STAGE = EXTRACT
log = logging.getLogger(__name__)
# With --decoder cuda under Ray, each worker asks for this share of a GPU: a GPU decodes several
# films at once (NVDEC engines, no session limit on data-centre GPUs), each worker needing one core
# for its filters and JPEG encoding.
FILMS_PER_GPU = 8

@dataclass(frozen=True)
class ExtractSettings:
    sampling: Sampling = field(default_factory=Sampling)
    max_side: int | None = 640
    skip_head: float = 0.0
    skip_tail: float = 0.0
    crop_letterbox: bool = True
    jpeg_quality: int = 95
    quality: QualityThresholds = field(default_factory=QualityThresholds)
    # Where ffmpeg decodes: cpu, cuda (NVDEC; a film the GPU cannot decode fails) or auto (cuda when
    # ffmpeg can open a GPU, and a film the GPU cannot decode is decoded again on the CPU). Not a
    # setting a done movie must share (`_check_same_settings`): it changes where frames are
    # decoded, not which.
    decoder: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)


def frame_id(movie: str, timestamp: float) -> str:
    return f"{movie}_{round(timestamp * 1000)}"


def _time_window(duration: float | None, settings: ExtractSettings) -> tuple[float, float | None]:
    start = settings.skip_head
    end = duration - settings.skip_tail if duration is not None else None
    if end is not None and end <= start:
        raise PartitionError(f"--skip-head {settings.skip_head:g} and --skip-tail {settings.skip_tail:g} "
                             f"leave nothing of this {duration:.1f} s movie")
    return start, end


def _verdict_row(v: FrameVerdict, movie: str, size: tuple[int, int], jpeg: str | None, data: bytes | None) -> dict:
    """`data`: the bytes of the frame's JPEG, None when none was written."""
    return {"frame_id": v.meta["frame_id"], "movie_id": movie, "timestamp": v.meta["timestamp"],
            "width": size[0], "height": size[1], "kept": v.kept, "reject_reason": v.reason,
            "flags": list(v.flags), "jpeg": jpeg, "jpeg_bytes": None if data is None else len(data),
            "jpeg_xxh3": None if data is None else xxhash.xxh3_64_hexdigest(data), **v.scores}


def _rows_to_table(rows: list[dict]) -> pa.Table:
    fixed = {f.name: pa.array([r[f.name] for r in rows], f.type) for f in FRAME_SCHEMA}
    score_names = [k for k in rows[0] if k not in fixed] if rows else []
    scores = {k: pa.array([r.get(k) for r in rows], pa.float64()) for k in score_names}
    return pa.table({**fixed, **scores})


@dataclass
class ExtractStage:
    workdir: WorkDir
    settings: ExtractSettings = field(default_factory=ExtractSettings)
    name: str = STAGE
    resources: Resources = field(default_factory=Resources)  # a worker per core: decoding is per movie
    unit: str = "s"

    def __post_init__(self) -> None:
        if self.settings.decoder == "cuda":
            self.resources = Resources(gpus=1 / FILMS_PER_GPU)
        self.decoder = "cpu"  # as resolved in each worker's setup (a Ray actor may hold a GPU the driver lacks)

    def setup(self) -> None:
        cv2.setNumThreads(1)  # one worker per core already; ffmpeg does its own threading
        self.decoder = pick_decoder(self.settings.decoder)

    def process(self, partition: Partition, progress) -> dict:
        started = time.monotonic()
        path, movie = Path(partition.info["path"]), partition.id
        staging = self.workdir.begin(STAGE, movie) / "frames"
        staging.mkdir()
        final_frames = self.workdir.frames_dir(movie)
        shutil.rmtree(final_frames, ignore_errors=True)  # left by an attempt killed after its rename

        geometry = self._geometry(path)
        decoder, fallback, codec = self.decoder, None, geometry.info.codec
        if decoder == "cuda" and not cuda_decodes(codec):
            decoder, fallback = self._not_on_gpu(movie, f"NVDEC cannot decode {codec}")
        rows, stats = self._rows(path, movie, geometry, staging, progress, decoder)
        if decoder == "cuda" and stats.gpu_refused:  # ffmpeg decoded it on the CPU itself
            decoder, fallback = self._not_on_gpu(movie, f"NVDEC cannot decode this {codec} stream "
                                                        f"({geometry.info.pix_fmt})")
        elif decoder == "cuda" and not rows:
            decoder, fallback = self._not_on_gpu(movie, f"GPU decoding failed{_ffmpeg_detail(stats)}")
            rows, stats = self._rows(path, movie, geometry, staging, progress, decoder)
        if not rows:
            raise PartitionError(f"no frames decoded{_ffmpeg_detail(stats)}")

        final_frames.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, final_frames)
        summary = {**partition.info, "movie_id": movie, **geometry.summary(), "settings": self.settings.to_dict(),
                   "decoder": decoder, **_counts(rows), "warnings": _warnings(stats, geometry, fallback), "seconds": round(time.monotonic() - started, 3)}
        self.workdir.commit(STAGE, movie, _rows_to_table(rows), summary)
        progress(geometry.span, geometry.span)
        return summary

    def _geometry(self, path: Path) -> "MovieGeometry":
        """Probe the movie once and decide what is decoded: the time window, the letterbox crop, the size."""
        try:
            info = probe(path)
        except MediaError as e:
            raise PartitionError(str(e)) from None
        start, end = _time_window(info.duration, self.settings)
        crop = (detect_letterbox(path, info, start, end if end is not None else start)
                if self.settings.crop_letterbox else None)
        return MovieGeometry(info, start, end, crop, output_size(info, crop, self.settings.max_side),
                             output_size(info, crop, None))

    def _not_on_gpu(self, movie: str, reason: str) -> tuple[str, str]:
        """A film the GPU cannot decode: PartitionError with --decoder cuda, else ("cpu", reason) and a warning."""
        if self.settings.decoder == "cuda":
            raise PartitionError(f"{reason}: use --decoder cpu or auto")
        log.warning("%s: %s; the CPU decodes it", movie, reason)
        return "cpu", reason

    def _rows(self, path: Path, movie: str, geometry: "MovieGeometry", staging: Path, progress,
              decoder: str) -> tuple[list[dict], DecodeStats]:
        """Every sampled frame's row from one decoding pass with `decoder`, and how ffmpeg ended."""
        stats = DecodeStats()
        verdicts = self._verdicts(path, movie, geometry, stats, progress, decoder)
        return [self._row(v, movie, geometry, staging) for v in verdicts], stats

    def _verdicts(self, path: Path, movie: str, geometry: "MovieGeometry", stats: DecodeStats,
                  progress, decoder: str) -> Iterator[FrameVerdict]:
        """Every sampled frame's quality verdict, in time order, from one decoding pass."""
        quality = QualityFilter(self.settings.quality)
        seen: set[str] = set()
        start, end = geometry.start, geometry.end
        for timestamp, frame in decode_frames(path, self.settings.sampling, geometry.size, geometry.crop, start,
                                              None if end is None else end - start, stats, geometry.info.demuxer,
                                              decoder):
            fid = frame_id(movie, timestamp)
            if fid in seen:  # two frames within the same millisecond: keep the first
                continue
            seen.add(fid)
            yield from quality.push(frame, {"frame_id": fid, "timestamp": timestamp,
                                            "source_size": geometry.source_size})
            progress(timestamp - start, max(geometry.span, timestamp - start))
        yield from quality.flush()

    def _row(self, verdict: FrameVerdict, movie: str, geometry: "MovieGeometry", staging: Path) -> dict:
        """The frame's table row; a kept frame's JPEG is written to the staging folder first."""
        jpeg = data = None
        if verdict.kept:
            name = f"{verdict.meta['frame_id']}.jpg"
            jpeg = f"frames/{movie}/{name}"
            _, buffer = cv2.imencode(".jpg", verdict.frame, [cv2.IMWRITE_JPEG_QUALITY, self.settings.jpeg_quality])
            data = buffer.tobytes()
            (staging / name).write_bytes(data)
        return _verdict_row(verdict, movie, geometry.size, jpeg, data)


@dataclass(frozen=True)
class MovieGeometry:
    """What part of a movie is decoded and at what size."""

    info: MovieInfo
    start: float
    end: float | None  # None: the movie's duration is unknown, decode to its end
    crop: Crop | None
    size: tuple[int, int]
    source_size: tuple[int, int]  # the effective resolution, after the crop and before scaling

    @property
    def span(self) -> float:
        return (self.end - self.start) if self.end is not None else 0.0

    def summary(self) -> dict:
        return {"probe": self.info.to_dict(), "crop": asdict(self.crop) if self.crop else None,
                "frame_size": list(self.size), "source_size": list(self.source_size)}


def _counts(rows: list[dict]) -> dict:
    reasons = Counter(r["reject_reason"] for r in rows if not r["kept"])
    return {"frames_in": len(rows), "frames_out": sum(r["kept"] for r in rows), "rejected": dict(sorted(reasons.items()))}


def _ffmpeg_detail(stats: DecodeStats) -> str:
    return f" (ffmpeg exit {stats.returncode})" + (f": {stats.error}" if stats.error else "")


def _warnings(stats: DecodeStats, geometry: MovieGeometry, fallback: str | None) -> list[str]:
    """Why the GPU did not decode the film, ffmpeg's own error, and decoding that stopped well
    before the end (a truncated file)."""
    warnings = [f"{fallback}; decoded on the CPU"] if fallback else []
    if stats.returncode:
        warnings.append(f"ffmpeg exit {stats.returncode} after {stats.last_time:.1f} s: {stats.error}")
    end = geometry.end
    if end is not None and stats.last_time is not None and end - stats.last_time > max(5.0, 0.05 * geometry.span):
        warnings.append(f"decoding stopped at {stats.last_time:.1f} s of {end:.1f} s (truncated file?)")
    return warnings


@dataclass
class MovieOutcome:
    movie_id: str
    path: str
    status: str  # done | failed | skipped (done in an earlier run) | copy (same content as movie_id's file)
    reason: str | None
    summary: dict


def _check_same_settings(done: dict[str, dict], settings: ExtractSettings) -> None:
    """Skipping a done movie is only right if it was extracted the same way."""
    wanted = _compared(settings.to_dict())
    for movie, summary in done.items():
        if _compared(summary.get("settings", {})) != wanted:
            changed = sorted(k for k in wanted if summary.get("settings", {}).get(k) != wanted[k])
            raise InputError(f"{movie} was extracted with other settings ({', '.join(changed)}): "
                             "use a new work directory, the same settings to resume, or --redo")


def _compared(settings: dict) -> dict:
    """The settings a done movie must share, as stored (tuples become lists): all but the decoder."""
    return {k: v for k, v in json.loads(json.dumps(settings)).items() if k != "decoder"}


_HASH = re.compile(r"[0-9a-f]{8}")


def known_movies(workdir: WorkDir) -> dict[str, str]:
    """content hash -> movie id, for every movie the work directory was asked to extract. Plans
    written before the hash was recorded give it as the id's suffix; when an earlier run made two
    ids of one content, the first in sorted order stands for it."""
    known: dict[str, str] = {}
    for mid, info in workdir.planned(STAGE).items():
        digest = info.get("content_hash") or mid.rsplit("-", 1)[-1]
        if _HASH.fullmatch(digest):
            known.setdefault(digest, mid)
    return known


def _unreadable(workdir: WorkDir, path: Path, error: MediaError | OSError) -> MovieOutcome:
    """A file that cannot even be read for its content hash (not a regular file, a broken link),
    recorded as failed right away."""
    mid, info = f"{slug(path.stem) or 'movie'}-unreadable", {"path": str(path)}
    reason = str(error) if isinstance(error, MediaError) else f"cannot read file: {error.strerror}"
    workdir.plan(STAGE, mid, info)
    workdir.mark_failed(STAGE, mid, {**info, "reason": reason})
    return MovieOutcome(mid, str(path), "failed", reason, info)


def plan_movies(workdir: WorkDir, paths: list[Path]) -> tuple[list[Partition], list[MovieOutcome]]:
    """One partition per distinct movie content, whatever the file is called: content the work
    directory knows keeps its movie id (a renamed or copied file is not extracted again), and of
    two files with the same content the first in sorted order is extracted, the other reported as
    a copy (also in the plan, under "copies"). The plan is recorded so `status` can show what is
    pending. Returns the partitions and the outcomes known already (unreadable files, copies)."""
    known = known_movies(workdir)
    partitions: dict[str, Partition] = {}
    copies: dict[str, list[str]] = {}
    outcomes: list[MovieOutcome] = []
    for path in sorted(paths):
        try:
            digest = content_hash(path)
        except (MediaError, OSError) as e:
            outcomes.append(_unreadable(workdir, path, e))
            continue
        mid = known.setdefault(digest, movie_id(path, digest))
        if mid in partitions:
            copies.setdefault(mid, []).append(str(path))
            outcomes.append(MovieOutcome(mid, str(path), "copy", f"same footage as {mid}", {}))
        else:
            partitions[mid] = Partition(mid, {"path": str(path), "content_hash": digest}, record={"path": str(path)})
    for p in partitions.values():
        workdir.plan(STAGE, p.id, {**p.info, **({"copies": copies[p.id]} if p.id in copies else {})})
    return list(partitions.values()), outcomes


@writes("workdir")
def extract(inputs: list[str | Path], workdir: WorkDir | str | Path, settings: ExtractSettings | None = None,
            runner=None, redo: bool = False) -> list[MovieOutcome]:
    """Extract frames from every movie in `inputs` (files or folders) into the work directory.
    Movies already done are skipped, so a killed run resumes where it stopped; `redo` extracts
    them again (e.g. with new quality thresholds)."""
    workdir = workdir if isinstance(workdir, WorkDir) else WorkDir(workdir)
    require_ffmpeg()  # here, not in the workers: an old ffmpeg stops the command, not each movie
    stage = ExtractStage(workdir, settings or ExtractSettings())
    pick_decoder(stage.settings.decoder)  # --decoder cuda without a GPU: one line here, not a failure per movie
    partitions, outcomes = plan_movies(workdir, find_movies(inputs))
    finished = {} if redo else workdir.done(STAGE)
    done = {p.id: finished[p.id] for p in partitions if p.id in finished}
    _check_same_settings(done, stage.settings)
    results = {r.id: r for r in (runner or LocalRunner()).run(stage, [p for p in partitions if p.id not in done])}
    for p in partitions:
        if p.id in results:
            r = results[p.id]
            outcomes.append(MovieOutcome(p.id, p.info["path"], "done" if r.ok else "failed", r.reason, r.summary))
        else:
            outcomes.append(MovieOutcome(p.id, p.info["path"], "skipped", None, done[p.id]))
    return outcomes
