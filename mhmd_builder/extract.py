"""Stage 1: one pass over each movie. Decode once, sample, score quality on the decoded pixels,
encode a JPEG only for frames that pass, and record a row for every sampled frame."""
from __future__ import annotations

import bisect
import errno
import json
import logging
import math
import os
import re
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import cv2
import pyarrow as pa
import xxhash

from .devices import machine_cores, pick_decoder
from .errors import InputError
from .logs import progress_bar
from .media import (BORDER_MARGIN, EXACT_SEEK_CONTAINERS, SEEK_SLACK, Crop, DecodeStats, MediaError, MovieInfo,
                    Part, Sampling, content_hash, cuda_decodes, decode_frames, detect_letterbox, find_movies,
                    key_frames_at, movie_id, output_size, probe, require_ffmpeg, slug)
from .ranges import RANGES
from .runners import LocalRunner
from .quality import DuplicateRuns, FrameVerdict, QualityFilter, QualityThresholds, SCORE_NAMES
from .tables import EXTRACT, EXTRACT_CHUNKS, FRAME_SCHEMA
from .stages import Partition, PartitionError, PartitionResult, Resources
from .workdir import WorkDir, writes

STAGE = EXTRACT
CHUNKS = EXTRACT_CHUNKS
log = logging.getLogger(__name__)
# With --decoder cuda under Ray, each worker asks for this share of a GPU: a GPU decodes several
# films at once (NVDEC engines, no session limit on data-centre GPUs), each worker needing one core
# for its filters and JPEG encoding.
FILMS_PER_GPU = 8
# --chunk-seconds by default. Measured (benchmarks/RESULTS.md, "extract in chunks"): a chunk costs
# its records, about 7 ms of CPU (one ffmpeg decodes each worker's run of chunks), 1-2% of the
# cheapest 60 s there is to decode (720p, x264 ultrafast); what it buys is a kill that loses a
# minute of film, not a whole film (12 minutes of decoding for 2 hours of 1080p on 2 cores).
DEFAULT_CHUNK_SECONDS = 60.0
SCENES_IN_CHUNKS = ("--chunk-seconds: scene-cut sampling (--scenes) cannot be cut into chunks, since whether a "
                    "frame is taken depends on the last one taken: leave out one of them")

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
    # Seconds of film between commits (None or 0: whole films): a killed run loses one chunk at
    # most, and the chunks of one film run at once on several workers when films are fewer than
    # workers. Scene-cut sampling cannot be cut and decodes whole films by default. Not a setting a
    # done movie must share either: chunked or not, a film gives the same rows and JPEGs.
    chunk_seconds: float | None = DEFAULT_CHUNK_SECONDS

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

        geometry = film_geometry(path, self.settings)
        decoded = Decoded()
        rows = [self._row(v, movie, geometry, staging)
                for v in self._decode(path, movie, geometry, None, progress, self.settings.quality, decoded)]
        if not rows:
            raise PartitionError(f"no frames decoded{_ffmpeg_detail(decoded.stats)}")

        final_frames.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, final_frames)
        summary = {**partition.info, "movie_id": movie, **geometry.summary(), "settings": self.settings.to_dict(),
                   "decoder": decoded.decoder, **_counts(rows),
                   "warnings": _warnings(decoded.stats, decoded.fallback)
                   + _stopped_early([row["timestamp"] for row in rows], geometry.end, geometry.span),
                   "seconds": round(time.monotonic() - started, 3)}
        self.workdir.commit(STAGE, movie, _rows_to_table(rows), summary)
        progress(geometry.span, geometry.span)
        return summary

    def _decode(self, path: Path, movie: str, geometry: "MovieGeometry", part: Part | None, progress,
                quality: QualityThresholds, decoded: "Decoded") -> Iterator[FrameVerdict]:
        """Every sampled frame's verdict by `quality`, in time order, of the film or of its `part`;
        `decoded` says how it goes as it goes: the decoder decoding, why not the GPU, ffmpeg's stats."""
        decoded.decoder, codec = self.decoder, geometry.info.codec
        if decoded.decoder == "cuda" and not cuda_decodes(codec):
            decoded.decoder, decoded.fallback = self._not_on_gpu(movie, f"NVDEC cannot decode {codec}")
        decoded.stats = DecodeStats()
        for verdict in self._verdicts(path, movie, geometry, part, decoded.stats, progress, decoded.decoder, quality):
            self._check_gpu_refused(movie, geometry, decoded)
            yield verdict
        self._check_gpu_refused(movie, geometry, decoded)
        if decoded.decoder == "cuda" and not decoded.stats.frames:
            decoded.decoder, decoded.fallback = self._not_on_gpu(movie, f"GPU decoding failed{_ffmpeg_detail(decoded.stats)}")
            decoded.stats = DecodeStats()
            yield from self._verdicts(path, movie, geometry, part, decoded.stats, progress, decoded.decoder, quality)

    def _check_gpu_refused(self, movie: str, geometry: "MovieGeometry", decoded: "Decoded") -> None:
        """NVDEC refused the stream and ffmpeg decodes it on the CPU itself: said on stderr before its
        first frame's line, so known once a frame arrived (or ffmpeg ended)."""
        if decoded.decoder == "cuda" and decoded.stats.gpu_refused:
            decoded.decoder, decoded.fallback = self._not_on_gpu(
                movie, f"NVDEC cannot decode this {geometry.info.codec} stream ({geometry.info.pix_fmt})")

    def _not_on_gpu(self, movie: str, reason: str) -> tuple[str, str]:
        """A film the GPU cannot decode: PartitionError with --decoder cuda, else ("cpu", reason) and a warning."""
        if self.settings.decoder == "cuda":
            raise PartitionError(f"{reason}: use --decoder cpu or auto")
        log.warning("%s: %s; the CPU decodes it", movie, reason)
        return "cpu", reason

    def _verdicts(self, path: Path, movie: str, geometry: "MovieGeometry", part: Part | None, stats: DecodeStats,
                  progress, decoder: str, thresholds: QualityThresholds) -> Iterator[FrameVerdict]:
        """Every sampled frame's quality verdict, in time order, from one decoding pass."""
        quality = QualityFilter(thresholds)
        seen: set[str] = set()
        start, end = geometry.start, geometry.end
        for timestamp, frame in decode_frames(path, self.settings.sampling, geometry.size, geometry.crop, start,
                                              None if end is None else end - start, stats, geometry.info.demuxer,
                                              decoder, part):
            fid = frame_id(movie, timestamp)
            if fid in seen:  # two frames within the same millisecond: keep the first
                continue
            seen.add(fid)
            yield from quality.push(frame, {"frame_id": fid, "timestamp": timestamp,
                                            "source_size": geometry.source_size})
            progress(timestamp - start, max(geometry.span, timestamp - start))
        yield from quality.flush()

    def _row(self, verdict: FrameVerdict, movie: str, geometry: "MovieGeometry", folder: Path) -> dict:
        """The frame's table row; a kept frame's JPEG is written to `folder` first."""
        jpeg = data = None
        if verdict.kept:
            name = f"{verdict.meta['frame_id']}.jpg"
            jpeg = f"frames/{movie}/{name}"
            _, buffer = cv2.imencode(".jpg", verdict.frame, [cv2.IMWRITE_JPEG_QUALITY, self.settings.jpeg_quality])
            data = buffer.tobytes()
            (folder / name).write_bytes(data)
        return _verdict_row(verdict, movie, geometry.size, jpeg, data)


