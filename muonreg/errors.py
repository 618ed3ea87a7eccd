"""Errors a user can cause and fix (configuration, data, tracking store), and how they are shown.

A user error is reported as one line that says what is wrong and where, without a Python
traceback: the traceback of a bad override or a truncated file only hides the message.
`HYDRA_FULL_ERROR=1` (the switch Hydra users know) brings the full traceback back, for the CLIs too.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.errors import CompactHydraException

TRACEBACK_SWITCH = "HYDRA_FULL_ERROR"


class UserError(Exception):
    """A problem in what the user gave us (config, data, tracking store); the message names it."""


class ReportedError(CompactHydraException):
    """A user error on its way out of Hydra, which prints compact exceptions as their message only."""


def full_traceback() -> bool:
    return os.environ.get(TRACEBACK_SWITCH) == "1"


def one_line(err: BaseException) -> str:
    """The error's message on one line; an error re-raised from a DataLoader worker carries the
    worker's traceback in its message, whose last line is the original message."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(f"{type(err).__name__}: ", 1)[-1]
    return " ".join(text.split("\n"))


def root_cause(err: BaseException) -> str:
    """What a chain of wrapped library errors comes down to, on one line (e.g. "database is
    locked" rather than an MlflowException quoting SQLAlchemy quoting the SQL)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


@contextmanager
def hydra_user_errors() -> Iterator[None]:
    """In Hydra's task function: a user error leaves as a one-line ReportedError."""
    try:
        yield
    except UserError as err:
        if full_traceback():
            raise
        raise ReportedError(f"error: {one_line(err)}") from None


@contextmanager
def exit_on_user_errors() -> Iterator[None]:
    """In a command-line tool, or a Hydra callback (Hydra would only warn and go on): a user error
    exits with status 1 and its one-line message (or its traceback, with the switch on)."""
    try:
        yield
    except UserError as err:
        if full_traceback():
            traceback.print_exc()
            raise SystemExit(1) from None
        raise SystemExit(f"error: {one_line(err)}") from None
