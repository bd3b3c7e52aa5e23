"""Everything that talks to ffmpeg: finding movies, probing them, letterbox detection, decoding.

Frames leave ffmpeg already sampled, cropped and scaled, as raw BGR pixels on a pipe, one ffmpeg
process per movie; their exact presentation times come from ffmpeg's `showinfo` filter on stderr.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import math
import os
import queue
import re
import stat
import subprocess
import threading
import unicodedata
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import ffmpeg
import numpy as np

from .errors import MhmdError, first_line
from .logs import FILE_ONLY

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = {
    ".mp4", ".m4v", ".mkv", ".avi", ".mov", ".webm", ".mpg", ".mpeg", ".ts", ".m2ts", ".mts",
    ".wmv", ".flv", ".ogv", ".3gp", ".vob", ".mxf",
}


# The demuxers ffmpeg and ffprobe may use (every input also reads local files only): those ffprobe
# names (first of its `format_name`) for files of every extension in VIDEO_EXTENSIONS. Nothing else
# is opened: playlists and file lists (hls, concat) read other files, images and devices (image2,
# lavfi) are not movies.
CONTAINERS = ("mov", "matroska", "avi", "mpeg", "mpegts", "asf", "flv", "ogg", "mxf")
# The containers whose seeks land where asked (their index, or their clusters' times, say where each
# key frame is), so that a part of a film decoded from its own seek point samples exactly the
# frames of an undivided decode (measured: MPEG-TS, MPEG-PS and AVI seeks land a key frame late or early).
EXACT_SEEK_CONTAINERS = ("mov", "matroska")
_RESTRICTED = {"protocol_whitelist": "file", "format_whitelist": ",".join(CONTAINERS)}  # every ffmpeg input's options
_RESTRICTED_ARGS = [arg for key, value in _RESTRICTED.items() for arg in (f"-{key}", value)]  # as command-line options
# What a refused format is, for the failure reason.
_REFUSED_KINDS = {"hls": "an HLS playlist", "concat": "a concat file list", "dash": "a DASH manifest",
                  "image2": "an image or image sequence"}
_SPECIAL_FILES = {stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device",
                  stat.S_IFBLK: "block device"}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class MediaError(MhmdError):
    """A movie that cannot be used; the message is one line naming the problem."""


class FfmpegError(MhmdError):
    """ffmpeg missing, or too old for the options mhmd gives it: no movie can be read (not a
    MediaError, which fails one movie and lets the others go on)."""


FFMPEG_MIN = (5, 1)  # -fps_mode, which every decode passes, came with ffmpeg 5.1
_RELEASE = re.compile(r"ffmpeg version n?(\d+)\.(\d+)")  # "4.4.2-0ubuntu0.22.04.1", "n6.1.1", "7.1-static"


def ffmpeg_release(version_line: str) -> tuple[int, int] | None:
    """(major, minor) from the first line of `ffmpeg -version`; None for a git build
    ("N-112233-gabcdef"), which carries no release number and is newer than the last release."""
    match = _RELEASE.match(version_line)
    return (int(match[1]), int(match[2])) if match else None


@functools.cache
def require_ffmpeg() -> str:
    """The first line of `ffmpeg -version`, checked once per process before the first use of ffmpeg:
    FfmpegError in one line when ffmpeg is not on PATH, does not run, or is older than 5.1."""
    try:
        out = subprocess.run(["ffmpeg", "-version"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             check=True).stdout
    except FileNotFoundError:
        raise FfmpegError("ffmpeg not found on PATH: install ffmpeg >= 5.1") from None
    except (OSError, subprocess.CalledProcessError) as e:
        raise FfmpegError(f"`ffmpeg -version` failed ({first_line(e)}): install ffmpeg >= 5.1") from None
    line = out.partition("\n")[0].split(" Copyright")[0]
    release = ffmpeg_release(line)
    if release is not None and release < FFMPEG_MIN:
        raise FfmpegError(f"{line}: too old, mhmd needs ffmpeg >= 5.1 (for -fps_mode)")
    log.info("%s", line, extra=FILE_ONLY)  # "ffmpeg version ...": the log says which ffmpeg ran
    return line


@functools.cache
def cuda_decoding_problem() -> str | None:
    """Why ffmpeg cannot decode on a CUDA GPU here, in one line (no driver, no device, an ffmpeg
    built without CUDA), or None when it can; asked once per process by opening the device the way
    `-hwaccel cuda` does, which is what decoding needs and what torch cannot tell."""
    require_ffmpeg()
    result = subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-init_hw_device", "cuda",
                             "-f", "lavfi", "-i", "nullsrc=s=16x16:d=0.04", "-f", "null", "-"],
                            stdin=subprocess.DEVNULL, capture_output=True)
    # The first error names the cause ("Cannot load libcuda.so.1", "CUDA_ERROR_NO_DEVICE"); the rest follow from it.
    return None if result.returncode == 0 else _one_line(result.stderr, Path("-")).split("; ")[0]


@functools.cache
def cuda_decodes(codec: str) -> bool:
    """Whether ffmpeg's decoder of `codec` (a probed codec name) decodes on a CUDA GPU (NVDEC): with
    `-hwaccel cuda` ffmpeg decodes any other codec on the CPU without a word. Asked of ffmpeg itself."""
    out = subprocess.run(["ffmpeg", "-hide_banner", "-h", f"decoder={codec}"], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True).stdout
    return any(line.strip().startswith("Supported hardware devices:") and "cuda" in line.split()
               for line in out.splitlines())


def find_movies(paths: list[str | Path]) -> list[Path]:
    """Files given explicitly are always taken (a bad one, even a broken link, is then recorded as
    failed); folders are searched recursively for regular files with a video extension."""
    found: list[Path] = []
    for given in paths:
        found += _movies_in(given)
    if not found:
        raise MediaError(f"{', '.join(map(str, paths))}: no movie files found "
                         f"(folders are searched for {' '.join(sorted(VIDEO_EXTENSIONS))})")
    unique = {p.resolve() if p.exists() else p.absolute(): None for p in found}
    return list(unique)


def _movies_in(given: str | Path) -> list[Path]:
    """The movies of one input: a folder's video files, or the file (or link) named."""
    if _URL.match(str(given)):
        raise MediaError(f"{given}: a URL, not a file: only movies on this machine are read")
    path = Path(given)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    if path.exists() or path.is_symlink():
        return [path]
    raise MediaError(f"{given}: no such file or directory")


