"""utils.metrics: the competition's weighted log loss, checked against closed forms and scikit-learn."""
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss  # test-only dependency

from utils.labels import LABELS
from utils.metrics import (
    CLASS_WEIGHTS,
    check_probabilities,
    per_class_log_loss,
    prior_log_loss,
    prior_probabilities,
    weighted_log_loss,
)

LN2 = math.log(2)


def random_pair(n=500, seed=0):
    rng = np.random.default_rng(seed)
    y_true = (rng.random((n, 6)) < 0.3).astype(float)
    y_pred = rng.uniform(0.001, 0.999, size=(n, 6))
    return y_true, y_pred


def binary_entropy(p):
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_class_weights():
    assert CLASS_WEIGHTS.tolist() == [1, 1, 1, 1, 1, 2]
    assert CLASS_WEIGHTS[LABELS.index("any")] == 2
    assert CLASS_WEIGHTS.dtype == np.float32


def test_all_half_is_ln2():
    y_true, _ = random_pair()
    assert weighted_log_loss(y_true, np.full_like(y_true, 0.5)) == pytest.approx(LN2, abs=1e-15)


def test_any_counts_twice():
    y_true = np.zeros((4, 6))
    only_any_unsure = np.zeros((4, 6))
    only_any_unsure[:, 5] = 0.5
    assert weighted_log_loss(y_true, only_any_unsure) == pytest.approx(2 * LN2 / 7, abs=1e-12)
    only_epidural_unsure = np.zeros((4, 6))
    only_epidural_unsure[:, 0] = 0.5
    assert weighted_log_loss(y_true, only_epidural_unsure) == pytest.approx(LN2 / 7, abs=1e-12)


def test_matches_sklearn_with_sample_weights():
    for seed in range(3):
        y_true, y_pred = random_pair(seed=seed)
        weights = np.tile([1, 1, 1, 1, 1, 2], len(y_true))
        expected = log_loss(y_true.ravel(), y_pred.ravel(), sample_weight=weights)
        assert abs(weighted_log_loss(y_true, y_pred) - expected) < 1e-9


def test_per_class_matches_sklearn():
    y_true, y_pred = random_pair(seed=3)
    per_class = per_class_log_loss(y_true, y_pred)
    assert list(per_class) == list(LABELS)
    for j, name in enumerate(LABELS):
        assert per_class[name] == pytest.approx(log_loss(y_true[:, j], y_pred[:, j]), abs=1e-9)
    weighted = sum(per_class[name] * float(w) for name, w in zip(LABELS, CLASS_WEIGHTS)) / 7
    assert weighted == pytest.approx(weighted_log_loss(y_true, y_pred), abs=1e-12)


def test_confident_miss_is_clipped_at_1e_15():
    y_true = np.zeros((1, 6))
    y_true[0, 0] = 1
    assert weighted_log_loss(y_true, np.zeros((1, 6))) == pytest.approx(-math.log(1e-15) / 7, rel=1e-9)


def test_perfect_predictions_score_almost_zero():
    y_true, _ = random_pair()
    assert 0 <= weighted_log_loss(y_true, y_true) < 1e-13


def test_accepts_dataframes_in_label_order_only():
    y_true, y_pred = random_pair(n=20)
    frame = pd.DataFrame(y_pred, columns=list(LABELS))
    assert weighted_log_loss(y_true, frame) == pytest.approx(weighted_log_loss(y_true, y_pred), abs=1e-15)
    with pytest.raises(ValueError, match="expected"):
        weighted_log_loss(y_true, frame[list(reversed(LABELS))])


@pytest.mark.parametrize(
    "y_pred, message",
    [
        (np.full((10, 5), 0.5), r"shape \(n, 6\)"),
        (np.full(60, 0.5), r"shape \(n, 6\)"),
        (np.full((9, 6), 0.5), r"y_true has shape \(10, 6\) but y_pred has shape \(9, 6\)"),
        (np.where(np.eye(10, 6) > 0, np.nan, 0.5), "NaN or infinite"),
        (np.where(np.eye(10, 6) > 0, 1.5, 0.5), r"outside \[0, 1\]"),
        ([["a"] * 6] * 10, "not numeric"),
    ],
)
def test_bad_input_is_a_clear_value_error(y_pred, message):
    y_true = np.zeros((10, 6))
    with pytest.raises(ValueError, match=message):
        weighted_log_loss(y_true, y_pred)


