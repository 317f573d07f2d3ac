"""End-to-end runs of kernel.py on the synthetic demo data, and its command-line contract."""
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from factories import make_corrupt_rle
from kernel_runs import RESUMABLE, TINY, cli, run_kernel, start_kernel, wait_for_checkpoint
from utils.labels import LABELS
from utils.submission import check_submission_file

# tiny_run (conftest.py): one finished run of *TINY for the session, read only


@pytest.mark.slow
def test_tiny_demo_writes_every_output(tiny_run):
    out, result = tiny_run
    for name in ("submission.csv", "metrics.json", "config.json", "split.csv",
                 "val_predictions.csv", "bad_files.csv", "history.csv", "label_report.csv",
                 "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.tmp"))
    data = out / "demo_data"
    for name in ("stage_2_train.csv", "stage_2_sample_submission.csv", "stage_2_train", "stage_2_test"):
        assert (data / name).exists()
    assert "dropped 12 identical repeated rows" in result.stdout
    for name in ("report.html", "labels.png", "examples.png", "training.png", "dicom_headers.png",
                 "dicom_headers.csv"):
        assert (out / "report" / name).stat().st_size > (200 if name.endswith(".csv") else 5000), name


@pytest.mark.slow
def test_report_command_redraws_a_run_s_report(tiny_run_copy, capsys):
    out = tiny_run_copy
    (out / "report" / "examples.png").unlink()
    assert cli("--report", "--out-dir", out) == 0
    assert (out / "report" / "examples.png").stat().st_size > 1000
    assert "report.html" in capsys.readouterr().out


@pytest.mark.slow
def test_submission_is_valid_and_in_sample_order(tiny_run):
    out, _ = tiny_run
    sample = pd.read_csv(out / "demo_data" / "stage_2_sample_submission.csv")
    sub = pd.read_csv(out / "submission.csv")
    assert list(sub.columns) == ["ID", "Label"]
    assert sub["ID"].tolist() == sample["ID"].tolist()
    assert sub["Label"].between(1e-6, 1 - 1e-6).all()
    assert check_submission_file(out / "submission.csv", out / "demo_data" / "stage_2_sample_submission.csv") == []


@pytest.mark.slow
def test_unreadable_files_are_listed_and_test_image_gets_the_prior(tiny_run):
    out, _ = tiny_run
    bad = pd.read_csv(out / "bad_files.csv")
    assert len(bad) == 2 and bad["reason"].str.contains("pixel data is short").all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_test_predicted_with_prior"] == 1 and metrics["n_bad_files"] == 2
    bad_test = Path(bad.loc[bad["path"].str.contains("stage_2_test"), "path"].iloc[0]).stem
    sub = pd.read_csv(out / "submission.csv").set_index("ID")["Label"]
    got = [sub[f"{bad_test}_{k}"] for k in LABELS]
    prior = [metrics["prior"][k] for k in LABELS]
    np.testing.assert_allclose(got, np.clip(prior, 1e-6, 1 - 1e-6), rtol=1e-6)


@pytest.mark.slow
def test_split_keeps_patients_on_one_side_and_metrics_are_consistent(tiny_run):
    out, _ = tiny_run
    split = pd.read_csv(out / "split.csv")
    assert split.groupby("patient_id")["is_val"].nunique().max() == 1
    assert split["is_val"].any() and not split["is_val"].all()
    metrics = json.loads((out / "metrics.json").read_text())
    preds = pd.read_csv(out / "val_predictions.csv", index_col=0)
    assert set(preds.index) == set(split.loc[split["is_val"], "image_id"])
    from utils.metrics import weighted_log_loss
    recomputed = weighted_log_loss(preds[list(LABELS)].to_numpy(),
                                   preds[[f"pred_{k}" for k in LABELS]].to_numpy())
    assert recomputed == pytest.approx(metrics["weighted_log_loss"], rel=1e-5)
    assert metrics["validated_on"] == "validation" and metrics["n_validation"] == len(preds)
    assert set(metrics["log_loss_per_class"]) == set(LABELS)
    from utils.calibration import expected_calibration_error
    for k in LABELS:  # every run says how far to trust its probabilities
        assert metrics["ece"][k] == pytest.approx(expected_calibration_error(
            preds[k].to_numpy(), preds[f"pred_{k}"].to_numpy()), rel=1e-6)  # CSV rounds
    assert (out / "report" / "reliability.png").stat().st_size > 5000
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "resnet18" and config["demo"] is True and config["weights"] == "none"
    history = pd.read_csv(out / "history.csv")
    assert history.loc[0, "val_loss"] == pytest.approx(metrics["weighted_log_loss"], rel=1e-6)
    for k in LABELS:
        assert history.loc[0, f"val_loss_{k}"] == pytest.approx(metrics["log_loss_per_class"][k], rel=1e-6)
        assert f"val_auc_{k}" in history