@dataclass
class ChunkStage(ExtractStage):
    """A run of consecutive chunks of one film (`--chunk-seconds`, `chunk_runs`), decoded by one
    ffmpeg from the run's seek point with the film's geometry (decided once, by the driver). Each
    chunk's rows are recorded as a partition of W/extract/chunks, its JPEGs in its own folder there,
    as soon as the first frame past it arrives, so a killed run loses one chunk at most; `join_chunks`
    makes the film's partition of them. Duplicate runs are decided only then, over the whole film: a
    run may cross a border, so every frame that passes the other checks is encoded here."""

    name: str = CHUNKS

    def process(self, partition: Partition, progress) -> dict:
        chunks: list[Partition] = partition.info["chunks"]
        info, sampling = chunks[0].info, self.settings.sampling
        path, movie, geometry = Path(info["path"]), info["movie_id"], info["geometry"]
        part = Part(info["part"][0], chunks[-1].info["part"][1])
        begin, end = _chunk_begin(geometry, part, sampling), _chunk_end(geometry, part, sampling)
        span = 0.0 if end is None else end - begin

        def run_progress(done: float, _total: float) -> None:  # seconds of this run, not of the film
            progress(done - (begin - geometry.start), max(span, done - (begin - geometry.start)))

        for chunk in chunks:
            self.workdir.begin(CHUNKS, chunk.id)
            folder = chunk_frames_dir(self.workdir, chunk.id)
            shutil.rmtree(folder, ignore_errors=True)  # JPEGs of an attempt killed before its commit
            folder.mkdir(parents=True)
        committed: list[dict] = []
        try:
            self._decode_run(chunks, path, movie, geometry, part, run_progress, committed)
        except BaseException:
            for chunk in chunks[len(committed):]:  # on a full disk, this frees the room the failure's record needs
                shutil.rmtree(chunk_frames_dir(self.workdir, chunk.id), ignore_errors=True)
            raise
        progress(span, span)
        return committed[-1]

    def _decode_run(self, chunks: list[Partition], path: Path, movie: str, geometry: "MovieGeometry", part: Part,
                    progress, committed: list[dict]) -> None:
        """Decode the run with one ffmpeg, each frame's row going to the chunk its slot (or time) lies
        in, and commit each chunk once a frame past it arrives, appending its summary to `committed`."""
        sampling = self.settings.sampling
        firsts = [chunk.info["part"][0] for chunk in chunks[1:]]  # where each later chunk starts
        no_runs = replace(self.settings.quality, max_hash_distance=-1)
        decoded, rows, started = Decoded(), [], time.monotonic()
        for verdict in self._decode(path, movie, geometry, part, progress, no_runs, decoded):
            while len(committed) < bisect.bisect_right(firsts, sampling.position(geometry.start,
                                                                                 verdict.meta["timestamp"])):
                committed.append(self._commit_chunk(chunks[len(committed)], rows, decoded, started))
                rows, started = [], time.monotonic()
            rows.append(self._row(verdict, movie, geometry, chunk_frames_dir(self.workdir, chunks[len(committed)].id)))
        # The chunk ffmpeg ended in carries its error, if any; the chunks after it have no frames, as
        # in an undivided decode that stopped there (a film cut short: the join says so).
        committed.append(self._commit_chunk(chunks[len(committed)], rows, decoded, started))
        nothing = replace(decoded, stats=DecodeStats())
        committed += [self._commit_chunk(chunk, [], nothing, time.monotonic()) for chunk in chunks[len(committed):]]

    def _commit_chunk(self, chunk: Partition, rows: list[dict], decoded: "Decoded", started: float) -> dict:
        """Record a chunk's rows (its JPEGs are in its folder) and its done marker."""
        summary = {"inputs": chunk_inputs(chunk.info, self.settings), "decoder": decoded.decoder,
                   "frames_in": len(rows), "warnings": _warnings(decoded.stats, decoded.fallback),
                   "seconds": round(time.monotonic() - started, 3)}
        self.workdir.commit(CHUNKS, chunk.id, _rows_to_table(rows), summary)
        return summary