def slug(text: str) -> str:
    """ASCII letters, digits and '-' only: safe in file names and WebDataset keys (no dots)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")[:48].strip("-")


def content_hash(path: Path, chunk: int = 1 << 20) -> str:
    """Hash of size plus head, middle and tail: identifies a file's content without reading
    a whole multi-gigabyte film."""
    size = regular_file_size(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - chunk // 2), max(0, size - chunk)}):
            f.seek(offset)
            h.update(f.read(chunk))
    return h.hexdigest()[:8]


def regular_file_size(path: Path) -> int:
    """The size of a regular file; MediaError for anything else, which must never be opened: a FIFO
    blocks for ever, a device never ends."""
    try:
        st = path.stat()
    except FileNotFoundError:
        reason = f"broken symbolic link (to {os.readlink(path)})" if path.is_symlink() else "no such file"
        raise MediaError(reason) from None
    except OSError as e:
        reason = "symbolic link loop" if e.errno == errno.ELOOP else f"cannot read file: {e.strerror}"
        raise MediaError(reason) from None
    if not stat.S_ISREG(st.st_mode):
        raise MediaError(f"not a regular file ({_SPECIAL_FILES.get(stat.S_IFMT(st.st_mode), 'special file')})")
    return st.st_size


def movie_id(path: Path, digest: str | None = None) -> str:
    """`<name>-<hash>`: readable, stable for the same content, never containing dots. `digest`:
    the file's content_hash when it is known already."""
    return f"{slug(path.stem) or 'movie'}-{digest or content_hash(path)}"


@dataclass
class MovieInfo:
    """What ffprobe says of a movie's video stream; width and height are as displayed
    (after rotation and pixel aspect ratio)."""

    duration: float | None
    fps: float | None
    coded_width: int
    coded_height: int
    width: int
    height: int
    rotation: int
    sar: float
    codec: str
    pix_fmt: str
    bit_rate: int | None
    header_frames: int | None
    variable_frame_rate: bool
    demuxer: str  # ffmpeg's name of the container's demuxer (one of CONTAINERS)

    def to_dict(self) -> dict:
        return asdict(self)


