"""Faults a long run meets, one real scenario each: nothing lost, every failure explained.

1 corrupt data, 2 interruption, 3 nothing overwritten, 4 disk full, 5 garbage in,
6 numerical faults, 7 load (no leak, every file once per epoch).
"""
import errno
import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from factories import ESCAPED_BEFORE, make_ct
from kernel_runs import (RESUMABLE, TINY, cli, kill_at_write, poison_loss, run_kernel, start_kernel,
                         wait_for_checkpoint)
from utils.demo import make_demo_dataset
from utils.labels import LABELS

REAL_MODE = ["--arch", "resnet18", "--image-size", "32", "--epochs", "1", "--workers", "0",
             "--weights", "none"]

pytestmark = pytest.mark.slow  # every test here trains or runs kernel.py


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", n_train_patients=6,
                             n_test_patients=2, seed=5)


@pytest.fixture
def data(demo_data, tmp_path):
    """A private copy of the demo data that a test may damage."""
    return shutil.copytree(demo_data, tmp_path / "data")


def _no_traceback(result):
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


# --- 1. corrupt data ----------------------------------------------------------------------

DAMAGE = {
    "empty": (lambda b: b"", "file is empty"),
    "truncated": (lambda b: b[:300], "truncated"),
    "not dicom": (lambda b: b"<html>not a DICOM file</html>" * 20, "not a DICOM"),
    "short pixels": (lambda b: b[:-1000], "pixel data is short"),
}


def test_corrupt_files_in_train_and_test_are_listed_and_the_run_completes(data, tmp_path):
    labels = pd.read_csv(data / "stage_2_train.csv")["ID"].str[:12].unique()
    sample_ids = pd.read_csv(data / "stage_2_sample_submission.csv")["ID"].str[:12].unique()
    readable = lambda folder, ids: [i for i in ids if (folder / f"{i}.dcm").stat().st_size > 30000]
    damaged = {}
    for split, ids in (("train", labels), ("test", sample_ids)):
        folder = data / f"stage_2_{split}"
        victims = readable(folder, ids)[:len(DAMAGE) + 1]
        for (kind, (damage, reason)), image_id in zip(DAMAGE.items(), victims):
            path = folder / f"{image_id}.dcm"
            path.write_bytes(damage(path.read_bytes()))
            damaged[str(path)] = reason
        missing = folder / f"{victims[-1]}.dcm"
        missing.unlink()
        damaged[str(missing)] = "missing on disk"
    out = tmp_path / "out"
    assert cli("--data-dir", data, "--out-dir", out, *REAL_MODE) == 0  # in this process
    bad = pd.read_csv(out / "bad_files.csv").set_index("path")["reason"]
    for path, reason in damaged.items():
        assert reason in bad[path], (path, bad.get(path))
    metrics = json.loads((out / "metrics.json").read_text())
    n_bad_test = sum("stage_2_test" in p for p in bad.index)
    assert metrics["n_test_predicted_with_prior"] == n_bad_test == 6  # 4 damaged, 1 missing, 1 from the demo
    assert metrics["n_bad_files"] == len(bad) == 12
    sub = pd.read_csv(out / "submission.csv").set_index("ID")["Label"]
    prior = np.clip([metrics["prior"][k] for k in LABELS], 1e-6, 1 - 1e-6)
    for path in (p for p in damaged if "stage_2_test" in p):
        image_id = path.rsplit("/", 1)[1][:-4]
        np.testing.assert_allclose([sub[f"{image_id}_{k}"] for k in LABELS], prior, rtol=1e-6)


def test_damage_that_used_to_stop_a_run_is_listed_and_the_run_completes(data, tmp_path):
    # Each kind raised another exception than DicomError before: one killed the header
    # scan, the others the DataLoader mid-epoch.
    explicit = lambda folder: sorted(p for p in folder.glob("*.dcm")
                                     if b"\x20\x00\x32\x00DS" in p.read_bytes()
                                     and b"\x28\x00\x11\x00US" in p.read_bytes())
    victims = explicit(data / "stage_2_train")[:2] + explicit(data / "stage_2_test")[:1]
    expected = {}
    for path, (damage, reason) in zip(victims, ESCAPED_BEFORE.values()):
        path.write_bytes(damage(path.read_bytes()))
        expected[str(path)] = reason
    out = tmp_path / "out"
    result = run_kernel("--data-dir", data, "--out-dir", out, *REAL_MODE)
    assert result.returncode == 0, result.stderr[-3000:]
    _no_traceback(result)
    bad = pd.read_csv(out / "bad_files.csv").set_index("path")["reason"]
    for path, reason in expected.items():
        assert reason in bad[path], (path, bad.get(path))
        assert f"unreadable: {path}: {reason}" in result.stdout
    sample = pd.read_csv(data / "stage_2_sample_submission.csv")
    sub = pd.read_csv(out / "submission.csv")
    assert sub["ID"].tolist() == sample["ID"].tolist() and sub["Label"].notna().all()
    metrics = json.loads((out / "metrics.json").read_text())
    prior = np.clip([metrics["prior"][k] for k in LABELS], 1e-6, 1 - 1e-6)
    test_id = victims[2].stem
    got = sub.set_index("ID")["Label"]
    np.testing.assert_allclose([got[f"{test_id}_{k}"] for k in LABELS], prior, rtol=1e-6)