@dataclass
class Decoded:
    """How a decode goes, filled in as it goes: ffmpeg's stats, the decoder decoding (cpu, cuda) and
    why not the GPU (None: nothing kept it off)."""

    stats: DecodeStats = field(default_factory=DecodeStats)
    decoder: str = "cpu"
    fallback: str | None = None


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


def film_geometry(path: Path, settings: ExtractSettings) -> MovieGeometry:
    """Probe the movie once and decide what is decoded: the time window, the letterbox crop, the size."""
    try:
        info = probe(path)
    except MediaError as e:
        raise PartitionError(str(e)) from None
    start, end = _time_window(info.duration, settings)
    crop = (detect_letterbox(path, info, start, end if end is not None else start)
            if settings.crop_letterbox else None)
    return MovieGeometry(info, start, end, crop, output_size(info, crop, settings.max_side),
                         output_size(info, crop, None))


def _counts(rows: list[dict]) -> dict:
    reasons = Counter(r["reject_reason"] for r in rows if not r["kept"])
    return {"frames_in": len(rows), "frames_out": sum(r["kept"] for r in rows), "rejected": dict(sorted(reasons.items()))}


def _ffmpeg_detail(stats: DecodeStats) -> str:
    return f" (ffmpeg exit {stats.returncode})" + (f": {stats.error}" if stats.error else "")