def _one_line(stderr: bytes, path: Path) -> str:
    """ffmpeg's error lines joined into one, without its '[demuxer @ 0x..]' and path prefixes."""
    messages: list[str] = []
    for line in stderr.decode(errors="replace").splitlines():
        text = re.sub(r"^\[[^]]* @ 0x[0-9a-f]+\]\s*", "", line.strip()).removeprefix(f"{path}: ")
        if text and text not in messages:
            messages.append(text)
    return "; ".join(messages) or "unknown error"


def _rate(text: str | None) -> float | None:
    try:
        value = Fraction(text or "0/0")
    except (ValueError, ZeroDivisionError):
        return None
    return float(value) if value > 0 else None


def _rotation(stream: dict) -> int:
    for side in stream.get("side_data_list", []):
        if "rotation" in side:
            return int(round(float(side["rotation"]))) % 360
    return int(stream.get("tags", {}).get("rotate", 0)) % 360


def _input(path: Path, demuxer: str | None, **options):
    """ffmpeg's input, restricted as every call is; `demuxer` (probed) pins the container's demuxer."""
    return ffmpeg.input(str(path), **_RESTRICTED, **({"f": demuxer} if demuxer else {}), **options)


def _refusal(path: Path, stderr: bytes) -> str:
    """Why ffprobe failed, in one line; a format outside CONTAINERS is named (asking ffprobe, as
    restricted as before, which demuxer its probe chose)."""
    if b"Format not on whitelist" not in stderr:
        return f"not a readable movie: {_one_line(stderr, path)}"
    debug = subprocess.run(["ffprobe", "-v", "debug", *_RESTRICTED_ARGS, str(path)], stdin=subprocess.DEVNULL,
                           capture_output=True).stderr
    found = re.search(rb"Format (\S+) probed with", debug)
    name = found.group(1).decode() if found else "unknown"
    what = f"{_REFUSED_KINDS[name]} ({name})" if name in _REFUSED_KINDS else f"format {name}"
    return f"refused: {what}, not a movie container ({', '.join(CONTAINERS)})"


def probe(path: Path) -> MovieInfo:
    """ffprobe the first video stream; MediaError with ffprobe's own words when it is unusable."""
    require_ffmpeg()
    if regular_file_size(path) == 0:
        raise MediaError("empty file (0 bytes)")
    try:
        meta = ffmpeg.probe(str(path), **_RESTRICTED)
    except ffmpeg.Error as e:
        raise MediaError(_refusal(path, e.stderr)) from None
    videos = [s for s in meta.get("streams", []) if s.get("codec_type") == "video"
              and not s.get("disposition", {}).get("attached_pic")]
    if not videos:
        raise MediaError("no video stream (audio-only or data file)")
    s = videos[0]
    coded_w, coded_h = int(s.get("width") or 0), int(s.get("height") or 0)
    if coded_w <= 0 or coded_h <= 0:
        raise MediaError("video stream has no frame size")
    rotation = _rotation(s)
    sar = _rate(s.get("sample_aspect_ratio", "1:1").replace(":", "/")) or 1.0
    shown_w, shown_h = (coded_h, coded_w) if rotation in (90, 270) else (coded_w, coded_h)
    duration = s.get("duration") or meta.get("format", {}).get("duration")
    avg, real = _rate(s.get("avg_frame_rate")), _rate(s.get("r_frame_rate"))
    nb = s.get("nb_frames")
    bit_rate = s.get("bit_rate") or meta.get("format", {}).get("bit_rate")
    return MovieInfo(
        duration=float(duration) if duration not in (None, "N/A") else None,
        fps=avg or real,
        coded_width=coded_w,
        coded_height=coded_h,
        width=shown_w if rotation in (90, 270) else round(shown_w * sar),
        height=round(shown_h * sar) if rotation in (90, 270) else shown_h,
        rotation=rotation,
        sar=sar,
        codec=s.get("codec_name", "unknown"),
        pix_fmt=s.get("pix_fmt", "unknown"),
        bit_rate=int(bit_rate) if bit_rate not in (None, "N/A") else None,
        header_frames=int(nb) if nb not in (None, "N/A") else None,
        variable_frame_rate=bool(avg and real and abs(avg - real) > 0.01 * real),
        demuxer=meta["format"]["format_name"].split(",")[0],
    )


