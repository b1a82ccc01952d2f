"""The shared ``main(argv)`` of the command-line scripts: logging, flag parsing, one-line errors, exit codes."""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from typing import TextIO

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"

# What a script's body returns: an exit code (None means 0), or the rest of the work as a callable
# that runs after the error handling, so its failures keep their traceback (e.g. sampling).
BodyResult = int | None | Callable[[], int | None]


def setup_logging(*, fmt: str = LOG_FORMAT, stream: TextIO | None = None) -> None:
    """INFO logging to ``stream`` (default stderr), unless the root logger already has handlers."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=fmt, stream=stream)


def one_line(err: BaseException) -> str:
    """The error's message with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(err).split())


def run_script(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], BodyResult],
               argv: Sequence[str] | None, *, logger: logging.Logger,
               errors: tuple[type[BaseException], ...] = (ValueError, OSError)) -> int:
    """Parse ``argv`` and run ``body``; returns the exit code.

    argparse's own exits (bad flags, --help) return their code. ``errors`` raised by ``body`` are
    logged on ``logger`` as one line and return 2; a callable returned by ``body`` runs afterwards,
    outside that handling.
    """
    setup_logging()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse's own errors and --help
        return int(exit_.code or 0)
    try:
        result = body(args)
    except errors as err:  # CheckpointError is a ValueError
        logger.error("%s", one_line(err))
        return 2
    if callable(result):
        result = result()
    return int(result or 0)