def _warnings(stats: DecodeStats, fallback: str | None) -> list[str]:
    """Why the GPU did not decode the film, and ffmpeg's own error."""
    warnings = [f"{fallback}; decoded on the CPU"] if fallback else []
    if stats.returncode:
        at = "before its first frame" if stats.last_time is None else f"after {stats.last_time:.1f} s"
        warnings.append(f"ffmpeg exit {stats.returncode} {at}: {stats.error}")
    return warnings


def _stopped_early(times: list[float], end: float | None, span: float) -> list[str]:
    """Decoding that stopped well before the film's `end` (a truncated file; `span`: the film's
    decoded seconds), judged from the sampled frames' `times`: more than max(5 s, 5% of the span)
    after the last, and more than 1.5 times the largest gap between two of them, since the sampling
    itself may leave that much after its last frame (1/fps, a long GOP of key frames, a long shot)."""
    if end is None or not times:
        return []
    ordered = sorted(times)
    gap = max((later - earlier for earlier, later in zip(ordered, ordered[1:])), default=0.0)
    if end - ordered[-1] > max(5.0, 0.05 * span, 1.5 * gap):
        return [f"decoding stopped at {ordered[-1]:.1f} s of {end:.1f} s (truncated file?)"]
    return []


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
    """The settings a done movie must share, as stored (tuples become lists): all but the decoder
    and the chunks, which change how a film is decoded, not what comes out."""
    return {k: v for k, v in json.loads(json.dumps(settings)).items() if k not in ("decoder", "chunk_seconds")}


def _with_chunks(settings: ExtractSettings) -> ExtractSettings:
    """The settings with the chunks they decode in: 0 is None (whole films), and so is the default
    with scene-cut sampling; InputError for a length out of range, or one asked of scene cuts."""
    if not settings.chunk_seconds:
        return replace(settings, chunk_seconds=None)
    problem = RANGES["extract.chunk_seconds"].problem(settings.chunk_seconds)
    if problem:
        raise InputError(f"--chunk-seconds: {problem}")
    if settings.sampling.mode == "scenes":
        if settings.chunk_seconds == DEFAULT_CHUNK_SECONDS:
            return replace(settings, chunk_seconds=None)
        raise InputError(SCENES_IN_CHUNKS)
    return settings


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


# -- chunks (--chunk-seconds) ---------------------------------------------------------------------
def chunk_id(movie: str, index: int) -> str:
    return f"{movie}@{index}"


def chunk_frames_dir(workdir: WorkDir, chunk: str) -> Path:
    """Where a chunk's JPEGs wait for the film's join."""
    return workdir.stage_dir(CHUNKS) / "frames" / chunk


def film_parts(geometry: MovieGeometry, settings: ExtractSettings, path: Path) -> list[Part]:
    """A film's chunks in time order, of about `chunk_seconds` each (whole 1/fps slots with fps
    sampling, placed after key frames: `_after_key_frames`); one for a film of unknown length or in
    a container whose seeks are not exact. With key-frame sampling a border stays a plain time:
    its chunk decodes the key frame before it, wherever it lies."""
    sampling, seconds = settings.sampling, settings.chunk_seconds
    if geometry.end is None or geometry.info.demuxer not in EXACT_SEEK_CONTAINERS:
        return [Part()]
    if sampling.mode == "fps":
        slots = max(1, round(seconds * sampling.fps))
        plain = [k * slots for k in range(1, math.ceil(geometry.span * sampling.fps / slots))]
        borders = _after_key_frames(path, geometry, sampling, seconds, plain)
    else:
        borders = [geometry.start + k * seconds for k in range(1, math.ceil(geometry.span / seconds))]
    edges = [None, *borders, None]
    return [Part(first, end) for first, end in zip(edges, edges[1:])]


def _after_key_frames(path: Path, geometry: MovieGeometry, sampling: Sampling, seconds: float,
                      borders: list[int]) -> list[int]:
    """Each fps border (a slot) moved to just after the key frame that a chunk starting a slot
    later would seek to (`Sampling.first_slot_after`): then the chunk's seek lands on that key frame
    and the chunk decodes at most a slot and SEEK_SLACK it throws away, not up to a GOP; a key
    frame just past a border moves it a slot on, no further. A border stays where the film has no
    usable key-frame index (`key_frames_at`: None) or that key frame lies over half a chunk away
    (GOPs that long, an index of one key frame): a chunk stays between half and 1.5 `seconds`."""
    times = [sampling.border_time(geometry.start, b) for b in borders]
    seeks = [sampling.border_time(geometry.start, b + 1) - BORDER_MARGIN - SEEK_SLACK for b in borders]
    keys = key_frames_at(path, geometry.info.demuxer, seeks)
    if keys is None:
        log.info("%s: no usable key-frame index: its chunks are cut at plain times", path.name)
        return borders
    moved = [sampling.first_slot_after(geometry.start, key) if abs(key - time) <= seconds / 2 else border
             for border, time, key in zip(borders, times, keys)]
    return sorted({b for b in moved if 0 < b < geometry.span * sampling.fps})


