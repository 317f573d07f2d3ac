"""utils.rundir: a run folder in use belongs to one process, until that process ends."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from utils.rundir import FolderInUse, exclusive

ROOT = Path(__file__).resolve().parents[1]


def test_a_held_folder_is_refused_naming_its_holder_and_free_once_released(tmp_path):
    out = tmp_path / "run"
    with exclusive(out):
        assert out.is_dir()
        with pytest.raises(FolderInUse, match=f"in use by another run \\(process {os.getpid()}\\)"):
            with exclusive(out):
                pass
    with exclusive(out):  # released at the end of the block
        pass


def test_the_lock_of_a_killed_process_is_released_by_the_system(tmp_path):
    out = tmp_path / "run"
    code = ("import sys, time; from utils.rundir import exclusive\n"
            "with exclusive(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUse, match=f"process {holder.pid}\\)"):
            with exclusive(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with exclusive(out):  # no stale lock to clear by hand
        pass


@pytest.mark.parametrize("mode", [[], ["--predict", "SCANS", "--checkpoint", "best.pt"]])
def test_kernel_refuses_a_folder_in_use_before_writing_anything(tmp_path, capsys, mode):
    from kernel_runs import TINY, cli
    out = tmp_path / "out"
    args = [a.replace("SCANS", str(tmp_path)) for a in mode]
    with exclusive(out):
        assert cli("--out-dir", out, *TINY, *args) == 2
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    assert f"is in use by another run (process {os.getpid()})" in capsys.readouterr().err