# -- letterbox ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Crop:
    """A rectangle in the decoded (rotated, not aspect-corrected) picture."""

    x: int
    y: int
    w: int
    h: int


def _grab_gray(path: Path, demuxer: str, at: float, width: int, height: int) -> np.ndarray | None:
    """The key frame at or before `at` seconds, decoded alone. Passthrough timing matters: with the
    default, ffmpeg would decode every frame from that key frame up to `at` and throw them away."""
    try:
        out, _ = (
            _input(path, demuxer, ss=at, noaccurate_seek=None, skip_frame="nokey", threads=1)
            .output("pipe:", vframes=1, format="rawvideo", pix_fmt="gray", an=None, fps_mode="passthrough")
            .global_args("-nostdin", "-hide_banner", "-loglevel", "error")
            .run(capture_stdout=True, capture_stderr=True)
        )
    except ffmpeg.Error:
        return None
    if len(out) < width * height:
        return None
    return np.frombuffer(out[: width * height], np.uint8).reshape(height, width)


def _content_span(levels: np.ndarray, threshold: float) -> tuple[int, int]:
    """First and one-past-last index whose level exceeds the threshold."""
    bright = np.flatnonzero(levels > threshold)
    return (int(bright[0]), int(bright[-1]) + 1) if bright.size else (0, 0)


def detect_letterbox(path: Path, info: MovieInfo, start: float, end: float, samples: int = 9,
                     black_level: float = 32.0) -> Crop | None:
    """Black bars present in every sample frame spread over [start, end]. A row or column is
    content when its mean level exceeds `black_level` in at least one sample, so a dark scene
    does not get cropped as long as one sample shows it lit."""
    w, h = (info.coded_height, info.coded_width) if info.rotation in (90, 270) else (info.coded_width, info.coded_height)
    times = [start + (end - start) * (i + 0.5) / samples for i in range(samples)] if end > start else [start]
    with ThreadPoolExecutor(3) as pool:  # each grab is mostly process start-up: overlap them
        frames = [f for f in pool.map(lambda t: _grab_gray(path, info.demuxer, t, w, h), times) if f is not None]
    if not frames:
        return None
    rows = np.max([f.mean(axis=1) for f in frames], axis=0)
    cols = np.max([f.mean(axis=0) for f in frames], axis=0)
    y0, y1 = _content_span(rows, black_level)
    x0, x1 = _content_span(cols, black_level)
    # Even offsets and sizes keep chroma planes aligned; nothing to crop, or nothing but black: no crop.
    x0, y0 = x0 + x0 % 2, y0 + y0 % 2
    cw, ch = (x1 - x0) // 2 * 2, (y1 - y0) // 2 * 2
    if cw < w / 4 or ch < h / 4 or (cw, ch) == (w - w % 2, h - h % 2):
        return None
    return Crop(x0, y0, cw, ch)


