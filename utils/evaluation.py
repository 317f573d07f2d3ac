"""The local validation of a trained model on a site's own labelled scans: the figures that
`kernel.py --evaluate DIR --labels CSV --checkpoint RUN` writes to metrics.json and
report/evaluate.html, each with a patient-level bootstrap interval.

    from utils.evaluation import evaluate, series_frame, slice_frame, worst_series, worst_slices
    slices = slice_frame(keys, y, p, series, patients)      # y: NaN where a label is unknown
    summary = evaluate(slices, site_series_labels, threshold=0.5,
                       validation=rundir.validation_predictions(run))   # -> metrics.json
    write_evaluate_html(path, summary, worst_slices(slices),
                        worst_series(series_frame(slices, site_series_labels)), heatmaps, notes)

Unknown labels (NaN) are left out class by class: a class's figures use the slices whose
label of that class is known, and the weighted log loss is, over the known entries only,
sum of w_c * LL / sum of w_c (w: utils.metrics.CLASS_WEIGHTS, `any` twice): the
competition's metric when every entry is known.

A series shows a subtype when any of its slices does, so its probability of a class is the
maximum over its slices, and it is positive when that maximum of `any` exceeds the
threshold: the rules of --predict's series.csv (utils.series_results.series_table, its
max_<label> and flag). A series' label of a class is the site's series-level label where
given (it wins over the slices), else its slices': 1 if a known slice label is 1, 0 if all
its slices are known 0, else unknown.

The validation threshold is the one the run's own validation would choose: the slice-level
`any` threshold t that maximises Youden's J = sensitivity + specificity - 1 on the run's
validation (or out-of-fold) predictions, a slice being positive when p > t as --predict
has it; the candidates are the distinct predicted values, and ties go to the lowest.

Intervals come from a bootstrap over patients, the unit the site sampled: a resample draws
as many patients as there are, with replacement, and every figure is recomputed with each
slice and series weighted by how often its patient was drawn (a patient drawn twice counts
twice). Per-patient sums make that a matrix product, and the AUC a few cumulative sums
over the rows sorted once (_Ranking), so 1000 resamples of 50 000 slices take seconds. The
interval is the percentile one; resamples in which a figure is undefined (no positive, or
no negative, left) are skipped, and n_boot says how many were used. With one patient
every resample is the sample itself, which says nothing of how the figures vary between
patients: no interval (low and high null, n_boot 0).

A figure undefined on the data (a class without known labels, or with one value only) is
NaN in the tables here and null in the summary, which is strict JSON.
"""
from __future__ import annotations

import html
import math
import numbers
from collections.abc import Callable, Mapping
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from utils.calibration import N_BINS, expected_calibration_error, reliability
from utils.figures import CLASS_COLORS, png_bytes, write_bytes
from utils.labels import ANY as ANY_INDEX
from utils.labels import LABELS
from utils.metrics import CLASS_WEIGHTS, EPS
from utils.report import html_page, png_src
from utils.rundir import PRED_COLUMNS
from utils.series_results import image_png
from utils.split import sorted_codes

ANY = LABELS[ANY_INDEX]
PRED_ANY = PRED_COLUMNS[ANY_INDEX]
AT_COLUMNS = [f"at_{k}" for k in LABELS]  # the slice of each class's maximum in a series
SERIES, PATIENT = "series", "patient"  # the slice table's columns besides labels and pred_*
WEIGHTS = CLASS_WEIGHTS.astype(np.float64)
N_BOOT = 1000
LEVEL = 0.95
TOP_K = 10
# Resamples are recomputed this many (resamples x rows) values at a time: 32 MB of float64.
CHUNK_ELEMENTS = 1 << 22
WORST_COLUMNS = ("loss", "worst_class", "label", "predicted")

Estimator = Callable[[np.ndarray], np.ndarray]  # (B, patients) draw counts -> (B,) figure


# ---------------------------------------------------------------------------------------
# Inputs: one table of slices, validated once.

