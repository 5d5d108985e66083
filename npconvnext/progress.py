"""Progress bars and notes for long work, the way the Python ecosystem shows them: tqdm.

tqdm writes its bars to stderr, redraws them in place on a terminal, and `tqdm.write` prints a
line above the bars instead of into them; so every note and warning printed while work runs goes
through `note` (or the `npconvnext` logger with `NotesHandler`), and a bar never breaks. A bar is
shown only where someone watches it: stderr is a terminal (or NPCONVNEXT_PROGRESS is set, for
tests and logs that want them) and the caller has not asked for quiet.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from tqdm import tqdm


def interactive() -> bool:
    """Whether progress bars are wanted on stderr: a terminal, or NPCONVNEXT_PROGRESS set."""
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):  # stderr replaced or closed
        tty = False
    return tty or bool(os.environ.get("NPCONVNEXT_PROGRESS"))


def bar(total: int | None, description: str, unit: str = "image", quiet: bool = False) -> tqdm:
    """A tqdm bar on stderr counting `total` units, disabled (a no-op) unless interactive and
    not quiet. Use it as a context manager; `update(n)` adds n done."""
    return tqdm(total=total, desc=description, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False,
                disable=quiet or not interactive())


def byte_bar(total: int | None, description: str, quiet: bool = False) -> tqdm:
    """A `bar` counting bytes, shown as kB, MB, GB of 1000 (update(n) adds n bytes)."""
    return tqdm(total=total, desc=description, unit="B", unit_scale=True, file=sys.stderr,
                dynamic_ncols=True, leave=False, disable=quiet or not interactive())


def note(message: str) -> None:
    """A line on stderr that never lands inside a progress bar."""
    tqdm.write(message, file=sys.stderr)


def write(line: str) -> None:
    """A line of results on stdout, above any progress bar (on a terminal both share the screen)."""
    tqdm.write(line, file=sys.stdout)


def counter(progress_bar: tqdm) -> Callable[[int, int], None]:
    """A `progress(done, total)` callback (as distributed.jobs.run takes) that moves the bar."""

    def progress(done: int, total: int) -> None:
        if progress_bar.total != total:
            progress_bar.total = total
        progress_bar.update(done - progress_bar.n)

    return progress


class NotesHandler(logging.Handler):
    """The `npconvnext` logger's records as lines on stderr, above any progress bar; not those
    logged with extra={"result": True}, results a command prints on stdout itself."""

    def __init__(self, prefix: str = "npconvnext: ", level: int = logging.NOTSET):
        super().__init__(level)
        self.prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "result", False):
            return
        try:
            note(f"{self.prefix}{record.getMessage()}")
        except Exception:  # as logging.StreamHandler does: a broken stderr must not stop the work
            self.handleError(record)