# -- decoding -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """A range of a film's window decoded by an ffmpeg of its own (extract's `--chunk-seconds`),
    which samples there exactly the frames a decode of the whole window samples. `first` and `end`
    (past the last; None: from the window's start, to its end) count the window's 1/fps slots for
    fps sampling, whose frame is the first of each slot (a border between two frames of one slot
    would sample both), and seconds for key frames. Scene cuts cannot be divided: whether a frame
    is taken depends on the last one taken, which may lie in the part before."""

    first: float | None = None
    end: float | None = None


# How far before a part's first frame its ffmpeg seeks, and how far past its end it reads: the
# sampling filter draws the exact borders; this only keeps ffmpeg's own rounding of the seek
# (to its time base's ticks) from cutting a frame the filter would take.
BORDER_MARGIN = 0.05
# ffmpeg's -ss seeks this much earlier still in a container it seeks by decoding time (its guess of
# a B-frame delay, 3/23 s; measured with B-frames: Matroska lands on the key frame before one for
# a seek up to 0.13 s past it, MP4 seeks by presentation time): a part placed after a key frame
# (`Sampling.first_slot_after`) starts this much further from it, so that its seek lands on it.
SEEK_SLACK = 0.15
# How long looking up a film's key frames may take (`key_frames_at`: a seek and one packet per
# time, 0.07 s of CPU for the 119 borders of a 2-hour MP4); a container without an index may be
# read end to end to find them.
KEY_FRAME_TIMEOUT = 20.0


@dataclass(frozen=True)
class Sampling:
    """How frames are chosen: `fps` (uniform in time), `keyframes` or `scenes`."""

    mode: str = "fps"
    fps: float = 1.0
    scene_threshold: float = 0.3
    scene_max_gap: float = 10.0

    def select_filter(self, origin: float = 0.0, until: float | None = None, part: Part | None = None) -> str | None:
        """ffmpeg's select expression. `origin`: where the window starts (the first slot of fps
        sampling), `until`: where it ends (exclusive), `part`: the part of it decoded."""
        if self.mode not in ("fps", "keyframes", "scenes"):
            raise ValueError(f"unknown sampling mode {self.mode!r}")
        if part is not None and self.mode == "scenes":
            raise ValueError("scene-cut sampling cannot be divided into parts")
        terms = [] if until is None else [f"lt(t,{until!r})"]
        if self.mode == "fps":
            # The first frame of every 1/fps-second slot: exact source timestamps, no duplicates.
            # (+0.001 of a slot so that t*fps = 0.9999999 for a frame exactly on a slot edge counts.)
            slot = f"floor((%s-{origin!r})*{self.fps!r}+0.001)"
            terms.insert(0, f"(isnan(prev_selected_t)+gte({slot % 't'}-{slot % 'prev_selected_t'},1))")
            terms += _bounds(slot % "t", part)
        elif self.mode == "scenes":
            # The first frame of every shot, and one every scene_max_gap seconds inside long shots.
            terms.insert(0, f"(isnan(prev_selected_t)+gt(scene,{self.scene_threshold})"
                            f"+gte(t-prev_selected_t,{self.scene_max_gap}))")
        else:  # key frames: the decoder itself skips every other frame
            terms += _bounds("t", part)
        return "*".join(terms) or None

    def position(self, origin: float, time: float) -> float:
        """What a part's bounds are compared with for a frame at `time` (as `decode_frames` gives it):
        its slot (fps), computed as the select expression computes it, or the time itself."""
        return math.floor((time - origin) * self.fps + 0.001) if self.mode == "fps" else time

    def border_time(self, origin: float, bound: float) -> float:
        """Where a part's bound lies in the film: where its slot starts (fps), or the time itself."""
        return origin + (bound - 0.001) / self.fps if self.mode == "fps" else bound

    def first_slot_after(self, origin: float, key_frame: float) -> int:
        """The first fps slot whose border lies far enough past `key_frame` (BORDER_MARGIN and
        SEEK_SLACK) that a part starting there seeks to that key frame (or a later one), not to the
        one before it: the inverse of `border_time`, rounded up."""
        return math.ceil((key_frame + BORDER_MARGIN + SEEK_SLACK - origin) * self.fps + 0.001)


def _bounds(value: str, part: Part | None) -> list[str]:
    """The select terms that keep `value` (a slot or a time) within the part's bounds."""
    if part is None:
        return []
    return ([] if part.first is None else [f"gte({value},{part.first!r})"]) + (
        [] if part.end is None else [f"lt({value},{part.end!r})"])