@pytest.mark.slow
def test_resume_continues_a_finished_run_with_more_epochs(tiny_run_copy, capsys):
    out = tiny_run_copy
    assert cli("--out-dir", out, *TINY[:-4], "--epochs", "2", "--workers", "0", "--resume") == 0
    assert "Resuming at epoch 2, batch 0" in capsys.readouterr().out
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1, 2]


@pytest.mark.slow
def test_resume_under_other_settings_is_refused_and_changes_nothing(tiny_run, capsys):
    out, _ = tiny_run
    config = (out / "config.json").read_text()
    assert cli("--out-dir", out, *TINY[:-2], "--image-size", "48", "--resume") == 2
    err = capsys.readouterr().err
    assert "--image-size 32 (now 48)" in err and "--overwrite" in err and "last.pt" in err
    assert (out / "config.json").read_text() == config


def test_unknown_option_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli("--epoch", "3", "--out-dir", tmp_path)
    assert exit_.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_false_values_and_flags_are_parsed(tmp_path):
    import kernel
    cfg, _ = kernel.parse_args(["--data-dir", str(tmp_path), "--weights-strict", "false", "--tta", "no"])
    assert cfg.weights_strict is False and cfg.tta is False and cfg.resume is False
    cfg, modes = kernel.parse_args(["--data-dir", str(tmp_path), "--resume", "--report"])
    assert cfg.resume is True and cfg.weights_strict is True and cfg.tta is True and modes["report"]


