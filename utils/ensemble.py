"""Combine the predictions of several models: out-of-fold assembly, averages, same-data checks.

Probabilities are averaged, never logits: the log loss is convex in the probability, so
the loss of the mean is never above the mean of the members' losses (Jensen's
inequality), which averaging logits does not promise.
"""
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from utils.labels import LABELS
from utils.metrics import weighted_log_loss

PRED_COLUMNS = [f"pred_{k}" for k in LABELS]
REFINED_COLUMNS = [f"refined_{k}" for k in LABELS]  # oof_predictions.csv, where the refiner was used
DATA_FILES = ("stage_2_train.csv", "stage_2_sample_submission.csv")


def final_columns(predictions: pd.DataFrame) -> list[str]:
    """The columns of a validation or out-of-fold table that the run submitted like: the
    refined ones where its refiner was used, else the per-slice ones."""
    return REFINED_COLUMNS if set(REFINED_COLUMNS) <= set(predictions.columns) else PRED_COLUMNS


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
    out = {}
    for name in DATA_FILES:
        digest = hashlib.sha1()
        with open(Path(data_dir) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out[name] = digest.hexdigest()
    return out


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
    """On the labelled images every run predicted (validation or out of fold): each run's
    weighted log loss and the blend's, on the values each run submitted like (its refined
    ones where its refiner was used: final_columns). Empty when the runs share no image."""
    names = list(predictions)
    shared = predictions[names[0]].index
    for name in names[1:]:
        shared = shared.intersection(predictions[name].index)
    if shared.empty:
        return {}
    shared = shared.sort_values()
    y = predictions[names[0]].loc[shared, list(LABELS)].to_numpy()
    probs = [predictions[n].loc[shared, final_columns(predictions[n])].set_axis(PRED_COLUMNS, axis=1)
             for n in names]
    scores = {n: weighted_log_loss(y, p.to_numpy()) for n, p in zip(names, probs)}
    return {"n_images": len(shared), "runs": scores,
            "blend": weighted_log_loss(y, average(probs, weights).to_numpy())}
