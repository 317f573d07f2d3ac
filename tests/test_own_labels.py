"""A site's own labelled scans: fine-tuning a run's model on them (--scans --labels --weights
RUN/checkpoints/best.pt) and scoring a model on them (--evaluate)."""
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

import kernel
from factories import build_labelled_export, make_corrupt_rle, rewrite_dicom
from kernel_runs import cli
from utils.evaluation import worst_slices
from utils.labels import LABELS, series_picks
from utils.metrics import CLASS_WEIGHTS

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
NAN = np.nan


def test_series_picks_take_the_maximum_among_the_unknown_slices_of_each_positive_series():
    probs = np.tile([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]], (6, 1))
    probs[1, 5], probs[2, 5], probs[4, 0] = 0.9, 0.95, 0.7
    labels = np.full((6, 6), NAN)
    labels[2, 5] = 0  # known: not a candidate, though the most probable
    labels[5, 0] = 1  # series b already has a slice known to show epidural: no pick for it
    series = np.array(["a", "a", "a", "b", "b", "b"])
    site = pd.DataFrame([[NAN, NAN, 0, NAN, NAN, 1], [1, NAN, NAN, NAN, 1, 1]], index=["a", "b"], columns=list(LABELS))
    picks = series_picks(probs, series, labels, site)
    assert sorted(map(tuple, picks)) == [(1, 5), (3, 4), (3, 5)]  # ties: the first slice
    assert series_picks(probs, series, labels, site.iloc[:0]).shape == (0, 2)
    with pytest.raises(ValueError, match="must be"):
        series_picks(probs[:5], series, labels, site)


def test_the_picked_slice_gives_the_gradient_of_the_series_maximum():
    # the series-level loss -log(max_i p_i) and the picked slice's -log(p_i*) move the
    # model alike: their gradients are equal
    torch.manual_seed(0)
    model, x = torch.nn.Linear(4, 6), torch.randn(7, 4)
    series, positive = np.zeros(7, dtype=int), pd.DataFrame([[NAN, 1, NAN, NAN, NAN, 1]], columns=list(LABELS))
    logits = model(x)
    picks = series_picks(torch.sigmoid(logits).detach().numpy(), series, np.full((7, 6), NAN), positive)
    grads = []
    for loss in (sum(torch.nn.functional.softplus(-logits[:, c].max()) for c in (1, 5)),
                 sum(torch.nn.functional.softplus(-logits[r, c]) for r, c in picks)):
        grads.append(torch.autograd.grad(loss, model.weight, retain_graph=True)[0])
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("args, message", [
    (["--labels", "l.csv"], "--labels belongs to --scans or --evaluate"),
    (["--evaluate", "scans", "--checkpoint", "c.pt"], "--evaluate needs --labels CSV"),
    (["--evaluate", "scans", "--labels", "l.csv"], "--evaluate needs --checkpoint PATH"),
    (["--scans", "scans"], "--scans needs --labels CSV"),
    (["--scans", "scans", "--labels", "l.csv", "--data-dir", "d"], "--scans and --data-dir are two datasets"),
])
def test_own_label_options_say_what_they_need(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit):
        kernel.parse_args(args)
    assert message in capsys.readouterr().err


def test_a_runs_checkpoint_as_weights_brings_its_model_settings(tmp_path, capsys):
    run_cfg = {"arch": "resnet18", "image_size": 32, "windows": "brain", "context": 1, "crop": "head"}
    torch.save({"model": {}, "config": run_cfg, "prior": torch.zeros(6)}, tmp_path / "best.pt")
    cfg, _ = kernel.parse_args(["--scans", "s", "--labels", "l.csv", "--weights", str(tmp_path / "best.pt")])
    assert {k: getattr(cfg, k) for k in run_cfg} == run_cfg and cfg.batch_size == kernel.Config.batch_size
    with pytest.raises(SystemExit):
        kernel.parse_args(["--weights", str(tmp_path / "best.pt"), "--image-size", "64", "--crop", "head"])
    assert "made with --image-size 32; fine-tuning keeps the model's settings" in capsys.readouterr().err