def test_wrong_data_dir_explains_the_layout(tmp_path, capsys):
    assert cli("--data-dir", tmp_path, "--out-dir", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "stage_2_train.csv" in err and "stage_2_test" in err


@pytest.mark.slow
def test_real_data_without_weights_says_how_to_attach_them(tmp_path, rsna_sample):
    result = run_kernel("--data-dir", rsna_sample, "--out-dir", tmp_path / "out", "--epochs", "1",
                        "--arch", "resnet18", "--image-size", "32", "--workers", "0",
                        "--val-frac", "0.5", cwd=tmp_path)
    assert result.returncode == 2
    assert "--weights" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_real_sample_runs_end_to_end(tmp_path, rsna_sample):
    out = tmp_path / "out"
    result = run_kernel("--data-dir", rsna_sample, "--out-dir", out, "--epochs", "1",
                        "--arch", "resnet18", "--weights", "none", "--image-size", "32",
                        "--workers", "0", "--val-frac", "0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    split = pd.read_csv(out / "split.csv")
    assert len(split) == 65 and split.groupby("patient_id")["is_val"].nunique().max() == 1
    assert check_submission_file(out / "submission.csv", rsna_sample / "stage_2_sample_submission.csv") == []
    assert pd.read_csv(out / "bad_files.csv").empty


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SKIP_FULL_DEMO") == "1", reason="SKIP_FULL_DEMO=1")
def test_full_demo_beats_the_constant_prior(tmp_path):
    """The front door: the default demo must really learn, within its time budget."""
    result = run_kernel("--out-dir", tmp_path / "demo", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["weighted_log_loss"] < 0.9 * metrics["prior_weighted_log_loss"], metrics


@pytest.mark.slow
def test_kfold_validation_on_one_fold(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli("--out-dir", out, *TINY, "--folds", "3", "--fold", "1") == 0
    split = pd.read_csv(out / "split.csv")
    assert sorted(split["fold"].unique()) == [0, 1, 2]
    assert (split["is_val"] == (split["fold"] == 1)).all()
    assert split.groupby("patient_id")["fold"].nunique().max() == 1
    assert "validating on fold 1 of 3" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--predict", "scans", "--predict-only", "--checkpoint", "c.pt"],
     "--predict-only and --predict are different modes: give one"),
    (["--report", "--export-kaggle", "k"], "--report and --export-kaggle are different modes"),
    (["--threshold", "0.3"], "--threshold belongs to --predict"),
    (["--predict-only", "--checkpoint", "c.pt", "--threshold", "0.3"], "--threshold belongs to --predict"),
    (["--checkpoint", "c.pt"], "--checkpoint belongs to --predict-only or --predict"),
    (["--ensemble-weights", "1", "2"], "--ensemble-weights belongs to --ensemble"),
    (["--kaggle-id", "me/k"], "--kaggle-id belongs to --export-kaggle"),
])
def test_modes_exclude_each_other_and_an_option_of_another_mode_names_it(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        cli("--out-dir", tmp_path / "out", *args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [
    (["--folds", "1"], "--folds must be"),
    (["--folds", "3", "--fold", "3"], "--fold must be between 0 and 2"),
    (["--val-frac", "1.5"], "--val-frac"),
    (["--windows", "lung"], "unknown window"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--fold", "all"], "--fold all needs --folds K"),
    (["--folds", "3", "--fold", "most"], "expected a fold number or all, got 'most'"),
])
def test_bad_option_values(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        cli("--out-dir", tmp_path, *args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_check_submission_command(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    data = out / "demo_data"
    assert cli("--check-submission", out / "submission.csv", "--data-dir", data) == 0
    assert "valid" in capsys.readouterr().out
    sub = pd.read_csv(out / "submission.csv")
    sub.loc[3, "Label"] = 1.5
    broken = tmp_path / "broken.csv"
    sub.iloc[:-6].to_csv(broken, index=False)
    assert cli("--check-submission", broken, "--data-dir", data) == 2
    err = capsys.readouterr().err
    assert sub.loc[3, "ID"] in err  # names the bad value's row
    assert "6 sample IDs" in err and sub["ID"].iloc[-6] in err  # and the missing rows
    assert cli("--check-submission", broken, "--data-dir", tmp_path) == 2
    assert "stage_2_sample_submission.csv" in capsys.readouterr().err


@pytest.mark.slow
def test_files_failing_at_pixel_decoding_are_recorded(tiny_run, tmp_path):
    # Their headers and transfer syntax pass the scan (a file whose syntax needs a missing
    # decoder is listed there already: test_dicom); their pixels fail mid-epoch.
    import shutil
    out, _ = tiny_run
    data = tmp_path / "data"
    shutil.copytree(out / "demo_data", data)
    split = pd.read_csv(out / "split.csv")
    train_id = split.loc[~split["is_val"], "image_id"].iloc[0]
    test_id = pd.read_csv(data / "stage_2_sample_submission.csv")["ID"].str[:12].iloc[-1]
    make_corrupt_rle(data / "stage_2_train" / f"{train_id}.dcm")
    make_corrupt_rle(data / "stage_2_test" / f"{test_id}.dcm")
    # one batch holds the whole training set, so every training file is read
    result = run_kernel("--data-dir", data, "--out-dir", tmp_path / "out", *TINY[2:], "--weights", "none",
                        "--batch-size", "64")
    assert result.returncode == 0, result.stderr[-3000:]
    bad = pd.read_csv(tmp_path / "out" / "bad_files.csv").set_index("path")["reason"]
    assert "could not be decoded" in bad[str(data / "stage_2_train" / f"{train_id}.dcm")]
    assert "could not be decoded" in bad[str(data / "stage_2_test" / f"{test_id}.dcm")]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["n_test_predicted_with_prior"] == 2 and metrics["n_bad_files"] == 4
    sub = pd.read_csv(tmp_path / "out" / "submission.csv").set_index("ID")["Label"]
    np.testing.assert_allclose([sub[f"{test_id}_{k}"] for k in LABELS],
                               np.clip([metrics["prior"][k] for k in LABELS], 1e-6, 1 - 1e-6), rtol=1e-6)


# --- the training engine: resume, interruption, divergence, many processes, predict-only ---

@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_same_result(tmp_path):
    import signal
    cache = ["--header-cache", tmp_path / "cache"]
    straight = run_kernel("--out-dir", tmp_path / "a", *RESUMABLE, *cache, "--workers", "0")
    assert straight.returncode == 0, straight.stderr[-3000:]

    proc = start_kernel("--out-dir", tmp_path / "b", *RESUMABLE, *cache, "--workers", "0")
    pos = wait_for_checkpoint(proc, tmp_path / "b" / "checkpoints" / "last.pt", epoch=0, batch=3)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (tmp_path / "b" / "metrics.json").exists()
    # resumed with loader workers this time: the result must not depend on them
    resumed = run_kernel("--out-dir", tmp_path / "b", *RESUMABLE, *cache, "--workers", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming at epoch 1, batch {pos['batch']}" in resumed.stdout
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert b["weighted_log_loss"] == pytest.approx(a["weighted_log_loss"], abs=1e-6)
    ha, hb = pd.read_csv(tmp_path / "a" / "history.csv"), pd.read_csv(tmp_path / "b" / "history.csv")
    np.testing.assert_allclose(hb["train_loss"], ha["train_loss"], atol=1e-6)
    assert (tmp_path / "a" / "submission.csv").read_text() == (tmp_path / "b" / "submission.csv").read_text()


@pytest.mark.slow
def test_predict_only_from_a_checkpoint(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    assert cli("--predict-only", "--checkpoint", out / "checkpoints" / "best.pt",
               "--data-dir", out / "demo_data", "--out-dir", tmp_path / "p", "--workers", "0") == 0
    a = pd.read_csv(out / "submission.csv")
    b = pd.read_csv(tmp_path / "p" / "submission.csv")
    assert a["ID"].tolist() == b["ID"].tolist()
    np.testing.assert_allclose(a["Label"], b["Label"], rtol=1e-5, atol=1e-7)
    capsys.readouterr()
    assert cli("--predict-only", "--checkpoint", out / "submission.csv",
               "--data-dir", out / "demo_data", "--out-dir", tmp_path / "q", "--workers", "0") == 2
    assert "not a checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_gradient_accumulation_steps(tmp_path):
    import torch
    out = tmp_path / "out"
    assert cli("--out-dir", out, *TINY, "--batch-size", "4", "--accum", "3") == 0
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    batches = state["position"]  # finished: epoch 1, batch 0
    assert batches["epoch"] == 1
    # 49 training images in batches of 4, dropping the last partial one: 12 batches, 4 steps
    assert state["scheduler"]["last_epoch"] == 4


@pytest.mark.slow
def test_compiled_model_trains_and_saves_plain_weights(tmp_path):
    import torch
    out = tmp_path / "out"
    result = run_kernel("--out-dir", out, *TINY, "--compile")
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(out / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert "conv1.weight" in state and not any(k.startswith(("_orig_mod.", "module.")) for k in state)
    assert json.loads((out / "config.json").read_text())["compile"] is True


@pytest.mark.slow
def test_a_later_kaggle_session_adopts_the_previous_checkpoint(tiny_run, tmp_path):
    import shutil

    from utils import rundir
    out, _ = tiny_run
    inputs = tmp_path / "input" / "my-previous-run-output"
    shutil.copytree(out / "checkpoints", inputs / "checkpoints")
    shutil.copy(out / "history.csv", inputs / "history.csv")
    working = tmp_path / "working"
    (working / "checkpoints").mkdir(parents=True)
    assert rundir.adopt_previous_session(working, tmp_path / "input") == inputs
    assert (working / "checkpoints" / "last.pt").read_bytes() == (out / "checkpoints" / "last.pt").read_bytes()
    assert (working / "history.csv").is_file()
    assert rundir.adopt_previous_session(working, tmp_path / "nothing-here") is None


@pytest.mark.slow
def test_context_and_refine_options(tmp_path):
    out = tmp_path / "out"
    result = run_kernel("--out-dir", out, *TINY, "--context", "1", "--context-windows", "--refine",
                        "--calibrate", "--val-frac", "0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Slice order (train): 6 series" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    decision = json.loads((out / "calibration.json").read_text())  # after the refiner, on what it gives
    assert decision["loss_before"] == pytest.approx(metrics["weighted_log_loss"])
    assert metrics["calibration_used"] == decision["use"] == (decision["loss_after_oof"] < decision["loss_before"])
    # used exactly where it beats the per-slice loss out of fold; the headline is what was submitted
    refined, per_slice = metrics["weighted_log_loss_refined"], metrics["weighted_log_loss_per_slice"]
    assert refined > 0 and metrics["refiner_used"] == (refined < per_slice) == (out / "refiner.pt").is_file()
    assert metrics["weighted_log_loss"] == pytest.approx(min(refined, per_slice))
    preds = pd.read_csv(out / "val_predictions.csv")
    assert metrics["refiner_used"] == ("refined_any" in preds)
    import torch
    state = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    assert state["model"]["conv1.weight"].shape[1] == 9  # 3 windows x 3 slices
    assert check_submission_file(out / "submission.csv", out / "demo_data" / "stage_2_sample_submission.csv") == []
    predicted = run_kernel("--predict-only", "--checkpoint", out / "checkpoints" / "best.pt",
                           "--data-dir", out / "demo_data", "--out-dir", tmp_path / "p", "--workers", "0")
    assert predicted.returncode == 0, predicted.stderr[-3000:]


@pytest.mark.slow
def test_a_refiner_that_wins_refines_the_submission(tmp_path, monkeypatch):
    # Whether the refiner wins on a tiny run is chance; force the decision to "use it" and
    # check that the submission is then exactly the refiner applied, series by series, to
    # the per-slice predictions of the same weights (--predict-only from its checkpoint).
    import kernel
    from utils.metrics import logit
    from utils.refiner import fit_refiner, refine
    from utils.slices import order_slices
    from utils.headers import scan_headers

    fitted = []

    def always_used(val_df, val_probs, headers, cfg, features=None, device="cpu"):
        h = headers.loc[val_df.index]
        result = fit_refiner(logit(val_probs), val_df.to_numpy(), h["series"].to_numpy(),
                             h["position"].to_numpy(), h["patient_id"].to_numpy(), n_folds=2, seed=0)
        fitted.append(result)
        return result, result.oof_probs, {"logits": result.loss_after}

    monkeypatch.setattr(kernel, "fit_series_refiner", always_used)
    out = tmp_path / "out"
    assert cli("--out-dir", out, *TINY, "--refine") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["refiner_used"] is True
    assert metrics["weighted_log_loss"] == pytest.approx(fitted[0].loss_after)
    assert metrics["weighted_log_loss_refined"] == pytest.approx(fitted[0].loss_after)
    per_slice = run_kernel("--predict-only", "--checkpoint", out / "checkpoints" / "best.pt",
                           "--data-dir", out / "demo_data", "--out-dir", tmp_path / "p", "--workers", "0")
    assert per_slice.returncode == 0, per_slice.stderr[-3000:]

    def wide(path):
        sub = pd.read_csv(path)
        return sub.assign(image=sub["ID"].str[:12], label=sub["ID"].str[13:]).pivot(
            index="image", columns="label", values="Label")[list(LABELS)]

    plain, refined = wide(tmp_path / "p" / "submission.csv"), wide(out / "submission.csv")
    headers, bad = scan_headers(sorted((out / "demo_data" / "stage_2_test").glob("*.dcm")))
    order = order_slices(headers).loc[plain.index.intersection(headers["image_id"])]
    expected = refine(fitted[0], logit(plain.loc[order.index].to_numpy()),
                      order["series"].to_numpy(), order["position"].to_numpy())
    np.testing.assert_allclose(refined.loc[order.index].to_numpy(), expected, atol=2e-5)
    assert np.abs(expected - plain.loc[order.index].to_numpy()).max() > 1e-3  # it did change them
    unreadable = plain.index.difference(order.index)
    assert len(unreadable) == len(bad) == 1
    assert refined.loc[unreadable].equals(plain.loc[unreadable])  # the prior, in both


def _validation_series(n_patients: int, n_slices: int, labels, logits):
    """Validation rows of one series per patient, as fit_series_refiner takes them."""
    ids = [f"ID_{p:04d}{s:05d}" for p in range(n_patients) for s in range(n_slices)]
    patient = [f"ID_p{i // n_slices}" for i in range(len(ids))]
    headers = pd.DataFrame({"patient_id": patient, "study_uid": patient, "series": patient,
                            "position": [i % n_slices for i in range(len(ids))]}, index=ids)
    return pd.DataFrame(labels, index=ids, columns=LABELS), 1 / (1 + np.exp(-logits)), headers


def _runs_of_bleeding(rng, n_patients: int, n_slices: int, lengths: tuple[int, int]) -> np.ndarray:
    """Labels (n_patients * n_slices, 6): in each patient's series one run of lengths[0] to
    lengths[1] - 1 neighbouring slices positive in every class."""
    y = np.zeros((n_patients, n_slices, 6))
    for p in range(n_patients):
        start = rng.integers(0, n_slices - lengths[1] + 1)
        y[p, start:start + rng.integers(*lengths)] = 1
    return y.reshape(-1, 6)


def test_the_refiner_is_used_where_it_helps_out_of_fold(capsys):
    # Bleeds run along the series, and the per-slice evidence for them is buried in noise
    # that is independent from slice to slice: neighbours average it out.
    import kernel
    rng = np.random.default_rng(0)
    n_patients, n_slices = 40, 24
    y = _runs_of_bleeding(rng, n_patients, n_slices, lengths=(3, 9))
    val_df, probs, headers = _validation_series(n_patients, n_slices, y,
                                                1.5 * (2 * y - 1) + rng.normal(0, 2.0, y.shape))
    refiner, used_probs, losses = kernel.fit_series_refiner(val_df, probs, headers, kernel.Config(seed=0))
    refined_loss = losses["logits"]
    before = kernel.weighted_log_loss(y, probs)
    assert refiner is not None and refined_loss < 0.6 * before
    np.testing.assert_array_equal(used_probs, refiner.oof_probs)
    assert kernel.weighted_log_loss(y, used_probs) == pytest.approx(refined_loss)
    assert "Refiner not used" not in capsys.readouterr().out


def test_the_refiner_is_not_used_where_it_hurts_out_of_fold(capsys):
    # Calibrated per-slice predictions of labels drawn independently for each slice: the
    # neighbours carry nothing, so a refiner trained on a few patients can only add noise.
    import kernel
    rng = np.random.default_rng(0)
    n_patients, n_slices = 6, 20
    probs = rng.uniform(0.02, 0.98, (n_patients * n_slices, 6))
    y = (rng.random(probs.shape) < probs).astype(float)
    val_df, probs, headers = _validation_series(n_patients, n_slices, y, np.log(probs / (1 - probs)))
    refiner, used_probs, losses = kernel.fit_series_refiner(val_df, probs, headers, kernel.Config(seed=0))
    assert refiner is None and used_probs is probs and list(losses) == ["logits"]
    assert losses["logits"] > kernel.weighted_log_loss(y, probs) + 0.01
    assert "Refiner not used: it does not beat the per-slice predictions" in capsys.readouterr().out


def test_the_refiner_chosen_is_the_one_that_wins_out_of_fold():
    import kernel
    assert kernel.choose_refiner({"logits": 0.30, "embeddings": 0.25}, 0.40) == "embeddings"
    assert kernel.choose_refiner({"logits": 0.30, "embeddings": 0.35}, 0.40) == "logits"
    assert kernel.choose_refiner({"logits": 0.41, "embeddings": 0.40}, 0.40) is None  # a tie is no gain
    assert kernel.choose_refiner({}, 0.40) is None


def test_the_embedding_refiner_is_fitted_beside_the_logit_refiner_where_features_were_kept(capsys, monkeypatch):
    # The per-slice logits are noise; the features carry the labels: out of fold the
    # embedding refiner wins, and its out-of-fold probabilities are what is used.
    import kernel
    from test_refiner import label_features
    rng = np.random.default_rng(1)
    n_patients, n_slices = 12, 16
    y = _runs_of_bleeding(rng, n_patients, n_slices, lengths=(2, 6))
    val_df, probs, headers = _validation_series(n_patients, n_slices, y, rng.normal(-1, 1.0, y.shape))
    features = label_features(y, seed=0)
    monkeypatch.setattr("utils.refiner.EMBEDDING_MIN_STEPS", 30)  # enough here; fast
    refiner, used_probs, losses = kernel.fit_series_refiner(val_df, probs, headers, kernel.Config(seed=0), features)
    assert sorted(losses) == ["embeddings", "logits"] and losses["embeddings"] < losses["logits"]
    assert refiner.kind == "embeddings" and losses["embeddings"] == refiner.loss_after
    np.testing.assert_array_equal(used_probs, refiner.oof_probs)
    assert "Refiner used: the one over the embeddings" in capsys.readouterr().out


def test_every_option_says_what_it_does():
    import kernel
    actions = [a for a in kernel._parser()._actions if a.option_strings != ["-h", "--help"]]
    assert len(actions) >= 40
    for action in actions:  # a sentence, not only its default
        words = (action.help or "").split("(default")[0].split()
        assert len(words) >= 3, action.option_strings