def _chunk_begin(geometry: MovieGeometry, part: Part, sampling: Sampling) -> float:
    return geometry.start if part.first is None else sampling.border_time(geometry.start, part.first)


def _chunk_end(geometry: MovieGeometry, part: Part, sampling: Sampling) -> float | None:
    return geometry.end if part.end is None else sampling.border_time(geometry.start, part.end)


def chunk_inputs(info: dict, settings: ExtractSettings) -> dict:
    """What a done chunk was made from, as its done marker stores it: a chunk is only joined to a
    film extracted from the same content, window, geometry, borders and settings."""
    geometry: MovieGeometry = info["geometry"]
    inputs = {"content_hash": info["content_hash"], "part": info["part"], "window": [geometry.start, geometry.end],
              **geometry.summary(), "settings": _compared(settings.to_dict())}
    return json.loads(json.dumps(inputs))


def _films_in_chunks(films: list[Partition], settings: ExtractSettings) -> dict[str, list[Partition] | PartitionError]:
    """Each film's chunks, cut from its geometry (probe, window, letterbox: decided once for all its
    chunks) and key frames; the films at once, since each is mostly waiting for ffprobe and ffmpeg.
    About half a second a film before any decoding starts: a bar shows it."""
    def chunks(film: Partition) -> list[Partition] | PartitionError:
        try:
            return _chunk_partitions(film, film_geometry(Path(film.info["path"]), settings), settings)
        except PartitionError as e:
            return e

    with ThreadPoolExecutor(machine_cores()) as pool:
        planned = progress_bar(pool.map(chunks, films), "extract: cutting films into chunks", "film", len(films))
        return dict(zip([f.id for f in films], planned))


def _chunk_partitions(film: Partition, geometry: MovieGeometry, settings: ExtractSettings) -> list[Partition]:
    parts = film_parts(geometry, settings, Path(film.info["path"]))
    if geometry.end is not None and geometry.info.demuxer not in EXACT_SEEK_CONTAINERS:
        log.info("%s: %s seeks are not exact: extracted in one chunk", film.id, geometry.info.demuxer)
    return [Partition(chunk_id(film.id, k), {**film.info, "movie_id": film.id, "geometry": geometry,
                                             "part": [part.first, part.end]}, film.record)
            for k, part in enumerate(parts)]


def _drop_chunk(workdir: WorkDir, chunk: str) -> None:
    workdir.drop(CHUNKS, chunk)
    workdir.clear_progress(CHUNKS, chunk)
    shutil.rmtree(chunk_frames_dir(workdir, chunk), ignore_errors=True)


def _drop_stale_chunks(workdir: WorkDir, planned: dict[str, list[Partition]]) -> None:
    """Records of chunks that will never be joined: of films done since (a run killed between a
    film's commit and the removal of its chunks, or before its join and the film extracted whole
    since), or of a film now cut at other borders."""
    done_films = workdir.done(STAGE)
    wanted = {c.id for chunks in planned.values() for c in chunks}
    recorded = {*workdir.done(CHUNKS), *workdir.failed(CHUNKS),
                *(p.name for p in (workdir.stage_dir(CHUNKS) / "frames").glob("*"))}
    for chunk in sorted(recorded):
        movie = chunk.rsplit("@", 1)[0]
        if movie in done_films or (movie in planned and chunk not in wanted):
            _drop_chunk(workdir, chunk)


def _film_failed(workdir: WorkDir, film: Partition, reason: str) -> PartitionResult:
    """Record a film failed, its earlier records gone (a --redo that fails leaves nothing stale)."""
    info = {**film.record, "reason": reason}
    workdir.begin(STAGE, film.id)
    workdir.mark_failed(STAGE, film.id, info)
    return PartitionResult(film.id, False, reason, info)


