"""Calibration of predicted probabilities: reliability tables, expected calibration error, and
per-class temperature scaling that is used only when it helps out of fold.

    from utils.calibration import apply_temperatures, calibration_summary, decide_calibration
    metrics.update({f"val_{k}": v for k, v in calibration_summary(y_val, p_val).items()})
    decision = decide_calibration(y_val, p_val, groups)    # patient-grouped folds
    if decision["use"]:
        test_probs = apply_temperatures(test_probs, decision["temperatures"])

A label may be unknown (NaN in `y`): each class is measured and fitted on its known rows
only; a class with none has NaN metrics and temperature 1.

Reliability: each class's predictions fall into `n_bins` equal-width bins [k/n, (k+1)/n) on
[0, 1], the last one closed so that p = 1 counts. The expected calibration error (ECE) is
sum over bins of count / N * |observed frequency - mean prediction|: 0 for a perfectly
calibrated model, and for a constant prediction just |prevalence - prediction|.

Temperature scaling divides each class's logit by its own T > 0: T > 1 softens an
overconfident model, T < 1 sharpens a timid one, and the ranking (hence AUC) never
changes. T is fitted by minimising that class's binary log loss, which in 1/T is convex, so
a golden-section search over log T finds the one minimum without derivatives or scipy.
A temperature fitted on the rows it is scored on always looks better, so decide_calibration
scores it out of fold, by patient, and says to use it only if the competition's weighted
log loss of the held-out rows goes down.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import pandas as pd

from utils.labels import LABELS
from utils.metrics import (EPS, check_probabilities, fold_labels, logit, per_class_log_loss, sigmoid,
                           weighted_log_loss)
from utils.split import fold_count, kfold_by_patient, sorted_codes

N_BINS = 10
RELIABILITY_COLUMNS = ("lower", "upper", "count", "mean_predicted", "observed")
# The search range of each temperature: beyond 20 a prediction is nearly flat at 0.5, below
# 0.05 it is pushed to 0 or 1; a fit that ends at a bound says the model is useless or
# timid, not that the bound is too tight.
T_MIN, T_MAX = 0.05, 20.0
# Golden section stops when the bracket in log T is this narrow (about 40 losses per
# class): rounding in the loss blurs its minimum over about that width anyway.
LOG_T_TOLERANCE = 1e-8
_GOLDEN = (math.sqrt(5) - 1) / 2


class CalibrationWarning(UserWarning):
    """decide_calibration had to change what it was asked for (fewer folds than requested)."""


# ---------------------------------------------------------------------------------------
# Reliability and expected calibration error, one class at a time.

def _check_class(y, p) -> tuple[np.ndarray, np.ndarray]:
    """One class's labels and predictions, checked, on the rows whose label is known
    (NaN in `y`: unknown; NaN in `p` is an error)."""
    arrays = []
    for name, values in (("y", y), ("p", p)):
        array = np.asarray(values, dtype=np.float64)
        if array.ndim != 1 or len(array) == 0:
            raise ValueError(f"{name} must be 1-D and non-empty (one class), got shape {array.shape}")
        bad, what = (np.isinf(array), "infinite") if name == "y" else (~np.isfinite(array), "NaN or infinite")
        if bad.any():
            raise ValueError(f"{name} has {int(bad.sum())} {what} values")
        if ((array < 0) | (array > 1)).any():
            raise ValueError(f"{name} has {int(((array < 0) | (array > 1)).sum())} values outside [0, 1]")
        arrays.append(array)
    if len(arrays[0]) != len(arrays[1]):
        raise ValueError(f"y has {len(arrays[0])} rows but p has {len(arrays[1])}")
    known = ~np.isnan(arrays[0])
    return arrays[0][known], arrays[1][known]


def _check_n_bins(n_bins) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    return int(n_bins)


def reliability(y, p, n_bins: int = N_BINS) -> pd.DataFrame:
    """One row per bin of one class: lower, upper, count, mean_predicted, observed.

    `y` holds the labels (0/1, or soft targets in [0, 1], or NaN: unknown, a row left
    out) and `p` the predicted probabilities, both 1-D. An empty bin has count 0 and NaN
    means; so has every bin when no label is known.
    """
    truth, pred = _check_class(y, p)
    n_bins = _check_n_bins(n_bins)
    lower = np.arange(n_bins) / n_bins
    # Counting the lower edges at or below p puts p = k/n in bin k exactly, where
    # floor(p * n) would not (0.29 * 100 is 28.999...), and p = 1 in the last bin.
    index = np.searchsorted(lower, pred, side="right") - 1
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(index, weights=pred, minlength=n_bins) / count
        observed = np.bincount(index, weights=truth, minlength=n_bins) / count
    return pd.DataFrame({"lower": lower, "upper": np.arange(1, n_bins + 1) / n_bins,
                         "count": count.astype(np.int64), "mean_predicted": mean_predicted,
                         "observed": observed})[list(RELIABILITY_COLUMNS)]


def _bin_gaps(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    filled = table[table["count"] > 0]
    return filled["count"].to_numpy(), (filled["observed"] - filled["mean_predicted"]).abs().to_numpy()


def expected_calibration_error(y, p, n_bins: int = N_BINS) -> float:
    """Sum over bins of count / N * |observed frequency - mean prediction|, for one class,
    over its known rows (N of them); NaN when none is known."""
    count, gap = _bin_gaps(reliability(y, p, n_bins))
    return float((count * gap).sum() / count.sum()) if count.sum() else float("nan")


def max_calibration_error(y, p, n_bins: int = N_BINS) -> float:
    """The largest |observed frequency - mean prediction| of a non-empty bin, for one class,
    over its known rows; NaN when none is known."""
    _, gap = _bin_gaps(reliability(y, p, n_bins))
    return float(gap.max()) if len(gap) else float("nan")


def calibration_summary(y, p, n_bins: int = N_BINS) -> dict[str, dict[str, float]]:
    """{"ece": {label: ...}, "max_calibration_error": {label: ...}} of (n, 6) labels and
    predictions in LABELS order: each metric keyed by class, as metrics.json's per-class
    entries are (the report shows each as a column of its per-class table). Each class is
    measured on its known rows; NaN for a class with none."""
    truth, pred = check_predictions(y, p)
    return {"ece": {k: expected_calibration_error(truth[:, j], pred[:, j], n_bins) for j, k in enumerate(LABELS)},
            "max_calibration_error": {k: max_calibration_error(truth[:, j], pred[:, j], n_bins)
                                      for j, k in enumerate(LABELS)}}


def check_predictions(y, p) -> tuple[np.ndarray, np.ndarray]:
    """(n, 6) labels (NaN: unknown) and predictions as float64 arrays of one shape, or a
    ValueError saying why not."""
    truth, pred = check_probabilities(y, "y", allow_unknown=True), check_probabilities(p, "p")
    if truth.shape != pred.shape:
        raise ValueError(f"y has shape {truth.shape} but p has shape {pred.shape}")
    return truth, pred


# ---------------------------------------------------------------------------------------
# Temperature scaling.

def _softplus(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def _loss_at(log_t: float, z: np.ndarray, y: np.ndarray) -> float:
    """Mean binary log loss of sigmoid(s), s = z / T, unclipped: y * softplus(-s) +
    (1 - y) * softplus(s), written with softplus(-s) = softplus(s) - s to take one log."""
    s = z * math.exp(-log_t)
    return float((_softplus(s) - y * s).mean())


def _fit_temperature(z: np.ndarray, y: np.ndarray) -> float:
    """The T in [T_MIN, T_MAX] minimising one class's log loss, by golden section on log T."""
    if not z.any():
        return 1.0  # every prediction 0.5: all temperatures score the same
    a, b = math.log(T_MIN), math.log(T_MAX)
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = _loss_at(c, z, y), _loss_at(d, z, y)
    while b - a > LOG_T_TOLERANCE:
        if fc <= fd:  # the minimum lies in [a, d]; ties keep the lower side, deterministically
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = _loss_at(c, z, y)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = _loss_at(d, z, y)
    return math.exp((a + b) / 2)