def test_empty_input_is_rejected():
    with pytest.raises(ValueError, match="no rows"):
        weighted_log_loss(np.zeros((0, 6)), np.zeros((0, 6)))


def test_check_probabilities_returns_float64_copy_shape():
    values = check_probabilities(np.zeros((3, 6), dtype=np.float32))
    assert values.dtype == np.float64 and values.shape == (3, 6)


def test_prior_probabilities_are_frequencies():
    y = np.zeros((4, 6))
    y[:1, 1] = 1  # 1 of 4
    y[:3, 5] = 1  # 3 of 4
    y[:, 4] = 1  # always
    prior = prior_probabilities(y)
    assert prior[1] == 0.25 and prior[5] == 0.75
    assert prior[0] == 0.5 / 4  # never seen: half an example
    assert prior[4] == 1 - 0.5 / 4  # always seen
    assert np.all((prior > 0) & (prior < 1))


def test_prior_log_loss_is_weighted_entropy_on_training_data():
    y = np.zeros((10, 6))
    y[:2, 0] = 1
    y[:5, 3] = 1
    y[:3, 5] = 1
    y[:1, 1] = 1
    y[:4, 2] = 1
    y[:6, 4] = 1
    entropies = [binary_entropy(p) for p in (0.2, 0.1, 0.4, 0.5, 0.6, 0.3)]
    expected = (sum(entropies[:5]) + 2 * entropies[5]) / 7
    assert prior_log_loss(y, y) == pytest.approx(expected, abs=1e-12)


def test_prior_log_loss_beats_coin_flip_on_skewed_labels():
    rng = np.random.default_rng(1)
    y_train = (rng.random((2000, 6)) < 0.1).astype(float)
    y_valid = (rng.random((500, 6)) < 0.1).astype(float)
    assert prior_log_loss(y_train, y_valid) < weighted_log_loss(y_valid, np.full_like(y_valid, 0.5))


def test_logit_and_sigmoid_are_one_pair_with_named_clips():
    from utils.metrics import EPS, SUBMISSION_EPS, logit, sigmoid
    x = np.array([-700.0, -30.0, -0.3, 0.0, 2.0, 30.0, 700.0])
    p = sigmoid(x)  # no overflow at either end, tiny probabilities kept in full
    assert p.dtype == np.float64 and np.all(np.diff(p) > 0) and p[3] == 0.5
    assert p[1] == pytest.approx(np.exp(-30.0), rel=1e-12) and p[0] > 0
    assert np.allclose(logit(p[1:-2], EPS), x[1:-2], atol=1e-9)  # near 1 a float64 keeps ~13 digits
    edge = logit([0.0, 1.0])  # the default clip is a submission's
    assert np.allclose(edge, [np.log(SUBMISSION_EPS / (1 - SUBMISSION_EPS)), np.log((1 - SUBMISSION_EPS) / SUBMISSION_EPS)])
    assert np.allclose(logit([0.0, 1.0], EPS), [np.log(EPS), -np.log(EPS)], rtol=1e-4)  # 1 - 1e-15 rounds


# ----------------------------------------------------------------- unknown labels (NaN)


def with_unknowns(y_true, seed=0, share=0.3):
    """`y_true` with about `share` of its labels NaN (unknown), column 2 (intraventricular)
    unknown in every row."""
    rng = np.random.default_rng([seed, 1])  # not random_pair's draws, which made the labels
    y = np.where(rng.random(y_true.shape) < share, np.nan, y_true)
    y[:, 2] = np.nan
    return y


def test_unknown_labels_are_left_out_as_sklearn_weighs_them():
    for seed in range(3):
        y_true, y_pred = random_pair(seed=seed)
        y = with_unknowns(y_true, seed)
        known = ~np.isnan(y)
        weights = np.broadcast_to(CLASS_WEIGHTS, y.shape)[known]
        expected = log_loss(y[known], y_pred[known], sample_weight=weights)
        assert weighted_log_loss(y, y_pred) == pytest.approx(expected, abs=1e-12)
        # not the loss of calling them negative
        assert abs(weighted_log_loss(np.nan_to_num(y), y_pred) - expected) > 1e-3


def test_an_unknown_label_changes_nothing_whatever_its_prediction():
    y_true, y_pred = random_pair(n=50, seed=4)
    y = with_unknowns(y_true, seed=4)
    other = np.where(np.isnan(y), 1 - y_pred, y_pred)  # only the unknown entries' predictions move
    assert weighted_log_loss(y, other) == weighted_log_loss(y, y_pred)
    np.testing.assert_array_equal(list(per_class_log_loss(y, other).values()),
                                  list(per_class_log_loss(y, y_pred).values()))  # NaN for NaN


