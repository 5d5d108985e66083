"""The `npconvnext` command: classify, features, evaluate, benchmark, finetune, summary,
download, convert, verify, golden, parity, explain, erf.

parser.py holds the options, commands.py a function per command; `main` runs one. A bad input
never shows a traceback: npconvnext's own errors, OS errors and the commands' refusals are
printed as one line naming the problem, with exit status 1; the other statuses are in
EXIT_CODES (`npconvnext --help` prints them). The command is the program, so it decides what
a library may not: where the library's notes go (stderr, above any progress bar) and how many
threads BLAS runs.
"""

from __future__ import annotations

import logging
import sys
import warnings

from ..batch import describe, shown
from ..errors import NpConvNeXtError
from ..progress import NotesHandler, note
from .commands import (EXIT_CODES, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_SKIPPED, EXIT_USAGE,
                       CommandError)
from .parser import build_parser

__all__ = ["EXIT_CODES", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_SKIPPED", "EXIT_USAGE",
           "CommandError", "build_parser", "main"]

RUNS_THE_MODEL = ("classify", "features", "evaluate", "benchmark", "golden", "parity", "finetune", "explain",
                  "erf")


def show_library_notes(quiet: bool = False) -> None:
    """The library's INFO notes (Numba compiling the kernels on a cold cache, ...) as lines on
    stderr above any progress bar; with --quiet only its warnings."""
    logger = logging.getLogger("npconvnext")
    if not any(isinstance(handler, NotesHandler) for handler in logger.handlers):
        logger.addHandler(NotesHandler())
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def take_the_threads(n: int | None) -> None:
    """The command is the program, so it hands NumPy's BLAS thread count to npconvnext: a batch
    is then shared out image by image (engine/threads.py), which a library may not do unasked.
    n: --threads; None keeps Numba's count (NPCONVNEXT_NUM_THREADS, if set, is already in it)."""
    import numba

    from ..engine.threads import set_num_threads

    set_num_threads(n or numba.get_num_threads())


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning as one line on stderr above any progress bar (not two lines of source)."""
    note(f"warning: {shown(str(message))}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show_library_notes(args.quiet)
    try:
        with warnings.catch_warnings():  # put back as they were when the command is done
            warnings.showwarning = show_warning
            if args.command in RUNS_THE_MODEL:
                take_the_threads(args.threads)
            status = args.run(args)
    # NpConvNeXtError is npconvnext's refusal of a bad input; plain ValueError and RuntimeError
    # are still raised for some (an unknown model name, an unreachable hub)
    except (CommandError, NpConvNeXtError, ValueError, RuntimeError, OSError) as exc:
        print(f"npconvnext {args.command}: error: {shown(describe(exc))}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"npconvnext {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK if status is None else status


if __name__ == "__main__":
    sys.exit(main())