def fit_temperatures(y, p) -> np.ndarray:
    """One temperature per class (6,), each minimising the binary log loss of
    sigmoid(logit(p) / T) over the rows of (n, 6) labels `y` and predictions `p` where
    that class's label is known; 1.0 (no change) for a class with no known row."""
    truth, pred = check_predictions(y, p)
    z = logit(pred, EPS)  # the metric's own clip: the loss fitted is the loss scored
    known = ~np.isnan(truth)
    return np.array([_fit_temperature(z[known[:, j], j], truth[known[:, j], j]) if known[:, j].any() else 1.0
                     for j in range(len(LABELS))])


def apply_temperatures(p, temperatures) -> np.ndarray:
    """sigmoid(logit(p) / T) per class: (n, 6) probabilities in, (n, 6) float64 out."""
    pred = check_probabilities(p, "p")
    t = np.asarray(temperatures, dtype=np.float64)
    if t.shape != (len(LABELS),):
        raise ValueError(f"temperatures must have shape ({len(LABELS)},) in LABELS order, got {t.shape}")
    if not (np.isfinite(t).all() and (t > 0).all()):
        raise ValueError(f"temperatures must be finite and positive, got {t.tolist()}")
    return sigmoid(logit(pred, EPS) / t)


# ---------------------------------------------------------------------------------------
# The honest check: fitted on some patients, scored on the others.

