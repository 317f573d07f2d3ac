"""Several processes under torchrun (gloo on the CPU): what the ranks must agree on."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from kernel_runs import ROOT, TINY, kill_at_write
from utils.submission import check_submission_file

pytestmark = pytest.mark.slow


def torchrun(*args, nproc=2, timeout=240, script=ROOT / "kernel.py", cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", str(nproc), str(script), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_a_rank_whose_clock_runs_ahead_does_not_desynchronise_the_checkpoints(tmp_path):
    # Rank 1's clock says a checkpoint is due at every step, rank 0's never: the ranks
    # must still take the same decision (rank 0's), or they enter different collectives
    # and hang. A hang fails here by the timeout.
    out = tmp_path / "out"
    args = ["--out-dir", out, *TINY, "--epochs", "2", "--batch-size", "4", "--ckpt-minutes", "5",
            "--log-every", "1"]
    try:
        result = torchrun(*args, script=ROOT / "tests" / "skewed_clock.py", timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("the ranks hung: they disagreed on when to checkpoint")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    digests = re.findall(r"final weights sha1 ([0-9a-f]{40})", result.stdout)
    assert len(digests) == 2 and digests[0] == digests[1]
    assert (out / "submission.csv").is_file()


def test_a_resume_under_another_number_of_processes_is_refused(tmp_path):
    out = tmp_path / "out"
    args = [*TINY, "--epochs", "2", "--batch-size", "8", "--ckpt-minutes", "0", "--log-every", "1"]
    kill_at_write(out, *args, write="last.pt:3", held=out / "checkpoints" / "last.pt.held")
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["position"]["batch"] == 2
    result = torchrun("--out-dir", out, *args, "--resume")
    assert result.returncode != 0
    assert "--processes 1 (now 2)" in result.stderr, result.stderr[-3000:]
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["position"] == state["position"]


def test_ctrl_c_stops_every_rank_of_a_processes_run_with_a_checkpoint(tmp_path):
    # kernel.py --processes 2 started as from a terminal (its own process group): Ctrl-C
    # reaches kernel.py, which passes it to torchrun, which passes it to the ranks; they
    # agree to stop, rank 0 saves, and the same command with --resume goes on.
    out = tmp_path / "out"
    args = ["--out-dir", out, *TINY, "--epochs", "2", "--batch-size", "4", "--log-every", "1",
            "--ckpt-minutes", "0", "--processes", "2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    # started with SIGINT ignored, as a shell starts a background job (CI's suites are): kernel.py
    # takes it back; an ignored signal would otherwise stay ignored in torchrun and the ranks
    proc = subprocess.Popen([sys.executable, str(ROOT / "kernel.py"), *map(str, args)], cwd=tmp_path, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "last.pt").exists():  # the loop is running: its first check is saved
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "stopped: interrupted at epoch" in rest, rest[-3000:]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["config"]["processes"] == 2
    resumed = subprocess.run([sys.executable, str(ROOT / "kernel.py"), *map(str, args), "--resume"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Resuming at epoch" in resumed.stdout and (out / "submission.csv").is_file()


def test_processes_under_torchrun_must_agree_with_it(tmp_path):
    result = torchrun("--out-dir", tmp_path / "out", *TINY, "--processes", "3")
    assert result.returncode != 0
    assert "--processes 3 under torchrun with 2 processes" in result.stderr


def test_two_processes_train_one_model_and_all_reduce_once_per_accumulated_step(tmp_path):
    # 49 training images, 2 ranks, batches of 4: 6 batches a rank an epoch; --accum 3: 2 steps
    out = tmp_path / "out"
    result = torchrun("--out-dir", out, *TINY, "--batch-size", "4", "--accum", "3", "--context", "1", "--refine",
                      script=ROOT / "tests" / "ddp_probe.py")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # the ranks print at once, their lines may interleave
    counts = sorted(re.findall(r"rank (\d): (\d+) gradient all-reduces in (\d+) batches", result.stdout))
    assert counts == [("0", "2", "6"), ("1", "2", "6")]
    digests = re.findall(r"final weights sha1 ([0-9a-f]{40})", result.stdout)
    assert len(digests) == 2 and digests[0] == digests[1]
    assert result.stdout.count("Validation weighted log loss") == 1  # rank 0 alone reports
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert "weighted_log_loss_refined" in metrics  # --refine ran, on rank 0's gathered rows
    # both refiners, the embedding refiner on features both ranks predicted and gathered
    assert {"weighted_log_loss_refined_logits", "weighted_log_loss_refined_embeddings"} <= set(metrics)
    from utils import embeddings
    val = pd.read_csv(out / "val_predictions.csv")["image_id"]
    features = embeddings.load([out], "val", val)
    assert features.shape == (len(val), 512) and (np.abs(features[np.arange(len(val))]).max(axis=1) > 0).all()
    assert check_submission_file(out / "submission.csv", out / "demo_data" / "stage_2_sample_submission.csv") == []
    assert len(pd.read_csv(out / "val_predictions.csv")) == metrics["n_validation"]