def _extract_in_chunks(workdir: WorkDir, settings: ExtractSettings, films: list[Partition], runner,
                       redo: bool) -> dict[str, PartitionResult]:
    """Each film's chunks through the runner as runs (the chunks done with the same inputs in an
    earlier run kept, unless `redo`), each film joined into its partition as soon as its last run
    ends (a film with no chunk left to do, right away)."""
    results: dict[str, PartitionResult] = {}
    planned: dict[str, list[Partition]] = {}
    chunked = _films_in_chunks(films, settings)
    for film in films:
        if isinstance(chunked[film.id], PartitionError):
            results[film.id] = _film_failed(workdir, film, str(chunked[film.id]))
        else:
            planned[film.id] = chunked[film.id]
    _drop_stale_chunks(workdir, planned)
    done = workdir.done(CHUNKS)
    pending = [c for chunks in planned.values() for c in chunks
               if redo or done.get(c.id, {}).get("inputs") != chunk_inputs(c.info, settings)]
    for movie in planned:  # no film looks done while its chunks write again (a --redo)
        workdir.begin(STAGE, movie)
    stage = ChunkStage(workdir, settings)
    runs = {run.id: run for run in chunk_runs(pending, runner.worker_count(stage))}
    runs_left = Counter(run.info["chunks"][0].info["movie_id"] for run in runs.values())
    films_by_id = {film.id: film for film in films}
    failures: dict[str, str] = {}

    def settle(film: Partition) -> None:
        """The film joined, or recorded failed with its first failed run's reason."""
        if film.id in failures:
            results[film.id] = _film_failed(workdir, film, failures[film.id])
        else:
            results[film.id] = join_chunks(workdir, film, planned[film.id], settings)

    def run_ended(result: PartitionResult) -> None:
        chunks = runs[result.id].info["chunks"]
        movie = chunks[0].info["movie_id"]
        if not result.ok:
            named = chunks[0].id if len(chunks) == 1 else f"{chunks[0].id} to {chunks[-1].id}"
            failures.setdefault(movie, f"chunk{'s' * (len(chunks) > 1)} {named}: {result.reason}")
        runs_left[movie] -= 1
        if not runs_left[movie]:
            settle(films_by_id[movie])

    for movie in planned:
        if not runs_left[movie]:
            settle(films_by_id[movie])
    runner.run(stage, list(runs.values()), run_ended)
    return results


def chunk_runs(chunks: list[Partition], workers: int) -> list[Partition]:
    """The `chunks` to decode (in film and time order) as runs, one ffmpeg each: consecutive chunks
    of one film, at most an even share of all of them each (so every one of `workers` gets a run).
    One ffmpeg start (about 0.2 CPU s) then serves many chunks, and each chunk is still committed
    on its own. A run is the partition of its last chunk's id: the chunk it commits last."""
    most = max(1, math.ceil(len(chunks) / max(1, workers)))
    runs: list[list[Partition]] = []
    for chunk in chunks:
        before = runs[-1][-1] if runs else None
        if (before is not None and len(runs[-1]) < most and before.info["movie_id"] == chunk.info["movie_id"]
                and before.info["part"][1] == chunk.info["part"][0]):
            runs[-1].append(chunk)
        else:
            runs.append([chunk])
    return [Partition(run[-1].id, {"chunks": run}, run[0].record) for run in runs]


def decide_duplicates(rows: list[dict], max_distance: int) -> list[dict]:
    """The film's rows (in time order, every check but `duplicate` decided) with its duplicate
    runs decided from the recorded hashes and sharpness, as the extract pass decides them: a
    frame that is not the best of its run is rejected and loses its JPEG."""
    runs = DuplicateRuns(max_distance)
    verdicts = [FrameVerdict(row, {k: row[k] for k in SCORE_NAMES}, list(row["flags"])) for row in rows]
    for v in [done for verdict in verdicts for done in runs.push(verdict)] + runs.flush():
        v.meta.update(flags=v.flags, kept=v.kept, reject_reason=v.reason)
        if not v.kept:
            v.meta.update(jpeg=None, jpeg_bytes=None, jpeg_xxh3=None)
    return rows