# --- 2. interrupted training --------------------------------------------------------------

def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "out"
    proc = start_kernel("--out-dir", out, *RESUMABLE, "--workers", "0")
    wait_for_checkpoint(proc, out / "checkpoints" / "last.pt", epoch=0, batch=2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr[-2000:]
    assert "--resume" in stderr and "checkpoint saved" in stderr and "Traceback" not in stderr
    assert cli("--out-dir", out, *RESUMABLE, "--workers", "0", "--resume") == 0  # in this process
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1, 2]


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path, capsys):
    out = tmp_path / "out"
    folder = out / "checkpoints"
    # a checkpoint after every step: the third write stops before its rename, and is killed
    kill_at_write(out, *RESUMABLE, "--workers", "0", write="last.pt:3", held=folder / "last.pt.held")
    assert torch.load(folder / "last.pt", weights_only=True)["position"]["batch"] == 2  # whole
    unfinished = list(folder.glob("*.tmp"))
    assert len(unfinished) == 1 and torch.load(unfinished[0], weights_only=True)["position"]["batch"] == 3
    assert cli("--out-dir", out, *RESUMABLE, "--workers", "0", "--resume") == 0  # in this process
    assert "Resuming at epoch 1, batch 2" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] in (1, 2)
    assert not list(folder.glob("*.tmp"))  # the killed run's temporary file is cleared


# --- 3. nothing overwritten ---------------------------------------------------------------

def test_finished_run_is_refused_unless_resume_or_overwrite(tiny_run_copy):
    out = tiny_run_copy  # a finished run of *TINY (conftest.py)
    before = (out / "submission.csv").read_bytes()
    refused = run_kernel("--out-dir", out, *TINY)
    assert refused.returncode == 2
    assert "already holds a finished run" in refused.stderr and "submission.csv" in refused.stderr
    _no_traceback(refused)
    assert (out / "submission.csv").read_bytes() == before
    replaced = run_kernel("--out-dir", out, *TINY, "--overwrite", "--seed", "7")
    assert replaced.returncode == 0
    assert (out / "submission.csv").read_bytes() != before


# --- 4. disk full -------------------------------------------------------------------------

def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_writing_a_checkpoint(tmp_path, monkeypatch, capsys):
    import kernel
    from utils import engine
    out = tmp_path / "out"
    real_save, saved = torch.save, []  # the positions of the last.pt files written

    def save_then_fill(obj, f, *a, **k):
        if Path(f).name.startswith("last.pt") and saved:  # the disk fills up during the next one
            with open(f, "wb") as fh:
                fh.write(b"half a checkpoint")
            _enospc()
        real_save(obj, f, *a, **k)
        if Path(f).name.startswith("last.pt"):
            saved.append(dict(obj["position"]))
    monkeypatch.setattr(engine.torch, "save", save_then_fill)
    code = kernel.cli(["--out-dir", str(out), *RESUMABLE, "--workers", "0"])
    assert code == 4
    err = capsys.readouterr().err
    assert "could not write" in err and "last.pt" in err and "No space left" in err
    assert len(saved) == 1 and saved[0]["batch"] > 0  # the first mid-epoch checkpoint is kept whole
    kept = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["position"]
    assert (kept["epoch"], kept["batch"]) == (saved[0]["epoch"], saved[0]["batch"])
    assert not list(out.rglob("*.tmp"))


def test_disk_full_writing_the_submission_keeps_the_previous_one(tiny_run_copy, monkeypatch, capsys):
    import kernel
    from utils import submission
    out = tiny_run_copy  # a finished run of *TINY (conftest.py)
    before = (out / "submission.csv").read_bytes()
    monkeypatch.setattr(submission, "_write_csv", _enospc)
    code = kernel.cli(["--out-dir", str(out), *TINY, "--overwrite", "--seed", "9"])
    assert code == 4
    err = capsys.readouterr().err
    assert "could not write" in err and "submission.csv" in err and "No space left" in err
    assert (out / "submission.csv").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# --- 5. garbage in ------------------------------------------------------------------------

def _rewrite_labels(data, edit):
    path = data / "stage_2_train.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


