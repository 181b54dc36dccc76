"""The error a user's mistake raises, and how the `depmatch` command reports it.

A `UserError` is a mistake in what the user gave: a config key or value, a path that does not
exist, a file whose content is wrong. Its message names the file or key and the fix; the command
prints it as one line `error: ...` and exits with status 2, without a traceback (`--debug` shows
it). Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

USER_ERROR_STATUS = 2  # the status argparse gives a command-line mistake


class UserError(Exception):
    """A mistake in the user's input; the message names the file or key and the fix."""


class EveryRankError(Exception):
    """Raised by every rank of a run at the same point, after a collective told them all: the ranks
    can still take part in one more collective, the checkpoint saved before the run ends."""


def run_reporting_user_errors(command: Callable[[], int], debug: bool = False) -> int:
    """`command()`'s status; a user error (or a missing file) becomes one line on stderr and status 2."""
    try:
        return command()
    except (UserError, FileNotFoundError) as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return USER_ERROR_STATUS
