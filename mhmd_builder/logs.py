"""Where a command's words go: results on stdout (the CLI prints them), notices and progress on
stderr, and every record of INFO and above appended to the work directory's log, W/mhmd.log.

Modules that warn log through `logging.getLogger(__name__)`; the CLI installs the handlers for one
command's duration (`show_notices`, `log_to`) and removes them at its end (`finish`). Used as a
library, mhmd adds no handler: warnings reach stderr through Python's last-resort handler.
"""
from __future__ import annotations

import logging
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

from . import __version__

LOG_NAME = "mhmd.log"  # in the work directory
FILE_ONLY = {"file_only": True}  # a record's extra= when it is already on stdout, or is for the log alone

log = logging.getLogger(__name__)
_package = logging.getLogger(__package__)
_handlers: list[logging.Handler] = []  # what this command installed on the package's logger
_started = time.monotonic()


class OneLine(logging.Formatter):
    """A record on one line, whatever its message or traceback holds: the log reads line by line."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " | ")


class AppendHandler(logging.Handler):
    """One `os.write` per record on a file opened with O_APPEND: each record lands whole at the
    file's end, so records of processes writing the same log at once never interleave in a line."""

    def __init__(self, path: Path):
        super().__init__(logging.INFO)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.setFormatter(OneLine("%(asctime)s pid %(process)d %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(self.fd, (self.format(record) + "\n").encode())
        except Exception:  # noqa: BLE001 - logging's own rule: a failed record never breaks the command
            self.handleError(record)

    def close(self) -> None:
        if self.fd is not None:  # logging closes every handler again at exit: never close a reused fd
            os.close(self.fd)
            self.fd = None
        super().close()


class StderrHandler(logging.Handler):
    """Notices on stderr, written through tqdm so that they do not tear its progress bars; records
    marked FILE_ONLY stay off it."""

    def __init__(self, level: int):
        super().__init__(level)
        self.addFilter(lambda record: not getattr(record, "file_only", False))

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def _install(handler: logging.Handler) -> None:
    _handlers.append(handler)
    _package.addHandler(handler)


def show_notices(level: int) -> None:
    """Notices at `level` and above on stderr for this command: INFO by default, ERROR with -q,
    DEBUG with -v."""
    global _started
    _started = time.monotonic()
    _package.setLevel(logging.DEBUG)  # each handler filters by its own level
    _install(StderrHandler(level))


def bars_disable() -> bool | None:
    """tqdm's `disable` for this command's progress bars: None (drawn on a terminal only), or True
    under -q."""
    quiet = any(h.level > logging.INFO for h in _handlers if isinstance(h, StderrHandler))
    return True if quiet else None


def progress_bar(items, description: str, unit: str, total: int | None = None) -> tqdm:
    """A bar over `items` while a command works through them, on stderr as the command's other bars
    (`bars_disable`), removed when it ends."""
    return tqdm(items, desc=description, total=total, unit=unit, leave=False, disable=bars_disable())


def versions() -> str:
    """mhmd's, Python's and torch's versions (torch's without importing it: that takes seconds)."""
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "not installed"
    return f"mhmd {__version__}, Python {platform.python_version()}, torch {torch}"


def log_to(workdir: Path, command: str) -> None:
    """Append this command's records to WORKDIR/mhmd.log, starting with its command line and the
    versions. A log that cannot be written (a read-only work directory) is no error, and only said
    with -v: reading such a directory must still work, and a command that writes it fails anyway,
    with its own one-line error."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        _install(AppendHandler(workdir / LOG_NAME))
    except OSError as e:
        log.debug("no log written: %s: %s", workdir / LOG_NAME, e.strerror)
        return
    log.info("start: %s", command, extra=FILE_ONLY)
    log.info("versions: %s", versions(), extra=FILE_ONLY)


def finish(status: int, error: str | None = None) -> None:
    """Log how the command ended, then remove its handlers."""
    if not _handlers:  # it ended before `show_notices` (an unknown command): nothing to log or remove
        return
    if error:
        log.error("error: %s", error, extra=FILE_ONLY)  # the CLI shows it on stderr itself
    log.info("end: exit %d after %.1f s", status, time.monotonic() - _started, extra=FILE_ONLY)
    while _handlers:
        handler = _handlers.pop()
        _package.removeHandler(handler)
        handler.close()
    _package.setLevel(logging.NOTSET)
