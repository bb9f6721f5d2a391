"""Errors the user can fix from the message alone, and how entry points report them.

A `UserError` says what is wrong and what to do (the file, option or value, what was
expected). `python -m bita.run`, `python -m bita.caption` and the tools print it as one line
and exit with status 2; anything else is a bug and keeps its traceback. The full traceback
of a user error still goes to every log file the process writes (a run's
`<run folder>/run.log`), and `BITA_FULL_ERROR=1` prints it on the console too.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_USER_ERROR = 2

log = logging.getLogger("bita")
Main = TypeVar("Main", bound=Callable[..., object])


class UserError(Exception):
    """Bad input, a bad setting or a damaged file that the message names."""


class ConfigError(UserError, ValueError):
    """A config option with a value of the wrong type or out of its range."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the command needs is not there."""


def _log_to_files(err: UserError) -> None:
    """Write the traceback to the file handlers only: the console gets one line."""
    record = log.makeRecord(
        log.name, logging.ERROR, __file__, 0, str(err), (), (type(err), err, err.__traceback__)
    )
    for handler in logging.getLogger().handlers + log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def reports_user_errors(main: Main) -> Main:
    """Wrap an entry point: a `UserError` becomes `error: MESSAGE` on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            if os.environ.get("BITA_FULL_ERROR") == "1":
                raise
            _log_to_files(err)
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapped
