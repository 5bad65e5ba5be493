"""Progress bars that read well in a terminal and in a log.

On a terminal a bar redraws in place as tqdm does by default. When stderr is not a terminal (a
log file, a pipe, a CI job) every redraw is a line of carriage returns in the log, so a bar is
redrawn at most every ``LOG_INTERVAL_S`` seconds and drawn in ASCII.
"""

from __future__ import annotations

import sys

LOG_INTERVAL_S = 60.0


def is_terminal(stream=None) -> bool:
    """Whether ``stream`` (default: stderr, where tqdm draws) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def bar_settings(stream=None) -> dict:
    """tqdm keyword arguments for the current stderr: none on a terminal; in a log, rare ASCII redraws."""
    if is_terminal(stream):
        return {}
    return {"mininterval": LOG_INTERVAL_S, "ascii": True}


def progress_bar(iterable=None, *, progress: bool = True, **kwargs):
    """A tqdm bar (``tqdm.auto``), hidden unless ``progress``, drawn for a terminal or for a log."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not progress, **{**bar_settings(), **kwargs})