def _check_folds(groups, n_rows: int, n_folds) -> tuple[np.ndarray, int]:
    group_array = np.asarray(groups)
    if group_array.shape != (n_rows,):
        raise ValueError(f"groups must be 1-D with {n_rows} rows, got shape {group_array.shape}")
    if isinstance(n_folds, bool) or not isinstance(n_folds, numbers.Integral) or n_folds < 2:
        raise ValueError(f"n_folds must be an int >= 2, got {n_folds!r}")
    _, keys = sorted_codes(group_array, "groups", "; use resolve_groups")
    return group_array, fold_count(len(keys), n_folds, "out-of-fold calibration", CalibrationWarning,
                                   stacklevel=3)


def decide_calibration(y, p, groups, n_folds: int = 5, seed: int = 0, n_bins: int = N_BINS) -> dict:
    """Whether per-class temperatures lower the weighted log loss out of fold, as a JSON-ready dict.

    `y` (n, 6) 0/1 labels (NaN: unknown, left out of every loss and fit), `p` (n, 6)
    predictions (validation or out-of-fold ones) and the patient group of each row (see
    resolve_groups). Rows are split into kfold_by_patient's folds; each fold's rows are
    scaled by temperatures fitted on the other folds, and the weighted log loss of all rows
    so scaled (loss_after_oof) is compared with that of `p` (loss_before). `use` is
    loss_after_oof < loss_before; `temperatures` are fitted on all rows, for the test set. With fewer groups than n_folds, one fold per group (and a
    CalibrationWarning); fewer than 2 groups is an error.
    """
    truth, pred = check_predictions(y, p)
    group_array, n_folds = _check_folds(groups, len(truth), n_folds)
    folds = kfold_by_patient(fold_labels(truth), group_array, n_folds, seed)
    oof = np.empty_like(pred)
    fold_temperatures = []
    for fold in range(n_folds):
        held = folds == fold
        temperatures = fit_temperatures(truth[~held], pred[~held])
        oof[held] = apply_temperatures(pred[held], temperatures)
        fold_temperatures.append(temperatures.tolist())
    before, after = weighted_log_loss(truth, pred), weighted_log_loss(truth, oof)
    return {
        "use": bool(after < before),
        "loss_before": before,
        "loss_after_oof": after,
        "temperatures": fit_temperatures(truth, pred).tolist(),
        "per_class_before": per_class_log_loss(truth, pred),
        "per_class_after_oof": per_class_log_loss(truth, oof),
        "ece_before": calibration_summary(truth, pred, n_bins)["ece"],
        "ece_after_oof": calibration_summary(truth, oof, n_bins)["ece"],
        "fold_temperatures": fold_temperatures,
        "n_folds": n_folds,
        "seed": int(seed),
    }


def calibration_metrics(decision: dict | None) -> dict:
    """metrics.json's calibration keys of a decide_calibration decision (none without one)."""
    if decision is None:
        return {}
    return {"calibration_used": decision["use"], "weighted_log_loss_calibrated": decision["loss_after_oof"],
            "calibration_temperatures": dict(zip(LABELS, decision["temperatures"]))}
