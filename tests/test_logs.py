import io
import logging
import sys

from mhmd_builder import logs
from mhmd_builder.logs import progress_bar

from conftest import Terminal


def test_a_progress_bar_is_drawn_on_a_terminal_only_and_not_under_q(monkeypatch):
    for stderr, quiet, drawn in ((Terminal(), False, True), (io.StringIO(), False, False), (Terminal(), True, False)):
        monkeypatch.setattr(sys, "stderr", stderr)
        logs.show_notices(logging.ERROR if quiet else logging.INFO)
        try:
            assert list(progress_bar(iter("abc"), "films read", "film", 3)) == ["a", "b", "c"]
        finally:
            logs.finish(0)
        assert ("films read:   0%" in stderr.getvalue() and "0/3" in stderr.getvalue()) == drawn