def _site_labels(truth: pd.DataFrame, path) -> tuple[str, pd.Series]:
    """The first series slice by slice without the epidural column; the second as a whole."""
    first, second = sorted(truth["series_uid"].unique())
    rows = truth[truth["series_uid"] == first].drop(columns=["series_uid", "sop_uid", "epidural"]).reset_index()
    whole = truth[truth["series_uid"] == second][list(LABELS)].max().drop("epidural")
    pd.concat([rows, pd.DataFrame([{"series_uid": second, **whole}])]).to_csv(path, index=False, float_format="%.0f")
    return second, whole


@pytest.mark.slow
def test_a_labelled_folder_fine_tunes_from_a_checkpoint_resumes_and_evaluates(tiny_run, tmp_path, rsna_sample):
    root = tmp_path / "site"
    truth = build_labelled_export(root, rsna_sample)
    second, whole = _site_labels(truth, tmp_path / "labels.csv")
    # a series of one file whose header reads and whose pixels do not: trained around, not scored
    make_corrupt_rle(rewrite_dicom(root / truth.index[0], root / "broken" / "IM0", SOPInstanceUID="ID_broken",
                                   SeriesInstanceUID="ID_broken_series"))
    with open(tmp_path / "labels.csv", "a") as f:
        f.write(",0,0,0,0,1,ID_broken_series\n")  # the columns of _site_labels
    out = tmp_path / "tuned"
    args = ["--scans", root, "--labels", tmp_path / "labels.csv", "--weights", tiny_run[0] / "checkpoints" / "best.pt",
            "--out-dir", out, "--val-frac", "0.5", "--batch-size", "8", "--workers", "0"]
    assert cli(*args, "--epochs", "1") == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["arch"], config["image_size"]) == ("resnet18", 32)  # the checkpoint's, not Config's
    assert not (out / "submission.csv").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isnan(metrics["log_loss_per_class"]["epidural"]) and np.isfinite(metrics["weighted_log_loss"])
    split = pd.read_csv(out / "split.csv")
    assert split["patient_id"].str.fullmatch(r"patient_\d{4}").all()
    # the series labelled as a whole trains (seed 42): its classes labelled 1 each got their slice
    trained = split.loc[~split["is_val"], "image_id"]
    assert trained.str.contains(second).sum() == len(trained) - 1 and trained.str.startswith("broken/").any()
    picks = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["position"]["picks"]
    assert sorted(c for _, c in picks) == sorted(LABELS.index(c) for c in whole.index[whole == 1])  # broken: none
    assert pd.read_csv(out / "bad_files.csv")["path"].str.endswith("broken/IM0").tolist() == [True]

    assert (out / "report" / "report.html").is_file()
    assert cli("--report", "--out-dir", out) == 2  # a --scans run's report is drawn at its end, said so

    first_epoch = pd.read_csv(out / "history.csv")
    assert cli(*args, "--epochs", "2", "--resume") == 0
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    pd.testing.assert_frame_equal(history.iloc[:1], first_epoch)

    ev = tmp_path / "evaluate"
    assert cli("--evaluate", root, "--labels", tmp_path / "labels.csv", "--checkpoint", out, "--out-dir", ev,
               "--workers", "0") == 0
    summary = json.loads((ev / "metrics.json").read_text())
    assert summary["counts"]["slices"] == len(truth) and summary["counts"]["patients"] == 2
    assert pd.read_csv(ev / "skipped.csv")["path"].tolist() == ["broken/IM0"]
    slices = pd.read_csv(ev / "slices.csv", index_col="slice")
    y, p = slices[list(LABELS)].to_numpy(), slices[[f"pred_{c}" for c in LABELS]].to_numpy()
    known = ~np.isnan(y)
    assert not known[:, 0].any()  # epidural: absent from the CSV, unknown everywhere
    weights = np.broadcast_to(CLASS_WEIGHTS, y.shape)[known]
    expected = log_loss(y[known], p[known], sample_weight=weights, labels=[0, 1])
    assert summary["slice"]["weighted_log_loss"]["value"] == pytest.approx(expected, rel=1e-9)
    assert summary["validated_on"] == "site" and summary["weighted_log_loss"] == pytest.approx(expected, rel=1e-9)
    j = LABELS.index("subarachnoid")  # known on every slice: the second series' 0 is each slice's 0
    assert known[:, j].all()
    assert summary["slice"]["per_class"]["subarachnoid"]["auc"]["value"] == pytest.approx(roc_auc_score(y[:, j], p[:, j]))
    series = pd.read_csv(ev / "series.csv", index_col="series")
    row = series.loc[[s for s in series.index if s.endswith(second)][0]]
    assert row[list(whole.index)].tolist() == whole.tolist()
    page = (ev / "report" / "evaluate.html").read_text()
    worst = worst_slices(slices.assign(patient="p"))
    assert page.count("alt='heatmap'") >= len(worst) == 10
    captions = re.findall(r"<figcaption>([a-z]+)</figcaption>", page)
    assert set(worst["worst_class"]) <= set(captions)  # each map is of the class the slice got most wrong