@pytest.mark.parametrize("edit,message", [
    (lambda lines: ["Id,Value", *lines[1:]], "expected the header"),
    (lambda lines: [lines[0], lines[1].replace(",0", ",7").replace(",1", ",7"), *lines[2:]], "line 2"),
    (lambda lines: [lines[0], lines[1].replace("ID_", "XX_"), *lines[2:]], "line 2"),
    (lambda lines: [lines[0], "ID_../../etc_any,0", *lines[1:]], "ID_../../etc_any"),
])
def test_bad_label_files(data, tmp_path, capsys, edit, message):
    _rewrite_labels(data, edit)
    assert cli("--data-dir", data, "--out-dir", tmp_path / "out", *REAL_MODE) == 2
    err = capsys.readouterr().err
    assert message in err and "stage_2_train.csv" in err and err.startswith("error: ")


class _Payload:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED",))


def test_weights_carrying_code_are_refused(data, tmp_path):
    evil = tmp_path / "resnet18-evil.pth"
    torch.save({"conv1.weight": _Payload()}, evil)
    result = run_kernel("--data-dir", data, "--out-dir", tmp_path / "out", *REAL_MODE[:-2],
                        "--weights", evil, cwd=tmp_path)
    assert result.returncode == 2 and "cannot be loaded as plain weights" in result.stderr
    assert not (tmp_path / "PWNED").exists()
    _no_traceback(result)


def test_weights_of_the_wrong_architecture(data, tmp_path, capsys):
    import torchvision
    wrong = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), wrong)
    assert cli("--data-dir", data, "--out-dir", tmp_path / "out", *REAL_MODE[:-2], "--weights", wrong) == 2
    assert "right --arch" in capsys.readouterr().err


def test_two_windows_with_partial_pretrained_weights_run_and_say_what_was_left_out(data, tmp_path, capsys):
    import torchvision
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items()
             if not k.startswith("layer4.1.")}
    weights = tmp_path / "resnet18-partial.pth"
    torch.save(state, weights)
    out = tmp_path / "out"
    assert cli("--data-dir", data, "--out-dir", out, *REAL_MODE[:-2], "--weights", weights,
               "--weights-strict", "false", "--windows", "brain,subdural") == 0
    stdout = capsys.readouterr().out
    assert "missing keys (first: layer4.1." in stdout and "0 unexpected keys" in stdout
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert best["conv1.weight"].shape[1] == 2


def test_data_dir_without_sample_submission(data, tmp_path, capsys):
    (data / "stage_2_sample_submission.csv").unlink()
    assert cli("--data-dir", data, "--out-dir", tmp_path / "out", *REAL_MODE) == 2
    assert "stage_2_sample_submission.csv" in capsys.readouterr().err


# --- 6. numerical faults ------------------------------------------------------------------

def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    import kernel
    poison_loss(monkeypatch, at=4)
    assert kernel.cli(["--out-dir", str(tmp_path / "out"), *RESUMABLE, "--workers", "0"]) == 3
    err = capsys.readouterr().err
    assert "loss became nan" in err and "--resume" in err and "last.pt" in err
    state = torch.load(tmp_path / "out" / "checkpoints" / "last.pt", weights_only=True)
    assert state["position"]["batch"] == 3  # the three good steps, not the poisoned one
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# --- 7. load ------------------------------------------------------------------------------

def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_loader_reads_every_file_once_per_epoch_without_leaking(tmp_path):
    from utils.data import SliceDataset, make_loader, train_transform
    from utils.engine import ResumableSampler
    n = 3000
    paths = [make_ct(tmp_path / f"{i}.dcm", np.full((16, 16), 1000 + i % 200)) for i in range(n)]
    ds = SliceDataset(paths, size=16, transform=train_transform(), seed=0)
    sampler = ResumableSampler(n, batch_size=64, seed=0)
    rss = []
    for epoch in range(3):
        ds.epoch = epoch
        sampler.set_epoch(epoch)
        seen = np.zeros(n, np.int64)
        for _, _, index, ok in make_loader(ds, 64, workers=3, sampler=sampler):
            np.add.at(seen, index.numpy(), 1)
            assert ok.all()
        assert (seen == 1).all()
        rss.append(_rss_mb())
    assert rss[2] <= rss[0] * 1.10, rss


def test_a_second_run_on_a_folder_in_use_is_refused_and_touches_nothing(tmp_path):
    out = tmp_path / "out"
    first = start_kernel("--out-dir", out, *RESUMABLE, "--workers", "0")
    wait_for_checkpoint(first, out / "checkpoints" / "last.pt", epoch=0, batch=1)
    second = run_kernel("--out-dir", out, *RESUMABLE, "--workers", "0", "--resume")
    assert second.returncode == 2
    assert f"is in use by another run (process {first.pid})" in second.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]  # its writes in flight were left alone
    assert (out / "submission.csv").is_file() and (out / "metrics.json").is_file()
    again = run_kernel("--out-dir", out, *RESUMABLE, "--workers", "0", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]  # free once the first run ended
