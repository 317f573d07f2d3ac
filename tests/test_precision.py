"""--precision on the CPU: bf16 and fp16 autocast, fp16's grad scaler through a kill and a
resume, its skipped steps counted and a NaN that stays stopping the run; and the
environment every run records."""
import json
import platform
import re

import numpy as np
import pandas as pd
import pytest
import torch

from kernel_runs import RESUMABLE, TINY, cli, kill_at_write, poison_loss, run_kernel
from utils.labels import LABELS
from utils.metrics import weighted_log_loss


@pytest.mark.slow
def test_bf16_trains_end_to_end_and_the_run_records_its_environment(tmp_path):
    out = tmp_path / "out"
    assert cli("--out-dir", out, *TINY, "--precision", "bf16") == 0  # in this process
    config = json.loads((out / "config.json").read_text())
    assert config["precision"] == "bf16"
    env = config["environment"]
    assert env["python"] == platform.python_version() and torch.__version__.startswith(env["torch"])
    assert env["gpu_count"] == torch.cuda.device_count() and env["pandas"] == pd.__version__
    assert env["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", env["git_commit"])
    metrics = json.loads((out / "metrics.json").read_text())
    val = pd.read_csv(out / "val_predictions.csv")  # the bf16 model's probabilities, scored again
    y, p = val[list(LABELS)].to_numpy(), val[[f"pred_{k}" for k in LABELS]].to_numpy()
    assert metrics["weighted_log_loss"] == pytest.approx(weighted_log_loss(y, p))
    assert np.isfinite(p).all() and ((p > 0) & (p < 1)).all()


@pytest.mark.slow
def test_fp16_with_its_scaler_resumes_a_killed_run_exactly(tmp_path):
    # one epoch (fp16 is slow on the CPU): the kill and the resume fall in the first epoch
    # either way, and crossing an epoch after a resume is test_kernel's sigkill test
    args = [*RESUMABLE, "--epochs", "1", "--workers", "0", "--precision", "fp16",
            "--header-cache", tmp_path / "cache"]
    straight = run_kernel("--out-dir", tmp_path / "a", *args)
    assert straight.returncode == 0, straight.stderr[-3000:]
    state = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0  # the scaler's state travels in the checkpoint
    out = tmp_path / "b"
    kill_at_write(out, *args, write="last.pt:4", held=out / "checkpoints" / "last.pt.held")
    resumed = run_kernel("--out-dir", out, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming at epoch 1, batch 3" in resumed.stdout
    ha, hb = pd.read_csv(tmp_path / "a" / "history.csv"), pd.read_csv(out / "history.csv")
    assert hb["train_loss"].tolist() == ha["train_loss"].tolist()
    assert (tmp_path / "a" / "submission.csv").read_bytes() == (out / "submission.csv").read_bytes()


@pytest.mark.slow
def test_under_fp16_a_nan_loss_is_a_step_the_scaler_skips_and_counts(tmp_path, monkeypatch):
    # fp16 overflows now and then; the grad scaler skips that step and lowers its scale.
    # That is no reason to stop, but it is counted.
    poison_loss(monkeypatch, at=3)
    out = tmp_path / "out"
    # one epoch of 6 steps: the poisoned third and three after it (no checkpoint per step needed)
    assert cli("--out-dir", out, *TINY, "--batch-size", "8", "--precision", "fp16") == 0
    skipped = pd.read_csv(out / "history.csv")["skipped_steps"].sum()
    assert skipped >= 1
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    # the scaler halves its scale at each step it skips (and grows it only every 2000): the
    # steps counted are the steps it skipped
    assert state["scaler"]["scale"] == 65536.0 / 2 ** skipped
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_under_fp16_a_loss_that_stays_nan_stops_cleanly(tmp_path, monkeypatch, capsys):
    import kernel
    monkeypatch.setattr(kernel, "MAX_SKIPPED_IN_A_ROW", 3)
    poison_loss(monkeypatch, at=3, and_after=True)
    assert cli("--out-dir", tmp_path / "out", *RESUMABLE, "--workers", "0", "--precision", "fp16") == 3
    assert "3 fp16 steps in a row" in capsys.readouterr().err
    state = torch.load(tmp_path / "out" / "checkpoints" / "last.pt", weights_only=True)
    # checkpoints after the skipped steps 3 and 4 (nothing was stepped); step 5 made it 3 in a row
    skipped = state["position"]["skipped_steps"]
    assert state["position"]["batch"] == 4 and skipped >= 2
    assert state["scaler"]["scale"] == 65536.0 / 2 ** skipped
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("value", ["fp8", "half"])
def test_unknown_precision_is_refused(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        cli("--out-dir", tmp_path, "--precision", value)
    assert exit_.value.code == 2 and "--precision must be auto, fp32, bf16 or fp16" in capsys.readouterr().err
