"""The leaderboard recipe end to end: --fold all, out-of-fold predictions, the refiner on
all of them, --predict-only of the whole run, --ensemble of runs, and resuming mid-way."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kernel_runs import TINY, cli, kill_at_write, run_kernel
from utils.labels import LABELS
from utils.submission import check_submission_file

pytestmark = pytest.mark.slow  # every test here trains or runs kernel.py

FOLDS = ["--folds", "3", "--fold", "all"]
PRED = [f"pred_{k}" for k in LABELS]


def _table(path):
    return pd.read_csv(path, engine="pyarrow").set_index("image_id")


@pytest.fixture(scope="module")
def fold_run(tmp_path_factory):
    import kernel
    out = tmp_path_factory.mktemp("folds") / "out"
    # Which refiner wins out of fold on a run this small is chance: here the embedding
    # refiner is made to win, so that the submission, --predict-only and --predict DIR below
    # go through it, fold model by fold model (the choice itself: test_kernel.py).
    chosen = []

    def embeddings_win(losses, per_slice):
        chosen.append(sorted(losses))
        return "embeddings"

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernel, "choose_refiner", embeddings_win)
        # a batch size other than the default: predict-only must take the run's own
        assert cli("--out-dir", out, *TINY, *FOLDS, "--refine", "--calibrate", "--batch-size", "4") == 0
    assert chosen == [["embeddings", "logits"]]  # both were fitted, on every fold's features
    return out, None


def test_every_labelled_image_is_predicted_once_by_the_fold_that_did_not_train_on_it(fold_run):
    out, _ = fold_run
    split = pd.read_csv(out / "split.csv").set_index("image_id")
    oof = _table(out / "oof_predictions.csv")
    assert sorted(oof.index) == sorted(split.index) and not oof.index.duplicated().any()
    assert (oof["fold"] == split.loc[oof.index, "fold"]).all()
    assert split.groupby("patient_id")["fold"].nunique().max() == 1  # a patient in one fold
    for fold in range(3):
        config = json.loads((out / f"fold_{fold}" / "config.json").read_text())
        assert config["fold"] == fold and config["folds"] == 3
        val = _table(out / f"fold_{fold}" / "val_predictions.csv")
        assert sorted(val.index) == sorted(split.index[split["fold"] == fold])
        np.testing.assert_array_equal(oof.loc[val.index, PRED].to_numpy(), val[PRED].to_numpy())
        assert (out / f"fold_{fold}" / "checkpoints" / "best.pt").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    y, p = oof[list(LABELS)].to_numpy(), oof[PRED].to_numpy()
    from utils.metrics import weighted_log_loss
    assert metrics["validated_on"] == "out_of_fold" and metrics["n_validation"] == len(oof)
    assert metrics["weighted_log_loss_per_slice"] == pytest.approx(weighted_log_loss(y, p))
    assert sorted(metrics["weighted_log_loss_per_fold"]) == ["0", "1", "2"]
    assert (out / "report" / "training.png").stat().st_size > 5000  # a curve per fold
    final = oof[[f"refined_{k}" for k in LABELS]] if metrics["refiner_used"] else oof[PRED]
    assert metrics["weighted_log_loss"] == pytest.approx(weighted_log_loss(y, final.to_numpy()))
    # the report's headline is the loss of what the run submitted, out of fold
    page = (out / "report" / "report.html").read_text()
    assert f"Out-of-fold weighted log loss <b>{metrics['weighted_log_loss']:.5f}</b>" in page
    from utils.calibration import expected_calibration_error
    assert metrics["ece"]["any"] == pytest.approx(expected_calibration_error(y[:, 5], final.to_numpy()[:, 5]))
    assert (out / "report" / "reliability.png").stat().st_size > 5000


def test_calibration_is_judged_out_of_fold_and_reported_honestly(fold_run):
    out, _ = fold_run
    decision = json.loads((out / "calibration.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert decision["loss_before"] == pytest.approx(metrics["weighted_log_loss"])  # what was submitted
    assert metrics["weighted_log_loss_calibrated"] == decision["loss_after_oof"]
    assert metrics["calibration_used"] == decision["use"] == (decision["loss_after_oof"] < decision["loss_before"])
    assert len(decision["temperatures"]) == len(LABELS)


def test_a_used_calibration_scales_the_read_images_of_predict_only(fold_run, tmp_path):
    from utils.calibration import apply_temperatures
    out, _ = fold_run
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("demo_data"))
    temperatures = [2.0, 0.5, 1.0, 3.0, 1.5, 2.5]
    decision = json.loads((out / "calibration.json").read_text())
    (run / "calibration.json").write_text(json.dumps({**decision, "use": False}))
    # --predict-only in this process (cli): what is compared is its two outputs
    plain = cli("--predict-only", "--checkpoint", run, "--data-dir", out / "demo_data",
                "--out-dir", tmp_path / "plain", "--workers", "0")
    (run / "calibration.json").write_text(json.dumps({**decision, "use": True, "temperatures": temperatures}))
    scaled = cli("--predict-only", "--checkpoint", run, "--data-dir", out / "demo_data",
                 "--out-dir", tmp_path / "scaled", "--workers", "0")
    assert plain == 0 and scaled == 0
    before, after = _table(tmp_path / "plain" / "test_predictions.csv"), _table(tmp_path / "scaled" / "test_predictions.csv")
    bad = pd.read_csv(tmp_path / "scaled" / "bad_files.csv")["path"].map(lambda p: Path(p).stem)
    read = [i for i in before.index if i not in set(bad)]
    assert 0 < len(read) < len(before)  # the demo has unreadable test images: they keep the prior
    np.testing.assert_allclose(after.loc[read].to_numpy(),
                               apply_temperatures(before.loc[read].to_numpy(), np.array(temperatures)), rtol=1e-9)
    pd.testing.assert_frame_equal(after.drop(index=read), before.drop(index=read))


def test_the_submission_is_the_folds_average_refined_and_calibrated_where_that_won(fold_run):
    from utils import embeddings
    from utils.calibration import apply_temperatures
    from utils.metrics import logit
    from utils.refiner import load_refiner, refine
    from utils.slices import order_slices
    from utils.headers import scan_headers
    out, _ = fold_run
    folds = [_table(out / f"fold_{i}" / "test_predictions.csv") for i in range(3)]
    mean = pd.DataFrame(sum(f.to_numpy() for f in folds) / 3, index=folds[0].index, columns=list(LABELS))
    final = _table(out / "test_predictions.csv")
    metrics = json.loads((out / "metrics.json").read_text())
    calibration = json.loads((out / "calibration.json").read_text())
    bad = set(pd.read_csv(out / "bad_files.csv")["path"].map(lambda p: Path(p).stem))

    def calibrated(values: pd.DataFrame) -> pd.DataFrame:  # last, on the images that were read
        read = [i for i in values.index if i not in bad]
        if calibration["use"]:
            values = values.copy()
            values.loc[read] = apply_temperatures(values.loc[read].to_numpy(), np.array(calibration["temperatures"]))
        return values

    assert metrics["refiner_used"] and metrics["refiner"] == "embeddings"
    assert metrics["weighted_log_loss_refined"] == min(metrics["weighted_log_loss_refined_logits"],
                                                       metrics["weighted_log_loss_refined_embeddings"])
    headers, _ = scan_headers(sorted((out / "demo_data" / "stage_2_test").glob("*.dcm")))
    order = order_slices(headers).loc[[i for i in final.index if i in set(headers["image_id"])]]
    refiner = load_refiner(out / "refiner.pt")
    assert refiner.kind == "embeddings"
    # each fold model's probabilities with its own features, refined, then averaged
    refined = []
    for i, fold in enumerate(folds):
        features = embeddings.load([out / f"fold_{i}"], "test", order.index)
        assert features.shape == (len(order), 512)  # resnet18's pooled features
        refined.append(refine(refiner, logit(fold.loc[order.index].to_numpy()), order["series"].to_numpy(),
                              order["position"].to_numpy(), features))
    expected = calibrated(pd.DataFrame(np.mean(refined, axis=0), index=order.index, columns=list(LABELS)))
    np.testing.assert_allclose(final.loc[order.index].to_numpy(), expected.to_numpy(), rtol=1e-9)
    plain = refine(refiner, logit(mean.loc[order.index].to_numpy()), order["series"].to_numpy(),
                   order["position"].to_numpy(), embeddings.load([out / "fold_0"], "test", order.index))
    assert np.abs(np.mean(refined, axis=0) - plain).max() > 1e-4  # not the averaged members through one model
    oof = _table(out / "oof_predictions.csv")
    kept = embeddings.load([out / f"fold_{i}" for i in range(3)], "val", oof.index)
    assert kept.shape == (len(oof), 512) and np.abs(kept[np.arange(len(oof))]).sum(axis=1).min() > 0


def test_predict_only_on_the_fold_run_reproduces_its_submission_byte_for_byte(fold_run, tmp_path):
    out, _ = fold_run
    again = run_kernel("--predict-only", "--checkpoint", out, "--data-dir", out / "demo_data",
                       "--out-dir", tmp_path / "p", "--workers", "0")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "p" / "submission.csv").read_bytes() == (out / "submission.csv").read_bytes()


def test_predict_dir_gives_the_fold_runs_own_test_predictions(fold_run, tmp_path):
    """The demo's test images as a folder of scans: the fold models, each refined with its
    own features by the embedding refiner, averaged and calibrated, as the submission was."""
    out, _ = fold_run
    root = tmp_path / "scans"
    for i, source in enumerate(sorted((out / "demo_data" / "stage_2_test").glob("*.dcm"))):
        target = root / f"series{i % 2}" / f"IMG{i:05d}"  # other names and nesting
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    result = run_kernel("--predict", root, "--checkpoint", out, "--out-dir", tmp_path / "pred", "--workers", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    slices = pd.read_csv(tmp_path / "pred" / "slices.csv").set_index("sop_uid")
    expected = _table(out / "test_predictions.csv")
    assert len(slices) >= 20
    np.testing.assert_allclose(slices[list(LABELS)].to_numpy(), expected.loc[slices.index].to_numpy(),
                               rtol=1e-5, atol=1e-7)


def test_ensemble_of_two_runs_and_refusal_of_other_data(fold_run, tmp_path):
    out, _ = fold_run
    # the runs to blend train in this process (cli); --ensemble itself runs as a user runs it
    single = tmp_path / "single"
    assert cli("--data-dir", out / "demo_data", "--out-dir", single, *TINY, "--seed", "8",
               "--weights", "none", "--val-frac", "0.25") == 0
    blend = tmp_path / "blend"
    result = run_kernel("--ensemble", out, single, "--ensemble-weights", "3", "1", "--out-dir", blend)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = (3 * _table(out / "test_predictions.csv") + _table(single / "test_predictions.csv")) / 4
    pd.testing.assert_frame_equal(_table(blend / "test_predictions.csv"), expected, rtol=1e-12)
    sample = out / "demo_data" / "stage_2_sample_submission.csv"
    assert check_submission_file(blend / "submission.csv", sample) == []
    shared = json.loads((blend / "metrics.json").read_text())
    assert shared["validated_on"] == "shared_validation"
    assert shared["n_validation"] == len(_table(single / "val_predictions.csv"))  # the OOF covers all
    assert set(shared["weighted_log_loss_per_run"]) == {str(out), str(single)} and shared["weighted_log_loss"] > 0
    again = run_kernel("--predict-only", "--checkpoint", blend, "--data-dir", out / "demo_data",
                       "--out-dir", tmp_path / "p", "--workers", "0")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "p" / "submission.csv").read_bytes() == (blend / "submission.csv").read_bytes()

    other = tmp_path / "other"  # the demo of another seed: other labels, other sample
    assert cli("--out-dir", other, *TINY, "--seed", "9") == 0
    refused = run_kernel("--ensemble", out, other, "--out-dir", tmp_path / "refused")
    assert refused.returncode == 2 and "different data" in refused.stderr
    assert "stage_2_train.csv differ" in refused.stderr and "Traceback" not in refused.stderr


def test_a_run_killed_in_the_middle_fold_resumes_there_to_the_same_submission(tmp_path):
    # one epoch a fold, a checkpoint after every step: the killed fold 1 goes on from its
    # last mid-epoch checkpoint
    args = [*TINY, "--batch-size", "8", "--ckpt-minutes", "0", "--log-every", "1", *FOLDS]
    whole = run_kernel("--out-dir", tmp_path / "whole", *args)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "out"
    # history.csv is written at the end of each epoch: its second write is fold 1's
    kill_at_write(out, *args, write="history.csv:2", held=out / "fold_1" / "history.csv.held", timeout=600)
    assert (out / "fold_0" / "metrics.json").is_file() and not (out / "fold_1" / "metrics.json").exists()
    fold0 = (out / "fold_0" / "checkpoints" / "best.pt").stat().st_mtime_ns
    resumed = run_kernel("--out-dir", out, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Fold 0: finished earlier" in resumed.stdout and "(resuming)" in resumed.stdout
    assert (out / "fold_0" / "checkpoints" / "best.pt").stat().st_mtime_ns == fold0  # not retrained
    assert not list(out.rglob("*.tmp"))  # the write the kill interrupted was cleared
    assert (out / "submission.csv").read_bytes() == (tmp_path / "whole" / "submission.csv").read_bytes()


def test_a_later_kaggle_session_adopts_every_fold_of_a_fold_run(fold_run, tmp_path):
    import shutil

    from utils import rundir
    out, _ = fold_run
    inputs = tmp_path / "input" / "previous-session-output"
    for fold in range(2):  # the session ended during fold 1
        shutil.copytree(out / f"fold_{fold}", inputs / f"fold_{fold}")
    (inputs / "fold_1" / "metrics.json").unlink()
    working = tmp_path / "working"
    working.mkdir()
    assert rundir.adopt_previous_session(working, tmp_path / "input") == inputs
    for name in ("fold_0/metrics.json", "fold_0/checkpoints/best.pt", "fold_1/checkpoints/last.pt",
                 "fold_1/history.csv", "fold_1/val_predictions.csv"):
        assert (working / name).read_bytes() == (inputs / name).read_bytes(), name
    assert not (working / "fold_1" / "metrics.json").exists() and not (working / "fold_2").exists()
