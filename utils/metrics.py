"""The competition's metric: log loss over all six labels, with `any` weighted twice.

    from utils.metrics import weighted_log_loss, prior_log_loss
    score = weighted_log_loss(y_true, y_pred)      # (n, 6) arrays in LABELS order
    baseline = prior_log_loss(y_train, y_true)     # what predicting frequencies scores

Every function takes (n, 6) arrays (or DataFrames with the LABELS columns) of
probabilities, in the column order of utils.labels.LABELS. A label may be unknown (NaN in
y_true: a site's table may lack a subtype, or give some classes for some rows only).
Unknown is not negative: it is left out of every loss and frequency, never read as 0.
"""
from __future__ import annotations

import numpy as np

from utils.labels import LABELS

# Kaggle scored `any` with weight 2 and each subtype with weight 1. float32 so the
# training loss can use it as a tensor without a cast; the values are exact either way.
CLASS_WEIGHTS = np.array([2.0 if name == "any" else 1.0 for name in LABELS], dtype=np.float32)
# Predictions are clipped like scikit-learn's log_loss used to (eps=1e-15), so a
# confident wrong answer costs about 34.5 nats instead of infinity.
EPS = 1e-15
# A submission's values lie in [SUBMISSION_EPS, 1 - SUBMISSION_EPS] (utils.submission): the
# probabilities the refiner turns into logits are clipped so too.
SUBMISSION_EPS = 1e-6


