"""The one base class of every error mhmd expects (bad input, missing weights, a refused file).

Such an error's message is one line that names the file or option and says what to do; the CLI
catches `MhmdError` once and prints it. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
import os

# OS errors a user can fix where they are (free space, another folder, permissions): told in one
# line naming the path, not as a traceback.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


class MhmdError(Exception):
    """An expected failure, told to the user in one line."""


class InputError(MhmdError, ValueError):
    """Input or settings that cannot be used: a stage not run yet, a value out of range, a file of
    the wrong kind."""


class DamagedFileError(MhmdError):
    """A file of the work directory that cannot be read (truncated, overwritten): the message names
    it and the command that writes it again."""


class StorageError(MhmdError):
    """The file system refused a read or write: full, read-only, or not permitted."""


def storage_error(error: BaseException, where: object = None) -> StorageError | None:
    """The one-line StorageError for an OS error the user can fix (no space, read-only, permission),
    naming the path (the error's own, else `where`); None for any other error."""
    if not isinstance(error, OSError) or error.errno not in STORAGE_ERRNOS:
        return None
    return StorageError(f"{error.filename or where or 'a file'}: {os.strerror(error.errno)}")


def first_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


MAX_LISTED = 20  # problems shown in one message; a file with thousands would bury the first ones


def listing(problems: list[str]) -> str:
    """The first MAX_LISTED problems, one a line, and how many more there are."""
    lines = problems[:MAX_LISTED]
    if len(problems) > MAX_LISTED:
        lines.append(f"... and {len(problems) - MAX_LISTED} more")
    return "\n".join(lines)