@pytest.mark.parametrize("any_labels, chosen", [([0, 1, 0, 1], True), ([NAN, 1, NAN, 1], False), (None, False)])
def test_the_runs_validation_gives_the_second_threshold_only_where_it_can(tmp_path, any_labels, chosen):
    from utils import rundir
    from utils.own_labels import _run_validation
    (tmp_path / "checkpoints").mkdir()
    if any_labels is not None:
        table = pd.DataFrame(np.full((4, 6), NAN), columns=list(LABELS)).assign(any=any_labels)
        rundir.write_csv(tmp_path / rundir.VAL_PREDICTIONS,
                         rundir.predictions_table(table.rename_axis("image_id"), np.full((4, 6), 0.3)))
    validation = _run_validation(tmp_path / "checkpoints" / "best.pt")
    assert (validation is not None) == chosen


@pytest.mark.slow
def test_two_processes_fine_tune_on_a_labelled_folder_with_the_same_picks_and_weights(tiny_run, tmp_path, rsna_sample):
    from test_distributed import torchrun
    root = tmp_path / "site"
    truth = build_labelled_export(root, rsna_sample)
    _, whole = _site_labels(truth, tmp_path / "labels.csv")
    out = tmp_path / "tuned"
    result = torchrun("--scans", root, "--labels", tmp_path / "labels.csv", "--weights",
                      tiny_run[0] / "checkpoints" / "best.pt", "--out-dir", out, "--val-frac", "0.5",
                      "--batch-size", "4", "--workers", "0", "--epochs", "1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    digests = re.findall(r"final weights sha1 ([0-9a-f]{40})", result.stdout)
    assert len(digests) == 2 and digests[0] == digests[1]
    picks = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["position"]["picks"]
    assert len(picks) == int((whole == 1).sum())
    assert json.loads((out / "metrics.json").read_text())["processes"] == 2


@pytest.mark.parametrize("mode", ["--predict", "--evaluate", "--scans"])
def test_a_missing_folder_is_a_clear_error(tmp_path, capsys, mode):
    labels = ["--labels", tmp_path / "labels.csv"] if mode != "--predict" else []
    checkpoint = ["--checkpoint", tmp_path / "best.pt"] if mode != "--scans" else ["--weights", "none"]
    assert cli(mode, tmp_path / "nowhere", *labels, *checkpoint, "--out-dir", tmp_path / "out") == 2
    said = capsys.readouterr().err
    assert f"{tmp_path / 'nowhere'}: no such folder" in said and "Traceback" not in said


@pytest.mark.slow
def test_a_labelled_folder_takes_folds_the_refiner_and_calibration(tiny_run, tmp_path, rsna_sample):
    root = tmp_path / "site"
    truth = build_labelled_export(root, rsna_sample)
    _site_labels(truth, tmp_path / "labels.csv")
    out = tmp_path / "folds"
    assert cli("--scans", root, "--labels", tmp_path / "labels.csv", "--weights", tiny_run[0] / "checkpoints" / "best.pt",
               "--out-dir", out, "--folds", "2", "--fold", "all", "--refine", "--calibrate", "--epochs", "1",
               "--batch-size", "8", "--workers", "0") == 0
    oof = pd.read_csv(out / "oof_predictions.csv", index_col="image_id")
    assert sorted(oof.index) == sorted(truth.index) and sorted(oof["fold"].unique()) == [0, 1]
    assert oof["epidural"].isna().all()  # unknown stays unknown through the folds
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["refiner"] in ("logits", "embeddings", "none") and "calibration_used" in metrics
    assert np.isfinite(metrics["weighted_log_loss_refined_logits"]) and np.isfinite(metrics["weighted_log_loss"])
    assert not list(out.rglob("submission.csv")) and not list(out.rglob("test*.npy"))