def key_frames_at(path: Path, demuxer: str, times: list[float]) -> list[float] | None:
    """Where a seek to each of `times` (film seconds, as `decode_frames` counts them) lands: the
    time of the key frame at or before it by the container's index, as a part's ffmpeg finds it.
    One ffprobe seeks to each time in turn and reads one video packet, so a long film costs no
    more than a short one. None when ffprobe fails, takes over KEY_FRAME_TIMEOUT, or answers
    anything but one key frame per time. The seeks read the container's clock, which starts at
    the film's start or a few frames from it: a key frame that close before a time may be missed
    for the one before it, which is never wrong, only further back."""
    if not times:  # no intervals: ffprobe would read every packet
        return []
    intervals = ",".join(f"{t!r}%+#1" for t in times)  # seek to t, read one packet
    try:
        out = subprocess.run(["ffprobe", "-v", "error", *_RESTRICTED_ARGS, "-f", demuxer, "-select_streams", "v:0",
                              "-show_entries", "packet=pts_time,flags:format=start_time", "-of", "json",
                              "-read_intervals", intervals, str(path)],
                             stdin=subprocess.DEVNULL, capture_output=True, timeout=KEY_FRAME_TIMEOUT, check=True)
        answer = json.loads(out.stdout)
        packets, start = answer.get("packets", []), float(answer["format"].get("start_time", 0.0))
        keys = [float(p["pts_time"]) - start for p in packets if p.get("flags", "").startswith("K")]
    except (subprocess.SubprocessError, OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return keys if len(keys) == len(packets) == len(times) and all(map(math.isfinite, keys)) else None


def output_size(info: MovieInfo, crop: Crop | None, max_side: int | None) -> tuple[int, int]:
    """Display size of the (cropped) picture with square pixels, shrunk to fit max_side."""
    w = crop.w if crop else (info.coded_height if info.rotation in (90, 270) else info.coded_width)
    h = crop.h if crop else (info.coded_width if info.rotation in (90, 270) else info.coded_height)
    # Non-square pixels stretch the coded width, which rotation turns into the height.
    if info.rotation in (90, 270):
        h = h * info.sar
    else:
        w = w * info.sar
    scale = min(1.0, max_side / max(w, h)) if max_side else 1.0
    # Even sizes (for chroma subsampling downstream), rounded down so max_side is never exceeded.
    return max(2, int(w * scale / 2 + 1e-6) * 2), max(2, int(h * scale / 2 + 1e-6) * 2)


# showinfo's time base, logged once, and each frame's pts in it: a frame's time is pts x time base,
# computed as the select filter computes its `t` (the pts times the time base as a double), so that
# the slot Python finds for a frame (`Sampling.position`) is the one select chose it by, to the last
# bit. The printed pts_time is not that: ffmpeg 5.1 and 6 print it to 6 significant digits (1234.5678 s
# -> "1234.57": off by up to 5 ms past 1,000 s, 50 ms past 10,000 s), 7.0 to the microsecond, so
# frame ids made from it would differ with the release. pts_time only where no time base was logged.
_TIME_BASE = re.compile(rb"config in time_base:\s*(\d+)/([1-9]\d*)")
_PTS = re.compile(rb"\bpts:\s*(-?\d+)")
_PTS_TIME = re.compile(rb"\bpts_time:\s*(-?[0-9.eE+-]+)")


@dataclass
class DecodeStats:
    returncode: int | None = None
    frames: int = 0  # frames decoded so far
    last_time: float | None = None
    error: str | None = None
    # NVDEC refused the stream (a profile or pixel format it lacks) and ffmpeg decoded it on the CPU
    gpu_refused: bool = False


def decode_frames(path: Path, sampling: Sampling, size: tuple[int, int], crop: Crop | None = None,
                  start: float = 0.0, duration: float | None = None, stats: DecodeStats | None = None,
                  demuxer: str | None = None, decoder: str = "cpu",
                  part: Part | None = None) -> Iterator[tuple[float, np.ndarray]]:
    """Yield (timestamp in seconds from the movie's start, BGR frame) for every sampled frame of
    the window of `duration` seconds (None: to the end) from `start`, or of its `part`.

    One ffmpeg process decodes, samples, crops and scales; Python only receives the frames it
    keeps. `stats` (optional) is filled with ffmpeg's exit code and last error line; `demuxer` (the
    probed one) pins the container, which is anyway one of CONTAINERS. `decoder` "cuda" decodes on
    the GPU (NVDEC, `-hwaccel cuda`): frames come back to memory as decoded and go through the same
    filters, so sampling and timestamps are the CPU's and pixels differ only by the decoders'
    rounding; if the device cannot be opened, ffmpeg fails (no frame, a nonzero exit)."""
    require_ffmpeg()
    stats = stats or DecodeStats()
    width, height = size
    until = None if duration is None else start + duration
    seek, stop = _decoded_span(sampling, start, until, part)
    in_args: dict = {}
    if seek > 0:
        in_args["ss"] = seek
    if stop is not None:
        in_args["t"] = stop - seek + BORDER_MARGIN
    if sampling.mode == "keyframes":
        in_args["skip_frame"] = "nokey"
    if decoder == "cuda":
        in_args["hwaccel"] = "cuda"
    stream = _input(path, demuxer, **in_args).video
    select = sampling.select_filter(start, until, part)
    if select:
        stream = stream.filter("select", select)
    if crop:
        stream = stream.filter("crop", crop.w, crop.h, crop.x, crop.y)
    stream = stream.filter("scale", width, height, flags="area").filter("setsar", 1).filter("showinfo")
    cmd = (
        stream.output("pipe:", format="rawvideo", pix_fmt="bgr24", fps_mode="passthrough")
        # -copyts -start_at_zero: frames keep the film's own times wherever the decode starts
        # (else they count from the seek point), so a part's times and slots are the whole film's.
        .global_args("-nostdin", "-hide_banner", "-loglevel", "info", "-copyts", "-start_at_zero")
        .compile()
    )
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            bufsize=0)
    times: queue.Queue = queue.Queue()
    tail: deque[str] = deque(maxlen=20)
    reader = threading.Thread(target=_read_stderr, args=(proc.stderr, times, tail, stats), daemon=True)
    reader.start()
    frame_bytes = width * height * 3
    try:
        while True:
            buf = _read_exactly(proc.stdout, frame_bytes)
            if buf is None:
                break
            t = times.get()
            if t is None:  # stderr closed before this frame's line: should not happen
                break
            stats.frames += 1
            stats.last_time = t
            yield t, np.frombuffer(buf, np.uint8).reshape(height, width, 3)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        stats.returncode = proc.wait()
        reader.join()
        errors = [ln for ln in tail if "error" in ln.lower() or "invalid" in ln.lower()]
        stats.error = errors[-1] if errors else (tail[-1] if tail else None)


