"""The one base class of every error mhmd expects (bad input, missing weights, a refused file).

Such an error's message is one line that names the file or option and says what to do; the CLI
catches `MhmdError` once and prints it. Anything else is a bug and keeps its traceback.
"""


class MhmdError(Exception):
    """An expected failure, told to the user in one line."""


class InputError(MhmdError, ValueError):
    """Input or settings that cannot be used: a stage not run yet, a value out of range, a file of
    the wrong kind."""


MAX_LISTED = 20  # problems shown in one message; a file with thousands would bury the first ones


def listing(problems: list[str]) -> str:
    """The first MAX_LISTED problems, one a line, and how many more there are."""
    lines = problems[:MAX_LISTED]
    if len(problems) > MAX_LISTED:
        lines.append(f"... and {len(problems) - MAX_LISTED} more")
    return "\n".join(lines)