def test_any_unknown_halves_the_denominator_by_its_weight():
    # one row, every prediction 0.5: a known `any` and one known subtype give (2 + 1) * ln2 / 3
    y = np.full((1, 6), np.nan)
    y[0, [0, 5]] = 0
    assert weighted_log_loss(y, np.full((1, 6), 0.5)) == pytest.approx(LN2, abs=1e-15)
    p = np.full((1, 6), 0.5)
    p[0, 5] = 0.25  # -log(0.75) for `any`, counted twice, over weights 1 + 2
    assert weighted_log_loss(y, p) == pytest.approx((LN2 - 2 * math.log(0.75)) / 3, abs=1e-15)


def test_per_class_loss_is_the_mean_over_known_rows_and_nan_without_any():
    y_true, y_pred = random_pair(seed=5)
    y = with_unknowns(y_true, seed=5)
    per_class = per_class_log_loss(y, y_pred)
    assert math.isnan(per_class["intraventricular"])
    for j, name in enumerate(LABELS):
        known = ~np.isnan(y[:, j])
        if known.any():
            assert per_class[name] == pytest.approx(log_loss(y[known, j], y_pred[known, j], labels=[0, 1]), abs=1e-12)


def test_nothing_known_scores_nan():
    unknown = np.full((3, 6), np.nan)
    assert math.isnan(weighted_log_loss(unknown, np.full((3, 6), 0.5)))
    assert all(math.isnan(v) for v in per_class_log_loss(unknown, np.full((3, 6), 0.5)).values())


def test_check_probabilities_allows_unknown_labels_only_when_asked():
    y = np.zeros((2, 6))
    y[0, 1] = np.nan
    assert np.isnan(check_probabilities(y, "y", allow_unknown=True)[0, 1])
    with pytest.raises(ValueError, match="y has 1 NaN or infinite"):
        check_probabilities(y, "y")
    y[1, 2] = np.inf
    with pytest.raises(ValueError, match="y has 1 infinite values"):
        check_probabilities(y, "y", allow_unknown=True)
    y[1, 2] = 1.5
    with pytest.raises(ValueError, match=r"1 values outside \[0, 1\] \(e.g. 1.5\)"):
        check_probabilities(y, "y", allow_unknown=True)
    labels = np.zeros((2, 6))
    labels[0, 0] = np.nan
    with pytest.raises(ValueError, match="y_pred has 1 NaN"):  # a prediction is never unknown
        weighted_log_loss(np.zeros((2, 6)), np.where(np.isnan(labels), np.nan, 0.5))
    with pytest.raises(ValueError, match=r"y_true has 1 infinite"):
        weighted_log_loss(np.where(np.isnan(labels), -np.inf, 0), np.full((2, 6), 0.5))


def test_prior_counts_known_rows_only():
    y = np.full((8, 6), np.nan)
    y[:4, 0] = [1, 0, 0, 0]  # 1 of 4 known, not 1 of 8
    y[:, 1] = 0  # never seen in 8 rows: half an example
    y[:2, 3] = 0  # never seen in 2 known rows: half of one of 2
    y[:, [4, 5]] = 1
    y[0, 5] = np.nan  # always seen in 7 known rows
    with pytest.raises(ValueError, match="no known label of intraventricular: pass a fallback"):
        prior_probabilities(y)
    fallback = np.array([0.9, 0.9, 0.07, 0.9, 0.9, 0.9])
    prior = prior_probabilities(y, fallback=fallback)
    assert prior.tolist() == [0.25, 0.5 / 8, 0.07, 0.5 / 2, 1 - 0.5 / 8, 1 - 0.5 / 7]
    y[:, 0] = np.nan
    with pytest.raises(ValueError, match="of epidural, intraventricular"):
        prior_probabilities(y)
    with pytest.raises(ValueError, match=r"fallback must be 6 probabilities in LABELS order, got shape \(5,\)"):
        prior_probabilities(y, fallback=[0.5] * 5)
    with pytest.raises(ValueError, match=r"fallback has 1 values outside \[0, 1\]"):
        prior_probabilities(y, fallback=[0.5] * 5 + [2])
    assert prior_log_loss(y, y, fallback=fallback) == pytest.approx(
        weighted_log_loss(y, np.broadcast_to(prior_probabilities(y, fallback), y.shape)), abs=1e-15)
