"""Write a file (or a folder) so that a crash, a kill or a full disk never leaves half of it.

Every output, cache, checkpoint and the demo dataset go through ``atomic_write``: the
content goes to a temporary name, unique, in the same folder (two runs writing the same
cache never share it), is flushed to disk, then renamed over the old one in one step.
"""
from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path

# Tests kill a run in the middle of a write, deterministically: with HOLD_ENV set to
# "NAME:N" the Nth write of a file called NAME stops after its temporary file is complete,
# drops a "<NAME>.held" marker beside it, and waits there to be killed.
HOLD_ENV = "RSNA_TEST_HOLD_WRITE"
_writes: dict[str, int] = {}


def temporary_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write(path, write) -> Path:
    """``write(tmp)`` writes the content to the path it is given (a file, or a folder that
    ``path`` must not already be); then it replaces ``path``.

    On any failure the temporary file is removed and ``path`` is left as it was. Under
    torchrun only rank 0 may call it: the callers check, so that no write is skipped silently.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)  # a file's data, or a folder's entries
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _hold_if_asked(path)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    return path


def _hold_if_asked(path: Path) -> None:
    spec = os.environ.get(HOLD_ENV)
    if not spec:
        return
    name, _, nth = spec.rpartition(":")
    if path.name != name:
        return
    _writes[name] = _writes.get(name, 0) + 1
    if _writes[name] == int(nth):
        path.with_name(path.name + ".held").touch()
        while True:
            time.sleep(1)
