"""kernel.py's training step on the CPU: no wait for the device inside a step, one agreed
check every --log-every steps, and a clear message when the GPU's memory runs out."""
import json
import traceback

import pandas as pd
import pytest
import torch

from kernel_runs import TINY, cli

pytestmark = pytest.mark.slow  # every test here trains or runs kernel.py

# 49 training images in batches of 4 (the last partial one dropped): 12 steps an epoch
STEPS = ["--batch-size", "4", "--epochs", "1"]


def test_a_step_never_copies_from_the_device_and_the_checks_come_every_n_steps(tmp_path, monkeypatch):
    import kernel
    inside, reads, checks = [False], [], []
    real_step, real_check = kernel.training_step, kernel.check_in

    def step(*args, **kwargs):
        inside[0] = True
        try:
            return real_step(*args, **kwargs)
        finally:
            inside[0] = False

    def check(*args, **kwargs):
        checks.append(1)
        return real_check(*args, **kwargs)

    # every way a tensor's value reaches Python waits for the device (a host sync on CUDA).
    # The optimizer's own are left out: on the CPU AdamW reads its step count, on CUDA it is
    # fused (a kernel that reads nothing back), which this machine cannot run.
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            if inside[0] and not any("torch/optim/" in f.filename.replace("\\", "/")
                                     for f in traceback.extract_stack()):
                reads.append(f"{_name} at {traceback.extract_stack()[-2].filename}:"
                             f"{traceback.extract_stack()[-2].lineno}")
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, spy)
    monkeypatch.setattr(kernel, "training_step", step)
    monkeypatch.setattr(kernel, "check_in", check)
    out = tmp_path / "out"
    assert cli("--out-dir", out, *TINY, *STEPS, "--log-every", "5") == 0
    assert reads == []
    assert len(checks) == 3  # after steps 5 and 10, and the epoch's last (12)
    history = pd.read_csv(out / "history.csv")
    assert history["train_images_s"].iloc[0] > 0 and history["skipped_steps"].iloc[0] == 0
    assert 0 < history["train_loss"].iloc[0] < 5


def test_the_running_loss_is_the_same_whatever_the_check_interval(tmp_path):
    losses = []
    for every in ("1", "7"):
        out = tmp_path / every
        assert cli("--out-dir", out, *TINY, *STEPS, "--log-every", every) == 0
        losses.append(pd.read_csv(out / "history.csv")["train_loss"].iloc[0])
    assert losses[0] == losses[1]


def test_out_of_gpu_memory_says_which_batch_size_to_use(tmp_path, monkeypatch, capsys):
    import kernel

    def no_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(kernel, "weighted_bce", no_memory)
    out = tmp_path / "out"
    assert cli("--out-dir", out, *TINY, "--batch-size", "8", "--accum", "2") == 2
    err = capsys.readouterr().err
    assert "out of GPU memory at --batch-size 8" in err and "--batch-size 4 --accum 4" in err
    assert json.loads((out / "config.json").read_text())["batch_size"] == 8
