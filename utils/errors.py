"""The errors that end a command, each with its exit code; raised where they arise, turned
into one line on stderr and the code by kernel.py's ``cli``, never a traceback."""
from __future__ import annotations

import contextlib
from pathlib import Path

EXIT_USAGE = 2    # a user mistake: bad option, bad data folder, bad weights
EXIT_STOPPED = 3  # training stopped early: interrupted, or the loss diverged
EXIT_OUTPUT = 4   # an output could not be written


class UserError(Exception):
    """A problem with the user's input: printed as one message, exit code 2."""


class TrainingStopped(Exception):
    """Training ended early on purpose (Ctrl-C) or by a fault (a NaN loss): exit code 3."""


class OutputError(Exception):
    """An output could not be written (a full disk, a read-only folder): exit code 4. The
    previous version of the file, if any, is still in place: every write is atomic."""


@contextlib.contextmanager
def writing(path: Path):
    """An OSError inside the block is an OutputError naming ``path``."""
    try:
        yield
    except OSError as err:
        raise OutputError(f"could not write {path}: {err.strerror or err}") from err