def _check_binary(values: np.ndarray, name: str) -> None:
    known = values[~np.isnan(values)]
    bad = (known != 0) & (known != 1)
    if bad.any():
        raise ValueError(f"{name} must be 0, 1 or NaN (unknown), found {int(bad.sum())} other values "
                         f"(e.g. {known[bad][0]})")


def _float_array(values, name: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} is not numeric: {err}") from None


def slice_frame(keys, y, p, series, patients) -> pd.DataFrame:
    """The slices as this module takes them: indexed by slice key ("slice"), the six labels
    (NaN where unknown), pred_<label>, series and patient. `y` and `p` are (n, 6) in LABELS
    order, the others (n,)."""
    y, p = _float_array(y, "y"), _float_array(p, "p")
    n = len(y)
    for name, shape in (("y", y.shape), ("p", p.shape)):
        if shape != (n, len(LABELS)):
            raise ValueError(f"{name} must have shape (n, {len(LABELS)}) in LABELS order, got {shape}")
    for name, values in (("keys", keys), ("series", series), ("patients", patients)):
        if np.shape(values) != (n,):
            raise ValueError(f"{name} must be 1-D with {n} rows, got shape {np.shape(values)}")
    frame = pd.DataFrame(y, index=pd.Index(keys, name="slice"), columns=list(LABELS))
    frame[PRED_COLUMNS] = p
    frame[SERIES], frame[PATIENT] = list(series), list(patients)
    return check_slices(frame)


def check_slices(slices: pd.DataFrame) -> pd.DataFrame:
    """``slices`` if it is slice_frame's table (labels 0/1/NaN, predictions in [0, 1], every
    series within one patient), else a ValueError saying why not."""
    if not isinstance(slices, pd.DataFrame):
        raise ValueError(f"slices must be a DataFrame (see slice_frame), got {type(slices).__name__}")
    missing = [c for c in (*LABELS, *PRED_COLUMNS, SERIES, PATIENT) if c not in slices.columns]
    if missing:
        raise ValueError(f"slices lack the columns {missing}")
    if slices.empty:
        raise ValueError("slices has no rows")
    if not slices.index.is_unique or slices.index.hasnans:
        raise ValueError("slice keys (the index) must be unique and not missing")
    _check_binary(_float_array(slices[list(LABELS)], "labels"), "labels")
    pred = _float_array(slices[PRED_COLUMNS], "predictions")
    if not (np.isfinite(pred).all() and ((pred >= 0) & (pred <= 1)).all()):
        raise ValueError("predictions must be finite probabilities in [0, 1]")
    if slices[[SERIES, PATIENT]].isna().any().any():
        raise ValueError("every slice needs its series and patient")
    patients_per_series = slices.groupby(SERIES)[PATIENT].nunique()
    if (patients_per_series > 1).any():
        raise ValueError(f"series {list(patients_per_series.index[patients_per_series > 1][:5])} "
                         f"have slices of more than one patient")
    return slices