def logit(probs, eps: float = SUBMISSION_EPS) -> np.ndarray:
    """Probabilities to logits (float64), clipped to [eps, 1 - eps] first."""
    p = np.clip(np.asarray(probs, np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def sigmoid(logits) -> np.ndarray:
    """Logits to probabilities (float64), without overflow and with the full precision of
    tiny probabilities."""
    x = np.asarray(logits, np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def weighted_log_loss(y_true, y_pred) -> float:
    """sum of w_c * LL_ic over the known labels / sum of w_c over them, w = CLASS_WEIGHTS.

    With every label known this is the mean over images of (2 * LL_any + sum of the five
    subtype LLs) / 7, equal to scikit-learn's `log_loss` on the flattened arrays with
    sample weights 1,1,1,1,1,2 per image; an unknown label (NaN in `y_true`) leaves its
    term and its weight out. NaN when no label is known. `y_true` may hold soft targets
    in [0, 1].
    """
    truth, pred = _check_pair(y_true, y_pred)
    known = ~np.isnan(truth)
    weights = CLASS_WEIGHTS.astype(np.float64)
    # means of row sums, not sums: with every label known this is today's number to the bit
    weighted = _known_log_loss(truth, pred, known) @ weights
    total = known @ weights
    return float(weighted.mean() / total.mean()) if known.any() else float("nan")


def per_class_log_loss(y_true, y_pred) -> dict[str, float]:
    """Unweighted mean log loss of each label over its known rows, keyed by LABELS in
    order; NaN for a label with no known row."""
    truth, pred = _check_pair(y_true, y_pred)
    known = ~np.isnan(truth)
    n_known = known.sum(axis=0)
    sums = _known_log_loss(truth, pred, known).sum(axis=0)
    losses = np.divide(sums, n_known, out=np.full(len(LABELS), np.nan), where=n_known > 0)
    return {name: float(loss) for name, loss in zip(LABELS, losses)}


def prior_probabilities(y_train, fallback=None) -> np.ndarray:
    """Each label's frequency over its known rows of `y_train`, as a (6,) float64 array.

    A label never (or always) seen is moved half an example away from 0 (or 1), i.e.
    clipped to [0.5 / n, 1 - 0.5 / n] with n its known rows: a prior of exactly 0 would
    cost ~34.5 nats on the first positive, while any label seen at least once keeps its
    exact frequency. A label with no known row takes its value in `fallback` (6
    probabilities, e.g. a checkpoint's prior); without one it is a ValueError.
    """
    labels = check_probabilities(y_train, "y_train", allow_unknown=True)
    known = ~np.isnan(labels)
    n_known = known.sum(axis=0)
    unknown = n_known == 0
    if unknown.any() and fallback is None:
        raise ValueError(f"y_train has no known label of {', '.join(np.array(LABELS)[unknown])}: "
                         "pass a fallback prior for them (e.g. the checkpoint's)")
    frequency = np.divide(np.where(known, labels, 0.0).sum(axis=0), n_known,
                          out=np.zeros(len(LABELS)), where=~unknown)
    half = 0.5 / np.maximum(n_known, 1)
    prior = np.clip(frequency, half, 1 - half)
    if fallback is not None:
        if np.shape(fallback) != (len(LABELS),):
            raise ValueError(f"fallback must be {len(LABELS)} probabilities in LABELS order, "
                             f"got shape {np.shape(fallback)}")
        prior[unknown] = check_probabilities(np.reshape(fallback, (1, -1)), "fallback")[0, unknown]
    return prior


def prior_log_loss(y_train, y_true, fallback=None) -> float:
    """Weighted log loss of predicting `y_train`'s label frequencies (prior_probabilities,
    with its `fallback`) for every row of `y_true`."""
    prior = prior_probabilities(y_train, fallback)
    truth = check_probabilities(y_true, "y_true", allow_unknown=True)
    return weighted_log_loss(truth, np.broadcast_to(prior, truth.shape))


def check_probabilities(values, name: str = "probabilities", allow_unknown: bool = False) -> np.ndarray:
    """`values` as an (n, 6) float64 array in [0, 1], or a ValueError saying why not.

    A DataFrame must have exactly the LABELS columns, in order; `name` labels the errors.
    With `allow_unknown` (labels, never predictions) NaN is kept as an unknown label;
    infinities are errors either way.
    """
    columns = getattr(values, "columns", None)
    if columns is not None and list(columns) != list(LABELS):
        raise ValueError(f"{name} has columns {list(columns)}, expected {list(LABELS)}")
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} is not numeric: {err}") from None
    if array.ndim != 2 or array.shape[1] != len(LABELS):
        raise ValueError(f"{name} must have shape (n, {len(LABELS)}) in LABELS order, got {array.shape}")
    if len(array) == 0:
        raise ValueError(f"{name} has no rows")
    if allow_unknown and np.isinf(array).any():
        raise ValueError(f"{name} has {int(np.isinf(array).sum())} infinite values")
    if not allow_unknown and not np.isfinite(array).all():
        raise ValueError(f"{name} has {int((~np.isfinite(array)).sum())} NaN or infinite values")
    outside = (array < 0) | (array > 1)
    if outside.any():
        example = float(array[outside][0])
        raise ValueError(f"{name} has {int(outside.sum())} values outside [0, 1] (e.g. {example})")
    return array


def fold_labels(y) -> np.ndarray:
    """(n, 6) labels with each unknown as 0, for balancing patient folds only: an unknown
    label is no positive to spread over the folds. Never for a loss or a frequency."""
    return np.nan_to_num(np.asarray(y, dtype=np.float64), nan=0.0)


def _elementwise_log_loss(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    pred = np.clip(pred, EPS, 1 - EPS)
    return -(truth * np.log(pred) + (1 - truth) * np.log1p(-pred))


def _known_log_loss(truth: np.ndarray, pred: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Each entry's log loss, 0 where its label is unknown."""
    return np.where(known, _elementwise_log_loss(np.where(known, truth, 0.0), pred), 0.0)


def _check_pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    truth = check_probabilities(y_true, "y_true", allow_unknown=True)
    pred = check_probabilities(y_pred, "y_pred")
    if truth.shape != pred.shape:
        raise ValueError(f"y_true has shape {truth.shape} but y_pred has shape {pred.shape}")
    return truth, pred
