"""Write a file so that a crash, a kill or a full disk never leaves half of it behind.

Every output and cache goes through ``atomic_write``: the content goes to a temporary
file with a unique name in the same folder (two runs writing the same cache never share
it), is flushed to disk, then renamed over the old file in one step.
"""
from __future__ import annotations

import os
import secrets
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
    """``write(tmp)`` writes the content to the path it is given; then it replaces ``path``.

    On any failure the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _hold_if_asked(path)
        os.replace(tmp, path)
    except BaseException:
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
