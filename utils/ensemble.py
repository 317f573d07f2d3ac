"""Combine the predictions of several models: out-of-fold assembly, averages, same-data checks.

Probabilities are averaged, never logits: the log loss is convex in the probability, so
the loss of the mean is never above the mean of the members' losses (Jensen's
inequality), which averaging logits does not promise.
"""
import contextlib
import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from utils import rundir
from utils.errors import UserError
from utils.labels import LABELS
from utils.metrics import weighted_log_loss
from utils.rundir import PRED_COLUMNS
from utils.submission import write_checked_submission

LOG = logging.getLogger(__name__)
DATA_FILES = ("stage_2_train.csv", "stage_2_sample_submission.csv")


def assemble_oof(by_fold: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """Each fold's validation predictions (indexed by image, labels and pred_* columns) as
    one table with a ``fold`` column; an image predicted by two folds is an error."""
    oof = pd.concat([frame.assign(fold=fold) for fold, frame in sorted(by_fold.items())])
    twice = oof.index[oof.index.duplicated()]
    if len(twice):
        raise ValueError(f"{len(twice)} images are in the validation set of two folds, e.g. {twice[0]}")
    return oof


def average(tables: list[pd.DataFrame], weights=None) -> pd.DataFrame:
    """The weighted mean of probability tables with the same rows and columns."""
    if not tables:
        raise ValueError("nothing to average")
    first = tables[0]
    for table in tables[1:]:
        if not (table.index.equals(first.index) and table.columns.equals(first.columns)):
            raise ValueError("the tables to average hold different images or columns")
    w = np.ones(len(tables)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(tables),) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {len(tables)} non-negative numbers, not all 0; got {weights!r}")
    stacked = np.stack([t.to_numpy(dtype=np.float64) for t in tables])
    return pd.DataFrame(np.tensordot(w / w.sum(), stacked, axes=1), index=first.index, columns=first.columns)


def data_fingerprint(data_dir) -> dict[str, str]:
    """SHA-1 of the label file and the sample submission: runs on the same data agree."""
    return {name: file_sha1(Path(data_dir) / name) for name in DATA_FILES}


def file_sha1(path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_same_data(fingerprints: dict[str, dict]) -> None:
    """ValueError naming the runs and the file that differ, if the runs were not made on
    the same label file and sample submission."""
    runs = list(fingerprints)
    for run in runs[1:]:
        for name in DATA_FILES:
            a, b = fingerprints[runs[0]].get(name), fingerprints[run].get(name)
            if a != b:
                raise ValueError(f"{runs[0]} and {run} were made on different data: their {name} "
                                 f"differ (sha1 {str(a)[:12]} vs {str(b)[:12]})")


def shared_scores(predictions: dict[str, pd.DataFrame], weights=None) -> dict:
    """On the labelled images every run predicted (each a table of labels and the pred_*
    it submitted: rundir.validation_predictions), each run's weighted log loss and the
    blend's. Empty when the runs share no image."""
    names = list(predictions)
    shared = predictions[names[0]].index
    for name in names[1:]:
        shared = shared.intersection(predictions[name].index)
    if shared.empty:
        return {}
    shared = shared.sort_values()
    y = predictions[names[0]].loc[shared, list(LABELS)].to_numpy()
    probs = [predictions[n].loc[shared, PRED_COLUMNS] for n in names]
    scores = {n: weighted_log_loss(y, p.to_numpy()) for n, p in zip(names, probs)}
    return {"n_images": len(shared), "runs": scores,
            "blend": weighted_log_loss(y, average(probs, weights).to_numpy())}


def run_ensemble(runs: list[str], weights, out_dir: str | None, data_dir: str | None, overwrite: bool) -> int:
    """--ensemble RUN_DIR ...: the weighted average of finished runs' test predictions, as
    one checked submission in ``out_dir``, with each run's and the blend's loss on the
    validation or out-of-fold images they share."""
    if not out_dir:
        raise UserError("--ensemble needs --out-dir, where the blended submission goes")
    if weights is not None and len(weights) != len(runs):
        raise UserError(f"--ensemble-weights needs one weight per run: {len(runs)} runs, {len(weights)} weights")
    dirs = [Path(r) for r in runs]
    for run in dirs:
        for name in (rundir.METRICS, rundir.TEST_PREDICTIONS, rundir.CONFIG):
            if not (run / name).is_file():
                raise UserError(f"{run} is not a finished run of this pipeline: it has no {name}")
    try:
        check_same_data({str(r): rundir.read_json(r / rundir.METRICS).get("data", {}) for r in dirs})
        blended = average([rundir.read_predictions(r / rundir.TEST_PREDICTIONS) for r in dirs], weights)
    except ValueError as err:
        raise UserError(str(err)) from None
    data = Path(data_dir or rundir.read_json(dirs[0] / rundir.CONFIG)["data_dir"])
    with contextlib.ExitStack() as held:
        out = rundir.prepare_out_dir(Path(out_dir), held, resume=False, overwrite=overwrite)
        write_ensemble(dirs, weights, blended, data, out)
    return 0


def write_ensemble(dirs: list[Path], weights, blended: pd.DataFrame, data_dir: Path, out_dir: Path) -> None:
    """The blended submission, its scores on the shared validation images (metrics.json in
    rundir.METRIC_KEYS' schema), ensemble.json."""
    write_checked_submission(blended, data_dir / "stage_2_sample_submission.csv", out_dir)
    shared = shared_scores({str(r): rundir.validation_predictions(r) for r in dirs}, weights)
    for name, loss in shared.get("runs", {}).items():
        LOG.info(f"  {name}: {loss:.4f} on the {shared['n_images']} validation images all runs share")
    scores = {}
    if shared:
        LOG.info(f"  blend: {shared['blend']:.4f}")
        scores = {"validated_on": "shared_validation", "n_validation": shared["n_images"],
                  "weighted_log_loss": shared["blend"], "weighted_log_loss_per_run": shared["runs"]}
    rundir.write_json(out_dir / rundir.ENSEMBLE, {"runs": [str(r.resolve()) for r in dirs], "weights": weights})
    rundir.write_json(out_dir / rundir.METRICS, {
        **scores, "n_test": len(blended), "n_test_predicted_with_prior": 0, "runs": [str(r) for r in dirs],
        "weights": weights, "data": rundir.read_json(dirs[0] / rundir.METRICS).get("data")})