def join_chunks(workdir: WorkDir, film: Partition, chunks: list[Partition], settings: ExtractSettings) -> PartitionResult:
    """The film's partition from its done chunks (their tables and done markers): their rows
    in time order with duplicate runs decided over the whole film, the kept frames' JPEGs linked
    into W/frames/<movie> (the chunks keep theirs until the film is committed, so a join killed
    halfway is simply done again), the film's table and done marker; the chunks' records go last."""
    started, movie = time.monotonic(), film.id
    summaries = [workdir.done_record(CHUNKS, c.id) for c in chunks]
    if None in summaries:  # a run ended well but its chunk's records do not read (changed under it)
        return _film_failed(workdir, film, f"chunk {chunks[summaries.index(None)].id}: its records do not read")
    tables = [workdir.read_partition(CHUNKS, c.id) for c in chunks]  # DamagedFileError names a damaged one
    table = pa.concat_tables(tables, promote_options="default")
    unique = {}
    for row in table.to_pylist():  # two frames within a millisecond on either side of a border: the first
        unique.setdefault(row["frame_id"], row)
    rows = decide_duplicates(list(unique.values()), settings.quality.max_hash_distance)
    geometry: MovieGeometry = chunks[0].info["geometry"]
    warnings = list(dict.fromkeys(w for s in summaries for w in s["warnings"])) + _stopped_early(
        [row["timestamp"] for row in rows], geometry.end, geometry.span)
    if not rows:
        return _film_failed(workdir, film, "no frames decoded" + (f" ({warnings[0]})" if warnings else ""))
    staging = workdir.begin(STAGE, movie) / "frames"
    staging.mkdir()
    kept = {Path(r["jpeg"]).name for r in rows if r["kept"]}
    for chunk in chunks:
        for jpeg in chunk_frames_dir(workdir, chunk.id).iterdir():
            if jpeg.name in kept:
                _link_or_copy(jpeg, staging / jpeg.name)
    final_frames = workdir.frames_dir(movie)
    shutil.rmtree(final_frames, ignore_errors=True)
    final_frames.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, final_frames)
    seconds = sum(s["seconds"] for s in summaries) + time.monotonic() - started
    summary = {**film.info, "movie_id": movie, **geometry.summary(), "settings": settings.to_dict(),
               "decoder": "cuda" if all(s["decoder"] == "cuda" for s in summaries) else "cpu", **_counts(rows),
               "warnings": warnings, "chunks": len(chunks), "seconds": round(seconds, 3)}
    workdir.commit(STAGE, movie, _rows_to_table(rows), summary)
    for chunk in chunks:
        _drop_chunk(workdir, chunk.id)
    return PartitionResult(movie, True, None, summary)


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link, or a copy on a file system without them (FAT, exFAT, some network and FUSE
    mounts): either way the chunk keeps its JPEG until the film is committed."""
    try:
        os.link(source, target)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
        shutil.copyfile(source, target)


@writes("workdir")
def extract(inputs: list[str | Path], workdir: WorkDir | str | Path, settings: ExtractSettings | None = None,
            runner=None, redo: bool = False) -> list[MovieOutcome]:
    """Extract frames from every movie in `inputs` (files or folders) into the work directory.
    Movies already done are skipped, so a killed run resumes where it stopped; `redo` extracts
    them again (e.g. with new quality thresholds)."""
    workdir = workdir if isinstance(workdir, WorkDir) else WorkDir(workdir)
    settings = _with_chunks(settings or ExtractSettings())
    require_ffmpeg()  # here, not in the workers: an old ffmpeg stops the command, not each movie
    stage = ExtractStage(workdir, settings)
    pick_decoder(stage.settings.decoder)  # --decoder cuda without a GPU: one line here, not a failure per movie
    partitions, outcomes = plan_movies(workdir, find_movies(inputs))
    finished = {} if redo else workdir.done(STAGE)
    done = {p.id: finished[p.id] for p in partitions if p.id in finished}
    _check_same_settings(done, stage.settings)
    todo, runner = [p for p in partitions if p.id not in done], runner or LocalRunner()
    if settings.chunk_seconds is None:
        results = {r.id: r for r in runner.run(stage, todo)}
        _drop_stale_chunks(workdir, {})  # those of a chunked run killed before, of films done now
    else:
        results = _extract_in_chunks(workdir, settings, todo, runner, redo)
    for p in partitions:
        if p.id in results:
            r = results[p.id]
            outcomes.append(MovieOutcome(p.id, p.info["path"], "done" if r.ok else "failed", r.reason, r.summary))
        else:
            outcomes.append(MovieOutcome(p.id, p.info["path"], "skipped", None, done[p.id]))
    return outcomes
