"""Running a ``cellular`` subcommand: logging, error reporting and exit codes."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import traceback
import warnings
from collections.abc import Iterator

from ._common import EXIT_DATA_ERROR, CommandError, UsageError, cli_wording, error_message
from ._parser import build_parser

# Errors that mean "the library rejected this data or model": reported as a message, no traceback.
_EXPECTED_ERRORS = (CommandError, ValueError, KeyError, TypeError, OSError, IndexError)


@contextlib.contextmanager
def _messages(args: argparse.Namespace) -> Iterator[None]:
    """Log level and warnings for the run, restored afterwards (``main`` may be called in-process)."""
    package_logger = logging.getLogger("cellular")
    if args.quiet:
        level = logging.ERROR
    else:
        level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    detailed = "%(asctime)s %(name)s %(levelname)s: %(message)s"
    handler.setFormatter(logging.Formatter(detailed if args.verbose else "%(levelname)s: %(message)s"))
    previous = package_logger.level, package_logger.propagate
    package_logger.setLevel(level)
    package_logger.propagate = False
    package_logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            if args.quiet:
                warnings.simplefilter("ignore")
            elif not args.verbose:
                # Notices about the dependencies' future APIs are for developers, not for a command's user.
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous[0])
        package_logger.propagate = previous[1]


def _report(error: BaseException, args: argparse.Namespace) -> None:
    if args.debug:
        traceback.print_exception(error, file=sys.stderr)
    message = cli_wording(error_message(error), args.parser)
    if not isinstance(error, _EXPECTED_ERRORS):
        message = (
            f"unexpected {type(error).__name__}: {message}. If this looks like a bug in cellular-sc, please report "
            "it with the traceback"
        )
    hint = "" if args.debug else " (run again with --debug to see the traceback)"
    print(f"{args.parser.prog}: error: {message}{hint}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cellular`` command.

    Parameters
    ----------
    argv
        Arguments without the program name; ``sys.argv[1:]`` when ``None``.

    Returns
    -------
    The exit code: 0 on success, 1 when the data or model is rejected (a one-paragraph message on stderr). Bad
    arguments raise ``SystemExit(2)`` with argparse's usage message, as ``--help`` raises ``SystemExit(0)``.
    """
    args = build_parser().parse_args(argv)
    with _messages(args):
        try:
            return args.handler(args)
        except UsageError as error:
            args.parser.error(str(error))
        except KeyboardInterrupt:
            print(f"{args.parser.prog}: interrupted", file=sys.stderr)
            return 130
        except Exception as error:
            _report(error, args)
            return EXIT_DATA_ERROR