def _decoded_span(sampling: Sampling, start: float, until: float | None,
                  part: Part | None) -> tuple[float, float | None]:
    """Where ffmpeg seeks to and reads until (None: the end) to decode the window from `start`
    until `until`, or its `part`."""
    if part is None:
        return start, until
    seek = start if part.first is None else max(start, sampling.border_time(start, part.first) - BORDER_MARGIN)
    ends = [t for t in (until, None if part.end is None else sampling.border_time(start, part.end)) if t is not None]
    return seek, min(ends, default=None)


def _read_exactly(pipe, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = pipe.read(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


# libavcodec's warning when a hardware decoder cannot set up for a stream, before it decodes in software
_HWACCEL_REFUSED = b"hwaccel initialisation returned error"


def _frame_time(line: bytes, time_base: Fraction | None) -> float:
    """A showinfo line's frame time in seconds, as select's `t` (`TS2D(pts) * av_q2d(time_base)`);
    0 for a frame without one (NOPTS, nan)."""
    pts = _PTS.search(line)
    if pts and time_base is not None:
        return float(int(pts.group(1))) * (time_base.numerator / time_base.denominator)
    try:
        value = float(_PTS_TIME.search(line).group(1))
    except (AttributeError, ValueError):  # none printed, or not a number
        return 0.0
    return value if math.isfinite(value) else 0.0


def _read_stderr(pipe, times: queue.Queue, tail: deque, stats: DecodeStats) -> None:
    """Collect each frame's time from showinfo (its pts in its time base), in order; keep other lines
    for error messages; note NVDEC's refusal of the stream."""
    time_base: Fraction | None = None
    for line in iter(pipe.readline, b""):
        stats.gpu_refused |= _HWACCEL_REFUSED in line
        if b"Parsed_showinfo" in line:
            if b" n:" in line and b" pts:" in line:  # a frame's line
                times.put(_frame_time(line, time_base))
            elif base := _TIME_BASE.search(line):
                time_base = Fraction(int(base.group(1)), int(base.group(2)))
            continue
        text = line.decode(errors="replace").strip()
        if text:
            tail.append(text)
    times.put(None)
    pipe.close()
