"""Running kernel.py in a subprocess, as a user would, for the end-to-end tests."""
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--demo-patients", "6", "--arch", "resnet18", "--image-size", "32", "--epochs", "1",
        "--workers", "0"]


def run_kernel(*args, cwd=ROOT, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "kernel.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


# A checkpoint after every step (resnet18 with its optimizer state is 135 MB, so few steps):
# 49 training images in batches of 8 are 6 steps an epoch.
RESUMABLE = ["--demo-patients", "6", "--arch", "resnet18", "--image-size", "32", "--epochs", "2",
             "--batch-size", "8", "--ckpt-minutes", "0", "--log-every", "1"]


def wait_for_checkpoint(proc, ckpt, epoch, batch, timeout=300):
    """Poll the atomically replaced last.pt until it records (epoch, >= batch)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ckpt.is_file():
            try:
                pos = torch.load(ckpt, weights_only=True)["position"]
            except (RuntimeError, EOFError, OSError):
                pos = None  # replaced while being read: try again
            if pos and pos["epoch"] == epoch and pos["batch"] >= batch:
                return pos
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at epoch {epoch} batch {batch}: {proc.poll()}")


def cli(*args) -> int:
    """kernel.py's command line in this process: fast for the checks that fail early."""
    import kernel
    return kernel.cli([str(a) for a in args])


def start_kernel(*args, env=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.Popen([sys.executable, str(ROOT / "kernel.py"), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def kill_at_write(out, *args, write: str, held: Path, timeout: float = 300):
    """Start kernel.py, let it stop at its write ``write`` ("NAME:N", utils.atomic's hold
    point: the file written but not renamed), and SIGKILL it there."""
    import signal

    from utils.atomic import HOLD_ENV
    proc = start_kernel("--out-dir", out, *args, env={HOLD_ENV: write})
    deadline = time.monotonic() + timeout
    while not held.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def poison_loss(monkeypatch, at: int, and_after: bool = False) -> None:
    """Make kernel's training loss NaN at its ``at``-th batch (and every later one)."""
    import kernel
    real, calls = kernel.weighted_bce, []

    def poisoned(logits, target, mask):
        calls.append(1)
        loss = real(logits, target, mask)
        return loss * float("nan") if len(calls) == at or (and_after and len(calls) > at) else loss
    monkeypatch.setattr(kernel, "weighted_bce", poisoned)
