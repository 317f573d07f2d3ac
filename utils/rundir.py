"""The run folder: a folder in use belongs to one process.

Two runs writing one folder mix their files, and a second run's start-up (``--resume``
clears unfinished temporary files) would delete the first one's writes in flight. A run
holds its folder with an operating-system lock (``flock``) on ``OUT/.lock``, released when
the process ends, however it ends (a crash or SIGKILL included), so a stale lock never
needs clearing by hand. Under torchrun rank 0 holds it for all ranks.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; folders are not locked there
    fcntl = None

LOCK_NAME = ".lock"


class FolderInUse(Exception):
    """Another process holds the run folder."""


@contextlib.contextmanager
def exclusive(folder: Path):
    """Hold ``folder`` (created if missing) for this process until the block ends; if
    another process holds it, FolderInUse names that process."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield folder
        return
    with open(folder / LOCK_NAME, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise FolderInUse(f"{folder} is in use by another run (process {holder}); wait for it "
                              f"to end or stop it, or use another --out-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield folder
