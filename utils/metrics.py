"""The competition's metric: log loss over all six labels, with `any` weighted twice.

    from utils.metrics import weighted_log_loss, prior_log_loss
    score = weighted_log_loss(y_true, y_pred)      # (n, 6) arrays in LABELS order
    baseline = prior_log_loss(y_train, y_true)     # what predicting frequencies scores

Every function takes (n, 6) arrays (or DataFrames with the LABELS columns) of
probabilities, in the column order of utils.labels.LABELS.
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
    """Mean over images of (2 * LL_any + sum of the five subtype LLs) / 7.

    Equal to scikit-learn's `log_loss` on the flattened arrays with sample weights
    1,1,1,1,1,2 per image. `y_true` may hold soft targets in [0, 1].
    """
    truth, pred = _check_pair(y_true, y_pred)
    weights = CLASS_WEIGHTS.astype(np.float64)
    return float((_elementwise_log_loss(truth, pred) @ weights).mean() / weights.sum())


def per_class_log_loss(y_true, y_pred) -> dict[str, float]:
    """Unweighted mean log loss of each label, keyed by LABELS in order."""
    truth, pred = _check_pair(y_true, y_pred)
    losses = _elementwise_log_loss(truth, pred).mean(axis=0)
    return {name: float(loss) for name, loss in zip(LABELS, losses)}


def prior_probabilities(y_train) -> np.ndarray:
    """Each label's frequency in `y_train`, as a (6,) float64 array.

    A label never (or always) seen is moved half an example away from 0 (or 1), i.e.
    clipped to [0.5 / n, 1 - 0.5 / n]: a prior of exactly 0 would cost ~34.5 nats on the
    first positive, while any label seen at least once keeps its exact frequency.
    """
    labels = check_probabilities(y_train, "y_train")
    n = len(labels)
    return np.clip(labels.mean(axis=0), 0.5 / n, 1 - 0.5 / n)


def prior_log_loss(y_train, y_true) -> float:
    """Weighted log loss of predicting `y_train`'s label frequencies for every row of `y_true`."""
    prior = prior_probabilities(y_train)
    truth = check_probabilities(y_true, "y_true")
    return weighted_log_loss(truth, np.broadcast_to(prior, truth.shape))


def check_probabilities(values, name: str = "probabilities") -> np.ndarray:
    """`values` as an (n, 6) float64 array in [0, 1], or a ValueError saying why not.

    A DataFrame must have exactly the LABELS columns, in order; `name` labels the errors.
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
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has {int((~np.isfinite(array)).sum())} NaN or infinite values")
    outside = (array < 0) | (array > 1)
    if outside.any():
        example = float(array[outside][0])
        raise ValueError(f"{name} has {int(outside.sum())} values outside [0, 1] (e.g. {example})")
    return array


def _elementwise_log_loss(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    pred = np.clip(pred, EPS, 1 - EPS)
    return -(truth * np.log(pred) + (1 - truth) * np.log1p(-pred))


def _check_pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    truth = check_probabilities(y_true, "y_true")
    pred = check_probabilities(y_pred, "y_pred")
    if truth.shape != pred.shape:
        raise ValueError(f"y_true has shape {truth.shape} but y_pred has shape {pred.shape}")
    return truth, pred
