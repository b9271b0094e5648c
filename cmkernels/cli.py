"""What the command lines (train, sample, evaluate) share: one way to report an error.

Bad input ends a command with one line on stderr, `<prog>: error: <message>`, and exit status 2
(argparse's own format and status, used for every error, not only for bad flags). Tracebacks are
shown only with `--debug` or the environment variable CMKERNELS_TRACEBACK=1. An exception that is
not a user error (a bug) also prints one line, says so, and exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

TRACEBACK_ENV = "CMKERNELS_TRACEBACK"
USAGE_ERROR = 2  # bad input (argparse's status)
INTERNAL_ERROR = 1  # a failure that is not the user's
INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class UserError(ValueError):
    """Bad input or a failed precondition, reported in one line (a hint may follow a ';')."""


def one_line(message: object) -> str:
    """A message on one line: its lines joined with '; ', runs of spaces kept as they are."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return "; ".join(lines) or type(message).__name__


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and the shared --debug flag."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--debug",
            action="store_true",
            help=f"show the full traceback of an error (also: {TRACEBACK_ENV}=1)",
        )

    def error(self, message: str):
        if "expected one argument" in message:
            # "--ts -1,22": argparse takes a value starting with '-' for a flag.
            message += " (a value that starts with '-' is written --flag=VALUE)"
        fail(self.prog, message)


def fail(prog: str, message: object, status: int = USAGE_ERROR):
    """Print `<prog>: error: <message>` on one line and exit with `status`."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(status)


# The exception types that mean bad input or an unusable file rather than a bug. Our own error
# types (TrainingError, CheckpointError, ...) derive from these.
USER_ERRORS = (ValueError, OSError, ImportError, KeyError)


def run(prog: str, body: Callable[[], object], argv: Sequence[str] | None = None,
        user_errors: tuple[type[BaseException], ...] = USER_ERRORS):  # fmt: skip
    """Call body() and turn its exceptions into one-line errors (SystemExit); return its result.

    user errors: exit status 2; KeyboardInterrupt: 130; anything else: 1, named a bug. With
    --debug in argv (or CMKERNELS_TRACEBACK=1) exceptions propagate with their traceback.
    """
    if debug_requested(argv):
        return body()
    try:
        return body()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        fail(prog, "interrupted", INTERRUPTED)
    except user_errors as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        fail(prog, message)
    except Exception as exc:
        fail(prog, f"internal error {type(exc).__name__}: {one_line(exc)} (a bug: please "
             "report it with the traceback of --debug)", INTERNAL_ERROR)  # fmt: skip