def _check_threshold(threshold, name: str = "threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 < threshold < 1:
        raise ValueError(f"{name} must be between 0 and 1, got {threshold!r}")
    return float(threshold)


def _check_count(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------
# Series: the maximum over their slices, and their labels.

def series_labels_from_slices(slices: pd.DataFrame) -> pd.DataFrame:
    """Per series and class, from its slices: 1 if a known slice label is 1, 0 if all its
    slices are known 0, else NaN."""
    labels, by = slices[list(LABELS)], slices[SERIES]
    has_one = labels.eq(1).groupby(by).any()
    all_zero = labels.eq(0).groupby(by).all()
    return has_one.astype(np.float64).where(has_one | all_zero)


def _check_series_labels(series_labels: pd.DataFrame, known_series: pd.Index) -> pd.DataFrame:
    if not isinstance(series_labels, pd.DataFrame):
        raise ValueError(f"series_labels must be a DataFrame, got {type(series_labels).__name__}")
    missing = [k for k in LABELS if k not in series_labels.columns]
    if missing:
        raise ValueError(f"series_labels lack the columns {missing}")
    if not series_labels.index.is_unique:
        raise ValueError("series_labels has repeated series keys")
    labels = series_labels[list(LABELS)]
    _check_binary(_float_array(labels, "series_labels"), "series_labels")
    unknown = labels.index.difference(known_series)
    if len(unknown):
        raise ValueError(f"series_labels name {len(unknown)} series without predicted slices "
                         f"(e.g. {list(unknown[:5])})")
    return labels.astype(np.float64)


def series_frame(slices: pd.DataFrame, series_labels: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per series (index "series", sorted): its patient, n_slices, its labels (the
    site's ``series_labels`` entry where not NaN, else series_labels_from_slices), pred_<label>
    (the maximum over its slices) and at_<label> (the key of the slice where it occurs)."""
    slices = check_slices(slices)
    groups = slices.groupby(SERIES, sort=True)
    table = pd.DataFrame({PATIENT: groups[PATIENT].first(), "n_slices": groups.size()})
    labels = series_labels_from_slices(slices)
    if series_labels is not None:
        labels = _check_series_labels(series_labels, table.index).reindex(table.index).combine_first(labels)
    at = groups[PRED_COLUMNS].idxmax().set_axis(AT_COLUMNS, axis=1)
    table = table.join(labels[list(LABELS)]).join(groups[PRED_COLUMNS].max()).join(at)
    return table.rename_axis(SERIES)


# ---------------------------------------------------------------------------------------
# Figures of any weighting of the patients: (B, patients) counts in, (B,) figures out.

def _entry_losses(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Binary log loss of each entry (NaN where the label is), clipped as utils.metrics clips."""
    p = np.clip(p, EPS, 1 - EPS)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def _per_patient(codes: np.ndarray, values: np.ndarray, n_patients: int) -> np.ndarray:
    return np.bincount(codes, weights=values, minlength=n_patients)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> Estimator:
    """A figure that is a ratio of per-patient sums (a mean loss, a sensitivity)."""
    def estimate(counts: np.ndarray) -> np.ndarray:
        total = counts @ denominator
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, (counts @ numerator) / total, np.nan)
    return estimate


class _Ranking:
    """One class's labelled rows sorted by prediction once, so that the ROC AUC of any
    weighting of the patients is a few cumulative sums: the rank-sum formula, each
    (positive, negative) pair counting 1 when the positive is predicted higher, 1/2 on a tie."""

    def __init__(self, y: np.ndarray, p: np.ndarray, patients: np.ndarray):
        order = np.argsort(p, kind="stable")
        y, p, patients = y[order], p[order], patients[order]
        positive = y == 1
        self.positive_patients, self.negative_patients = patients[positive], patients[~positive]
        # The negatives predicted lower than a positive are those before the first row of its
        # run of equal predictions; those tied with it lie between that and the run's end.
        negatives_before = np.r_[0, np.cumsum(~positive)]
        self.below = negatives_before[np.searchsorted(p, p[positive], side="left")]
        self.up_to_ties = negatives_before[np.searchsorted(p, p[positive], side="right")]

    def auc(self, counts: np.ndarray) -> np.ndarray:
        w_pos = counts[:, self.positive_patients]
        w_neg = np.cumsum(counts[:, self.negative_patients], axis=1)
        w_neg = np.concatenate([np.zeros((len(counts), 1)), w_neg], axis=1)  # before the k-th negative
        below = w_neg[:, self.below]
        tied = w_neg[:, self.up_to_ties] - below
        pairs = w_pos.sum(axis=1) * w_neg[:, -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(pairs > 0, (w_pos * (below + tied / 2)).sum(axis=1) / pairs, np.nan)


def _slice_estimators(slices: pd.DataFrame, codes: np.ndarray, n_patients: int) -> dict[tuple, Estimator]:
    y, p = slices[list(LABELS)].to_numpy(np.float64), slices[PRED_COLUMNS].to_numpy(np.float64)
    known = ~np.isnan(y)
    losses = np.nan_to_num(_entry_losses(y, p))
    loss_sums = np.stack([_per_patient(codes, losses[:, j], n_patients) for j in range(len(LABELS))], axis=1)
    known_counts = np.stack([_per_patient(codes, known[:, j], n_patients) for j in range(len(LABELS))], axis=1)
    estimators = {("slice", "weighted_log_loss"): _ratio(loss_sums @ WEIGHTS, known_counts @ WEIGHTS)}
    for j, label in enumerate(LABELS):
        rows = known[:, j]
        estimators[("slice", "per_class", label, "log_loss")] = _ratio(loss_sums[:, j], known_counts[:, j])
        estimators[("slice", "per_class", label, "auc")] = _Ranking(y[rows, j], p[rows, j], codes[rows]).auc
    return estimators


def _series_estimators(series: pd.DataFrame, codes: np.ndarray, n_patients: int,
                       thresholds: Mapping[str, float]) -> dict[tuple, Estimator]:
    estimators = {}
    for label, pred in zip(LABELS, PRED_COLUMNS):
        rows = series[label].notna().to_numpy()
        estimators[("series", "per_class", label, "auc")] = _Ranking(
            series[label].to_numpy()[rows], series[pred].to_numpy()[rows], codes[rows]).auc
    y = series[ANY].to_numpy()
    for name, threshold in thresholds.items():
        called = series[PRED_ANY].to_numpy() > threshold
        for figure, truth in (("sensitivity", y == 1), ("specificity", y == 0)):
            hits = truth & (called if figure == "sensitivity" else ~called)
            estimators[("series", name, figure)] = _ratio(_per_patient(codes, hits, n_patients),
                                                          _per_patient(codes, truth, n_patients))
    return estimators


# ---------------------------------------------------------------------------------------
# The bootstrap over patients.

def patient_resamples(n_patients: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, n_patients) int64: how often each patient (in sorted key order) is drawn in
    each resample of n_patients draws with replacement. The same for a seed on every machine."""
    n_patients, n_boot = _check_count(n_patients, "n_patients", 1), _check_count(n_boot, "n_boot", 0)
    draws = np.random.default_rng(_check_count(seed, "seed", 0)).integers(0, n_patients, (n_boot, n_patients))
    offsets = n_patients * np.arange(n_boot)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=n_boot * n_patients).reshape(n_boot, n_patients)


def _json_float(value) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _figure(value: float, samples: np.ndarray, level: float) -> dict:
    """{"value", "low", "high", "n_boot"}: the percentile interval of the defined resamples."""
    used = samples[np.isfinite(samples)] if math.isfinite(value) else samples[:0]
    low, high = np.percentile(used, [50 * (1 - level), 50 * (1 + level)]) if len(used) else (None, None)
    return {"value": _json_float(value), "low": _json_float(low), "high": _json_float(high), "n_boot": len(used)}


def _bootstrap(estimators: Mapping[tuple, Estimator], n_patients: int, n_rows: int, n_boot: int, seed: int,
               level: float) -> dict[tuple, dict]:
    """Each estimator's figure on the data (every patient once) and its interval."""
    points = {key: float(f(np.ones((1, n_patients)))[0]) for key, f in estimators.items()}
    samples = {key: [np.empty(0)] for key in estimators}
    if n_patients > 1:  # one patient: every resample is the sample
        counts = patient_resamples(n_patients, n_boot, seed).astype(np.float64)
        chunk = max(1, CHUNK_ELEMENTS // max(n_rows, n_patients))
        for start in range(0, n_boot, chunk):
            for key, f in estimators.items():
                samples[key].append(f(counts[start:start + chunk]))
    return {key: _figure(points[key], np.concatenate(samples[key]), level) for key in estimators}


# ---------------------------------------------------------------------------------------
# The threshold the run's own validation would choose.

def youden_threshold(y, p) -> tuple[float, float]:
    """(t, J): the distinct value t of ``p`` that maximises Youden's J = sensitivity +
    specificity - 1 when p > t is called positive, the lowest on a tie. NaN labels are
    left out; both classes must remain."""
    y, p = _float_array(y, "y"), _float_array(p, "p")
    if y.ndim != 1 or y.shape != p.shape:
        raise ValueError(f"y and p must be 1-D of one length, got shapes {y.shape} and {p.shape}")
    _check_binary(y, "y")
    if not (np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()):
        raise ValueError("p must be finite probabilities in [0, 1]")
    known = ~np.isnan(y)
    y, p = y[known] == 1, p[known]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"a threshold needs positive and negative labels, got {n_pos} and {n_neg}")
    values, index = np.unique(p, return_inverse=True)
    true_pos = n_pos - np.cumsum(np.bincount(index[y], minlength=len(values)))  # above each value
    true_neg = np.cumsum(np.bincount(index[~y], minlength=len(values)))  # at or below it
    # J * n_pos * n_neg in integers, so that equal J compare equal and argmax takes the lowest
    best = int(np.argmax(true_pos * n_neg + true_neg * n_pos))
    return float(values[best]), float(true_pos[best] / n_pos + true_neg[best] / n_neg - 1)


def validation_threshold(validation: pd.DataFrame) -> dict:
    """youden_threshold of `any` on a run's validation table (rundir.validation_predictions:
    the labels and, as pred_<label>, what the run submitted): {"threshold", "youden_j", "n",
    "n_positive"}."""
    if not isinstance(validation, pd.DataFrame) or not {ANY, PRED_ANY} <= set(validation.columns):
        raise ValueError(f"validation must be a DataFrame with the columns {ANY!r} and {PRED_ANY!r}")
    y = _float_array(validation[ANY], "validation labels")
    threshold, j = youden_threshold(y, validation[PRED_ANY])
    return {"threshold": threshold, "youden_j": j, "n": int((~np.isnan(y)).sum()), "n_positive": int((y == 1).sum())}


# ---------------------------------------------------------------------------------------
# Everything for metrics.json: one JSON-ready dict.

def _slice_classes(slices: pd.DataFrame) -> dict[str, dict]:
    """Per class, on its slices with a known label: how many, how many positive, the ECE and
    the reliability table (utils.calibration, N_BINS bins) that evaluate.html draws."""
    out = {}
    for label, pred in zip(LABELS, PRED_COLUMNS):
        known = slices[label].notna()
        y, p = slices.loc[known, label].to_numpy(np.float64), slices.loc[known, pred].to_numpy(np.float64)
        entry = {"n_known": len(y), "n_positive": int((y == 1).sum()), "ece": None, "reliability": None}
        if len(y):
            table = reliability(y, p, N_BINS)
            entry["ece"] = expected_calibration_error(y, p, N_BINS)
            entry["reliability"] = {"count": [int(c) for c in table["count"]],
                                    **{c: [_json_float(v) for v in table[c]] for c in ("mean_predicted", "observed")}}
        out[label] = entry
    return out


def _put(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _skeleton(slices: pd.DataFrame, series: pd.DataFrame, threshold: float, chosen: dict | None,
              n_patients: int, bootstrap: dict) -> dict:
    """The summary's counts, thresholds and settings, before the bootstrapped figures go in."""
    per_series = {k: {"n_known": int(series[k].notna().sum()), "n_positive": int((series[k] == 1).sum())}
                  for k in LABELS}
    return {
        "counts": {"slices": len(slices), "slices_labelled": int(slices[list(LABELS)].notna().any(axis=1).sum()),
                   "series": len(series), "series_labelled": int(series[list(LABELS)].notna().any(axis=1).sum()),
                   "patients": n_patients},
        "slice": {"per_class": _slice_classes(slices)},
        "series": {"per_class": per_series, "at_threshold": {"threshold": threshold},
                   "at_validation_threshold": None if chosen is None else {"threshold": chosen["threshold"]}},
        "thresholds": {"threshold": threshold, "validation": chosen},
        "bootstrap": {"unit": "patient", **bootstrap},
    }


def evaluate(slices: pd.DataFrame, series_labels: pd.DataFrame | None = None, *, threshold: float,
             validation: pd.DataFrame | None = None, n_boot: int = N_BOOT, seed: int = 0,
             level: float = LEVEL) -> dict:
    """Every figure of the model on the site's labelled scans, as a JSON-ready dict (strict
    JSON: undefined figures are None):

        counts      slices, slices_labelled, series, series_labelled, patients
        slice       weighted_log_loss: F; per_class[label]: n_known, n_positive, log_loss: F,
                    auc: F, ece, reliability {count, mean_predicted, observed} (None if no label)
        series      per_class[label]: n_known, n_positive, auc: F; at_threshold and
                    at_validation_threshold (None without ``validation``): threshold,
                    sensitivity: F, specificity: F (of `any`, a series positive when its
                    maximum exceeds the threshold)
        thresholds  threshold, validation (validation_threshold's dict, or None)
        bootstrap   unit ("patient"), n_boot, seed, level, n_patients

    where F = {"value", "low", "high", "n_boot"}: the figure and its patient-bootstrap
    interval (see the module's docstring). ``slices``: slice_frame's table; ``series_labels``:
    the site's series-level labels (index series key, the LABELS columns, NaN unknown);
    ``validation``: the run's validation table, to choose the second threshold.
    """
    slices = check_slices(slices)
    threshold = _check_threshold(threshold)
    n_boot, seed = _check_count(n_boot, "n_boot", 0), _check_count(seed, "seed", 0)
    level = _check_threshold(level, "level")
    series = series_frame(slices, series_labels)
    codes, patients = sorted_codes(slices[PATIENT].to_numpy(), "patients")
    series_codes = pd.Index(patients).get_indexer(series[PATIENT])
    chosen = None if validation is None else validation_threshold(validation)
    thresholds = {"at_threshold": threshold} | ({} if chosen is None else
                                                {"at_validation_threshold": chosen["threshold"]})
    estimators = {**_slice_estimators(slices, codes, len(patients)),
                  **_series_estimators(series, series_codes, len(patients), thresholds)}
    summary = _skeleton(slices, series, threshold, chosen, len(patients),
                        {"n_boot": n_boot, "seed": seed, "level": level, "n_patients": len(patients)})
    for path, figure in _bootstrap(estimators, len(patients), len(slices), n_boot, seed, level).items():
        _put(summary, path, figure)
    return summary


# ---------------------------------------------------------------------------------------
# The most wrong slices and series.

def _row_losses(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the weighted log loss over its known entries (NaN when none is known), and
    the index of the class with its largest loss."""
    entries = _entry_losses(y, p)
    known = ~np.isnan(entries)
    with np.errstate(invalid="ignore", divide="ignore"):
        loss = np.nan_to_num(entries) @ WEIGHTS / (known @ WEIGHTS)
    return loss, np.argmax(np.where(known, entries, -np.inf), axis=1)


def _most_wrong(table: pd.DataFrame, y: np.ndarray, p: np.ndarray, k: int) -> tuple[pd.DataFrame, np.ndarray]:
    """``table`` with loss, worst_class, label and predicted (of that class), its k rows of
    largest loss first (ties in table order); the class index of each row kept."""
    loss, worst = _row_losses(y, p)
    rows = np.arange(len(y))
    table = table.assign(loss=loss, worst_class=np.asarray(LABELS)[worst], label=y[rows, worst],
                         predicted=p[rows, worst], _class=worst)
    table = table.dropna(subset=["loss"]).sort_values("loss", ascending=False, kind="stable").head(k)
    return table.drop(columns="_class"), table["_class"].to_numpy()


def worst_slices(slices: pd.DataFrame, k: int = TOP_K) -> pd.DataFrame:
    """The k slices of largest weighted log loss over their known labels, largest first:
    index slice key; series, patient, loss, worst_class (the class of its largest loss),
    label and predicted (of that class). Slices without a known label are left out."""
    slices, k = check_slices(slices), _check_count(k, "k", 1)
    table, _ = _most_wrong(slices[[SERIES, PATIENT]], slices[list(LABELS)].to_numpy(np.float64),
                           slices[PRED_COLUMNS].to_numpy(np.float64), k)
    return table


def worst_series(series: pd.DataFrame, k: int = TOP_K) -> pd.DataFrame:
    """The k series of largest weighted log loss of their maximum probabilities against their
    known series labels (series_frame's table), largest first: index series key; patient,
    n_slices, loss, worst_class, label, predicted, and at (the key of the slice where that
    class's maximum occurs, whose heatmap evaluate.html shows)."""
    missing = [c for c in (PATIENT, "n_slices", *LABELS, *PRED_COLUMNS, *AT_COLUMNS) if c not in series.columns]
    if missing:
        raise ValueError(f"series lacks the columns {missing} (expected series_frame's table)")
    k = _check_count(k, "k", 1)
    table, worst = _most_wrong(series[[PATIENT, "n_slices"]], series[list(LABELS)].to_numpy(np.float64),
                               series[PRED_COLUMNS].to_numpy(np.float64), k)
    return table.assign(at=series.loc[table.index, AT_COLUMNS].to_numpy()[np.arange(len(table)), worst])


# ---------------------------------------------------------------------------------------
# report/evaluate.html

_STYLE = """body{font-family:system-ui,sans-serif;margin:0;background:#f6f6f6;color:#222}
main{max-width:1200px;margin:0 auto;padding:1.5rem 2rem;background:#fff}
h2{border-bottom:2px solid #ddd;margin-top:2rem}table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left}th{background:#f0f0f0}
td.num{text-align:right;font-variant-numeric:tabular-nums}caption{text-align:left;padding:.3rem 0}
figure{margin:0;font-size:.75rem}figure img{width:160px}img.wide{max-width:100%}
.note,.meta{color:#555}"""


def _number(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _cells(values) -> str:
    return "".join(f"<td class='num'>{html.escape(str(v))}</td>" for v in values)


def _figure_cells(figure: Mapping | None) -> str:
    """A bootstrapped figure as three cells: the value, its interval and the resamples used."""
    if not figure:
        return _cells(["n/a", "n/a", 0])
    interval = "n/a" if figure["low"] is None else f"{_number(figure['low'])} – {_number(figure['high'])}"
    return _cells([_number(figure["value"]), interval, figure["n_boot"]])


def _table(caption: str, header: list[str], rows: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    return (f"<table><caption>{caption}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(f'<tr>{r}</tr>' for r in rows)}</tbody></table>")


def _figure_header(name: str, level: float) -> list[str]:
    return [name, f"{level:.0%} interval", "resamples"]


def _slice_section(summary: Mapping, level: float) -> str:
    per_class = summary["slice"]["per_class"]
    rows = [f"<td>{k}</td>" + _cells([c["n_known"], c["n_positive"]]) + _figure_cells(c.get("log_loss"))
            + _figure_cells(c.get("auc")) + _cells([_number(c["ece"])]) for k, c in per_class.items()]
    rows.append("<td>weighted (any twice)</td>" + _cells(["", ""])
                + _figure_cells(summary["slice"]["weighted_log_loss"]) + _cells(["", "", "", ""]))
    header = ["class", "slices labelled", "positive", *_figure_header("log loss", level),
              *_figure_header("ROC AUC", level), "ECE"]
    return _table("Slices with a known label, class by class", header, rows)


def _series_section(summary: Mapping, level: float) -> str:
    series = summary["series"]
    rows = [f"<td>{k}</td>" + _cells([c["n_known"], c["n_positive"]]) + _figure_cells(c.get("auc"))
            for k, c in series["per_class"].items()]
    parts = [_table("Series: probability = the maximum over its slices",
                    ["class", "series labelled", "positive", *_figure_header("ROC AUC", level)], rows)]
    rows = [f"<td>{name}</td>" + _cells([_number(at["threshold"])]) + _figure_cells(at.get("sensitivity"))
            + _figure_cells(at.get("specificity"))
            for name, at in (("given threshold", series["at_threshold"]),
                             ("validation's threshold (Youden)", series["at_validation_threshold"])) if at]
    parts.append(_table(f"Series positive for <code>{ANY}</code>: its maximum over the threshold",
                        ["threshold", "value", *_figure_header("sensitivity", level),
                         *_figure_header("specificity", level)], rows))
    return "".join(parts)


def _reliability_axes(ax, label: str, entry: Mapping) -> None:
    """utils.figures' reliability panel, drawn from the table the summary keeps."""
    table = pd.DataFrame(entry["reliability"]).astype(np.float64)
    filled = table[table["count"] > 0]
    color = CLASS_COLORS[label]
    ax.plot((0, 1), (0, 1), color="#555555", linestyle="--", linewidth=1)
    ax.plot(filled["mean_predicted"], filled["observed"], color=color, linewidth=1.4)
    ax.scatter(filled["mean_predicted"], filled["observed"], s=15 + 285 * filled["count"] / filled["count"].max(),
               color=color, edgecolors="white", linewidths=0.5, zorder=3, clip_on=False)
    ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal")
    ax.set_title(f"{label}: ECE {entry['ece']:.4f}, {entry['n_known']:,} slices", fontsize=10)
    ax.set_xlabel("mean predicted probability", fontsize=8)
    ax.set_ylabel("observed frequency", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def _reliability_section(per_class: Mapping) -> str:
    if not any(c["n_known"] for c in per_class.values()):
        return "<p class='note'>No slice labels: no reliability diagram.</p>"
    fig = Figure(figsize=(12, 8.4), layout="constrained")
    for label, ax in zip(LABELS, fig.subplots(2, 3).ravel()):
        if per_class[label]["n_known"]:
            _reliability_axes(ax, label, per_class[label])
        else:
            ax.set_axis_off()
            ax.text(0.5, 0.5, f"{label}: no slice labels", ha="center", va="center", color="#555555")
    return f"<img class='wide' alt='reliability' src='{png_src(png_bytes(fig))}'>"


def _heatmap_cell(key, heatmaps: Mapping) -> str:
    if key not in heatmaps:
        return "<td></td>"
    label, rgb = heatmaps[key]
    return (f"<td><figure><img alt='heatmap' src='{image_png(rgb)}'>"
            f"<figcaption>{html.escape(str(label))}</figcaption></figure></td>")


def _worst_table(caption: str, table: pd.DataFrame, heatmaps: Mapping, at: str | None) -> str:
    """One row per entry of worst_slices or worst_series, with the heatmap of the slice (its
    key, or the series' ``at`` slice) where ``heatmaps`` has one."""
    extra = [c for c in table.columns if c not in WORST_COLUMNS]
    rows = [f"<td>{number}</td><td>{html.escape(str(key))}</td>"
            + "".join(f"<td>{html.escape(str(row[c]))}</td>" for c in extra)
            + _cells([_number(row["loss"]), row["worst_class"], int(row["label"]), _number(row["predicted"])])
            + _heatmap_cell(row[at] if at else key, heatmaps)
            for number, (key, row) in enumerate(table.iterrows(), 1)]
    return _table(caption, ["#", table.index.name or "key", *extra, *WORST_COLUMNS, "heatmap"], rows)


def write_evaluate_html(path: str | PathLike, summary: Mapping, worst_slices: pd.DataFrame,
                        worst_series: pd.DataFrame, heatmaps: Mapping, notes: list[str]) -> Path:
    """evaluate.html: the notes, the counts, the slice and series figures with their
    intervals (evaluate's ``summary``), the reliability diagram of each class with slice
    labels, and the tables of worst_slices and worst_series, each row with the heatmap of its
    slice (the series' ``at`` slice) where ``heatmaps`` (slice key -> (class, RGB overlay),
    as write_predict_html takes them) has one."""
    level = summary["bootstrap"]["level"]
    parts = [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    counts = summary["counts"]
    parts.append(_table(f"Bootstrap: {summary['bootstrap']['n_boot']} resamples of the patients, seed "
                        f"{summary['bootstrap']['seed']}", list(counts), [_cells(counts.values())]))
    parts += ["<h2>Slices</h2>", _slice_section(summary, level), "<h2>Series</h2>", _series_section(summary, level),
              "<h2>Calibration of the slices</h2>", _reliability_section(summary["slice"]["per_class"]),
              "<h2>Most wrong slices</h2>", _worst_table("Largest weighted log loss", worst_slices, heatmaps, None),
              "<h2>Most wrong series</h2>", _worst_table("Largest weighted log loss", worst_series, heatmaps, "at")]
    page = html_page("Evaluation on your labelled scans", _STYLE, "\n".join(parts),
                     meta=". Research use only: not a medical device.")
    return write_bytes(path, page.encode("utf-8"))
