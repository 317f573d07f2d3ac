"""Where and how a run computes: device, precision, compilation, processes, loader workers.

Each decision is a small pure function of what it depends on (the GPU's compute
capability and name, the number of GPUs, cores and processes), so that the choices a T4,
a P100 or an H200 would get are tested on a CPU; ``setup_runtime`` reads the machine once
and applies them. ``launch`` starts the same command under torchrun, one process per GPU.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.engine import Dist

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# cuDNN has bf16 convolutions from Ampere (8.0) on; below it torch may still report bf16 as
# "supported" by emulation (torch.cuda.is_bf16_supported's default), which is slow or fails.
BF16_CAPABILITY = (8, 0)
# torch.compile's default backend (inductor) writes Triton kernels, which need Volta (7.0).
TRITON_CAPABILITY = (7, 0)
MAX_DEFAULT_WORKERS = 8  # per process: beyond this the workers contend for the cores


class RuntimeChoiceError(ValueError):
    """A setting this machine cannot run (bf16 or --compile on an older GPU)."""


@dataclass(frozen=True)
class Device:
    """What the decisions below need to know of the machine: None for the CPU."""
    capability: tuple[int, int] | None = None
    name: str = "CPU"
    memory_gib: float = 0.0

    def describe(self) -> str:
        if self.capability is None:
            return self.name
        major, minor = self.capability
        return f"{self.name} (compute capability {major}.{minor}, {self.memory_gib:.0f} GiB)"


def choose_precision(requested: str, device: Device) -> str:
    """auto: bf16 on GPUs with bf16 convolutions, fp16 (with a grad scaler) on older ones,
    fp32 on the CPU. bf16 asked for on an older GPU is an error naming it."""
    if requested not in ("auto", *PRECISIONS):
        raise RuntimeChoiceError(f"unknown precision {requested!r}: auto, fp32, bf16 or fp16")
    gpu = device.capability is not None
    if requested == "auto":
        if not gpu:
            return "fp32"
        return "bf16" if device.capability >= BF16_CAPABILITY else "fp16"
    if requested == "bf16" and gpu and device.capability < BF16_CAPABILITY:
        raise RuntimeChoiceError(
            f"--precision bf16 needs a GPU of compute capability 8.0 or newer (A100, L4, H100, "
            f"RTX 30xx and later); this is {device.describe()}. Use --precision fp16 (trained "
            f"with a grad scaler) or auto, which picks it here.")
    return requested


def check_compile(device: Device) -> None:
    """--compile needs Triton's GPUs (Volta and newer) or the CPU."""
    if device.capability is not None and device.capability < TRITON_CAPABILITY:
        raise RuntimeChoiceError(
            f"--compile needs a GPU of compute capability 7.0 or newer (Triton, which "
            f"torch.compile generates kernels with, does not run below it); this is "
            f"{device.describe()}. Run without --compile.")


def default_workers(cores: int | None, local_processes: int) -> int:
    """Loader workers per process: the machine's cores shared by its processes, at most 8."""
    return max(1, min(MAX_DEFAULT_WORKERS, (cores or 1) // max(1, local_processes)))


def under_torchrun(environ=os.environ) -> bool:
    return "TORCHELASTIC_RUN_ID" in environ or "LOCAL_RANK" in environ


def plan_processes(requested: int | None, gpus: int, started_by_torchrun: bool) -> int:
    """How many processes to start under torchrun: 1 means run here as we are. Without
    --processes, one per GPU when there are several (Kaggle's 2 x T4); under torchrun,
    its --nproc_per_node has decided already."""
    if started_by_torchrun:
        return 1
    if requested is None:
        return gpus if gpus > 1 else 1
    return requested


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None    # None: full fp32
    dist: Dist
    machine: Device = Device()

    @property
    def precision(self) -> str:
        return next(name for name, dtype in PRECISIONS.items() if dtype == self.amp_dtype)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def cuda_device(local_rank: int) -> torch.device:
    """This process's GPU; with more processes than GPUs they share them in turn."""
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def describe_device(device: torch.device) -> Device:
    if device.type != "cuda":
        return Device()
    props = torch.cuda.get_device_properties(device)
    return Device((props.major, props.minor), props.name, props.total_memory / 2**30)


def setup_runtime(d: Dist, precision: str = "auto", compile: bool = False) -> Runtime:
    """The device, the autocast dtype of --precision (fp16 trains with a GradScaler), and
    cuDNN's autotuning (every batch has the same shape, so the fastest kernels are kept)."""
    device = cuda_device(d.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    machine = describe_device(device)
    if compile:
        check_compile(machine)
    chosen = choose_precision(precision, machine)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return Runtime(device, PRECISIONS[chosen], d, machine)


def environment() -> dict:
    """The machine and packages a run ran with: where reproducing a submission starts."""
    versions = {}
    for name in ("torch", "torchvision", "pydicom", "numpy", "pandas", "albumentations"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    here = Path(__file__).resolve().parent if Path(__file__).is_file() else Path.cwd()  # a notebook: none
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), **versions, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "gpu_count": torch.cuda.device_count() if cuda else 0, "git_commit": commit}


def torchrun_command(script: Path, argv: list[str], processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(processes), str(script), *argv]


def notebook_source() -> str:
    """A notebook has no file for torchrun to start: its cells as run so far (the run cell,
    running now, aside) make one, as kernel_bundle.py is made from them."""
    shell = sys.modules["IPython"].get_ipython()
    cells = shell.user_ns["In"][1:-1]
    return "\n\n".join(cells) + '\n\nif __name__ == "__main__":\n    sys.exit(cli())\n'


def launch(script: str | None, argv: list[str], processes: int) -> int:
    """``script argv`` again under torchrun, ``processes`` processes; with no script (a
    notebook's) the notebook's cells make one (notebook_source)."""
    if script is not None:
        return run_torchrun(Path(script).resolve(), argv, processes)
    with tempfile.TemporaryDirectory(prefix="rsna-torchrun-") as folder:
        path = Path(folder) / "kernel_notebook.py"
        path.write_text(notebook_source())
        return run_torchrun(path, argv, processes)


def run_torchrun(script: Path, argv: list[str], processes: int) -> int:
    """Run ``script argv`` under torchrun with ``processes`` processes; its output goes
    through this process's sys.stdout and sys.stderr (where a notebook shows it). Ctrl-C
    (a notebook's interrupt) is passed on once: torchrun runs in a session of its own, so a
    terminal's Ctrl-C reaches this process alone, and torchrun passes it to the ranks, which
    save a checkpoint and stop."""
    # A shell's background job starts with SIGINT ignored, and an ignored signal stays ignored
    # across exec (a single run's own handler takes it back): Ctrl-C must reach torchrun too.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(torchrun_command(script, argv, processes), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, bufsize=1, start_new_session=True)
        threads = [threading.Thread(target=_relay, args=(proc.stdout, sys.stdout), daemon=True),
                   threading.Thread(target=_relay, args=(proc.stderr, sys.stderr), daemon=True)]
        for t in threads:
            t.start()
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    for t in threads:
        t.join()
    return code


def _relay(stream, target) -> None:
    for line in stream:
        target.write(line)
        target.flush()


class _StdoutHandler(logging.StreamHandler):
    """Log lines go to whatever sys.stdout is at the time (a notebook or a test swaps it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def log_to_stdout(*names: str, quiet: bool = False) -> None:
    """The loggers ``names`` (and their children) print their messages as lines on stdout;
    ``quiet`` (torchrun's ranks but 0) shows errors alone. Other libraries' loggers stay as
    they are."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(type(h).__name__ == "_StdoutHandler" for h in logger.handlers):  # cells re-run
            handler = _StdoutHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
        logger.setLevel(logging.ERROR if quiet else logging.INFO)


class StopRequest:
    """Ctrl-C sets a flag that the loop reads at its next check, so the checkpoint it then
    writes is never taken halfway through an update. A second Ctrl-C aborts a plain run;
    under torchrun it does not: a terminal signals every rank and torchrun passes the same
    signal on again, and torchrun itself kills ranks that outlast its shutdown timeout."""

    def __init__(self, distributed: bool = False):
        self.requested, self.distributed = False, distributed

    def __enter__(self):
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and not self.distributed:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        if not self.requested:
            logging.getLogger("kernel").info("\nInterrupted: finishing this step and saving a checkpoint (Ctrl-C again to abort)")
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)
