"""utils.calibration: reliability bins, ECE and temperatures checked against closed forms,
the out-of-fold decision against its own numbers, and the reliability figure."""
import json

import cv2
import numpy as np
import pytest

from utils.calibration import (RELIABILITY_COLUMNS, T_MAX, T_MIN, CalibrationWarning, apply_temperatures,
                               calibration_summary, decide_calibration, expected_calibration_error,
                               fit_temperatures, max_calibration_error, reliability)
from utils.figures import write_reliability_figure
from utils.labels import LABELS
from utils.metrics import per_class_log_loss, weighted_log_loss


def sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))


def six(column):
    """The same 1-D column in all six classes."""
    return np.tile(np.asarray(column, dtype=np.float64)[:, None], (1, len(LABELS)))


def patients(n_patients=80, per_patient=40, true_t=1.0, seed=0):
    """(labels, predictions, groups): logits z per row, predictions sigmoid(z), labels drawn
    from sigmoid(z / true_t), so the right temperature is true_t in every class."""
    rng = np.random.default_rng(seed)
    n = n_patients * per_patient
    z = rng.normal(-1.0, 2.0, size=(n, len(LABELS)))
    y = (rng.random(z.shape) < sigmoid(z / true_t)).astype(np.float64)
    return y, sigmoid(z), np.repeat([f"P{i:03d}" for i in range(n_patients)], per_patient)


# --------------------------------------------------------------------------- reliability and ECE


def test_constant_prediction_matching_the_prevalence_has_zero_ece():
    y = [1] * 8 + [0] * 2
    assert expected_calibration_error(y, np.full(10, 0.8)) == pytest.approx(0, abs=1e-12)
    assert max_calibration_error(y, np.full(10, 0.8)) == pytest.approx(0, abs=1e-12)


def test_constant_prediction_ece_is_the_gap_to_the_prevalence():
    y = [1, 0] * 50
    assert expected_calibration_error(y, np.full(100, 0.9)) == pytest.approx(0.4, abs=1e-12)
    table = reliability(y, np.full(100, 0.9))
    assert table["count"].tolist() == [0] * 9 + [100]


def test_two_bins_give_the_count_weighted_sum():
    # 30 rows at 0.15 with 3 positives (observed 0.1), 10 rows at 0.75 with 9 (observed 0.9):
    # 30/40 * 0.05 + 10/40 * 0.15 = 0.075.
    p = np.array([0.15] * 30 + [0.75] * 10)
    y = np.array([1] * 3 + [0] * 27 + [1] * 9 + [0])
    table = reliability(y, p)
    assert list(table.columns) == list(RELIABILITY_COLUMNS)
    assert table["count"].tolist() == [0, 30, 0, 0, 0, 0, 0, 10, 0, 0]
    filled = table[table["count"] > 0]
    assert filled["mean_predicted"].tolist() == pytest.approx([0.15, 0.75], abs=1e-12)
    assert filled["observed"].tolist() == pytest.approx([0.1, 0.9], abs=1e-12)
    assert table.loc[table["count"] == 0, ["mean_predicted", "observed"]].isna().all().all()
    assert expected_calibration_error(y, p) == pytest.approx(0.075, abs=1e-12)
    assert max_calibration_error(y, p) == pytest.approx(0.15, abs=1e-12)
    # One bin holds everything: ECE is |mean label - mean prediction| = |12/40 - 12/40|.
    assert expected_calibration_error(y, p, n_bins=1) == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("n_bins", [1, 3, 7, 10, 20, 100])
def test_bin_edges_are_exact(n_bins):
    edges = np.array([k / n_bins for k in range(n_bins)])
    table = reliability(np.zeros(n_bins + 1), np.append(edges, 1.0), n_bins)
    # Each edge k/n opens bin k (0.29 * 100 is 28.999..., yet 0.29 is in [0.29, 0.30)); 1.0
    # joins the last, closed bin.
    assert table["count"].tolist() == [1] * (n_bins - 1) + [2]
    assert table["lower"].tolist() == edges.tolist()
    assert table["upper"].tolist() == [(k + 1) / n_bins for k in range(n_bins)]
    expected_means = np.append(edges[:-1], (edges[-1] + 1) / 2)  # the last bin holds its edge and 1.0
    assert table["mean_predicted"].tolist() == pytest.approx(expected_means.tolist(), abs=1e-15)


def test_first_and_last_bin_hold_zero_and_one():
    table = reliability([0, 1, 1, 0], [0.0, 1.0, 0.95, 0.05])
    assert table["count"].tolist() == [2] + [0] * 8 + [2]
    assert table["mean_predicted"].iloc[-1] == pytest.approx(0.975)
    assert table["observed"].iloc[-1] == 1.0


def test_summary_is_per_class_in_labels_order():
    y, p, _ = patients(n_patients=10, true_t=3.0)
    summary = calibration_summary(y, p, n_bins=15)
    assert list(summary) == ["ece", "max_calibration_error"]
    for name, one in (("ece", expected_calibration_error), ("max_calibration_error", max_calibration_error)):
        assert list(summary[name]) == list(LABELS)
        assert [summary[name][k] for k in LABELS] == [one(y[:, j], p[:, j], 15) for j in range(6)]
    assert all(summary["ece"][k] <= summary["max_calibration_error"][k] for k in LABELS)
    json.dumps(summary)


@pytest.mark.parametrize(("y", "p", "message"), [
    ([0, 1], [0.5], "2 rows but p has 1"),
    ([0, 1], [0.5, np.nan], "p has 1 NaN"),
    ([0, np.inf], [0.5, 0.5], "y has 1 infinite"),
    ([0, np.nan], [0.5, 1.5], "p has 1 values outside"),
    ([0, 1], [0.5, 1.5], "outside"),
    ([], [], "non-empty"),
    ([[0, 1]], [[0.5, 0.5]], "1-D"),
])
def test_reliability_rejects_bad_input(y, p, message):
    with pytest.raises(ValueError, match=message):
        reliability(y, p)


@pytest.mark.parametrize("n_bins", [0, -1, 2.5, True])
def test_reliability_rejects_bad_bin_counts(n_bins):
    with pytest.raises(ValueError, match="n_bins"):
        reliability([0, 1], [0.2, 0.7], n_bins)


# --------------------------------------------------------------------------- temperatures


def test_soft_labels_of_a_known_temperature_give_it_back():
    # Labels that ARE sigmoid(z / T) make the cross-entropy minimal at exactly that T.
    z = np.linspace(-6, 6, 25)
    truths = [0.5, 1.0, 1.5, 2.0, 3.0, 5.0]
    y = np.stack([sigmoid(z / t) for t in truths], axis=1)
    fitted = fit_temperatures(y, six(sigmoid(z)))
    assert fitted.shape == (6,)
    assert np.abs(fitted - truths).max() < 1e-6


def test_counted_labels_of_temperature_two_give_two():
    # For each logit z, m rows of which k = round(m * sigmoid(z / 2)) are positive. Without the
    # rounding the MLE would be exactly T = 2; the residuals r = k - m * s (s = sigmoid(z / 2))
    # move 1/T by sum(z * r) / (m * sum(z^2 * s * (1 - s))) to first order, which is the
    # exact target here (1.3e-3 off 2 for m = 1000, 1.5e-4 for m = 2000).
    z, m = np.linspace(-6, 6, 25), 2000
    s = sigmoid(z / 2)
    positives = np.round(m * s)
    y = np.concatenate([np.r_[np.ones(int(k)), np.zeros(m - int(k))] for k in positives])
    p = np.repeat(sigmoid(z), m)
    mle = 1 / (0.5 + (z * (positives - m * s)).sum() / (m * (z * z * s * (1 - s)).sum()))
    fitted = fit_temperatures(six(y), six(p))
    assert np.abs(fitted - mle).max() < 1e-5  # the second-order term is ~(1.5e-4)^2
    assert np.abs(fitted - 2).max() < 1e-3
    score = (np.repeat(z, m) * (sigmoid(np.repeat(z, m) / fitted[0]) - y)).mean()
    assert abs(score) < 1e-7  # the MLE's first-order condition


def test_calibrated_counts_give_one():
    z, m = np.linspace(-5, 5, 21), 1000
    positives = np.round(m * sigmoid(z)).astype(int)
    y = np.concatenate([np.r_[np.ones(k), np.zeros(m - k)] for k in positives])
    fitted = fit_temperatures(six(y), six(np.repeat(sigmoid(z), m)))
    assert np.abs(fitted - 1).max() < 1e-3


def test_temperature_outside_the_range_stops_at_its_bound():
    z = np.linspace(-6, 6, 25)
    y = np.stack([sigmoid(z / 100), sigmoid(z * 100), sigmoid(z)] * 2, axis=1)
    fitted = fit_temperatures(y, six(sigmoid(z)))
    assert fitted[[0, 3]] == pytest.approx(T_MAX, rel=1e-6)
    assert fitted[[1, 4]] == pytest.approx(T_MIN, rel=1e-6)
    assert fitted[[2, 5]] == pytest.approx(1.0, abs=1e-6)


def test_all_half_predictions_keep_temperature_one():
    y = six([0, 1, 1, 0, 1])
    assert fit_temperatures(y, np.full((5, 6), 0.5)).tolist() == [1.0] * 6


def test_temperature_one_changes_nothing():
    rng = np.random.default_rng(0)
    p = np.vstack([rng.random((200, 6)), np.zeros((1, 6)), np.ones((1, 6)), np.full((1, 6), 1e-12)])
    out = apply_temperatures(p, np.ones(6))
    assert np.abs(out - p).max() < 1e-14
    assert out[-1] == pytest.approx(1e-12, rel=1e-9)  # tiny probabilities keep their digits


def test_apply_temperatures_closed_form():
    z = np.linspace(-8, 8, 33)
    out = apply_temperatures(six(sigmoid(z)), [1, 2, 4, 0.5, 3, 1])
    for j, t in enumerate([1, 2, 4, 0.5, 3, 1]):
        assert np.allclose(out[:, j], sigmoid(z / t), rtol=1e-12, atol=0)
    assert out[16].tolist() == pytest.approx([0.5] * 6)  # z = 0 stays 0.5 whatever T


@pytest.mark.parametrize(("temperatures", "message"), [
    (np.ones(5), "shape"), ([1, 1, 1, 1, 1, 0], "positive"), ([1, 1, 1, 1, 1, np.nan], "finite"),
])
def test_apply_temperatures_rejects_bad_temperatures(temperatures, message):
    with pytest.raises(ValueError, match=message):
        apply_temperatures(np.full((3, 6), 0.3), temperatures)


def test_fit_temperatures_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        fit_temperatures(np.zeros((4, 6)), np.full((3, 6), 0.5))
    with pytest.raises(ValueError, match="NaN"):
        fit_temperatures(np.zeros((2, 6)), np.array([[np.nan] * 6, [0.5] * 6]))
    with pytest.raises(ValueError, match=r"shape \(n, 6\)"):
        fit_temperatures(np.zeros((2, 5)), np.full((2, 5), 0.5))


# --------------------------------------------------------------------------- the out-of-fold decision


def test_overconfident_model_is_calibrated():
    y, p, groups = patients(true_t=3.0)
    decision = decide_calibration(y, p, groups, n_folds=5, seed=0)
    assert decision["use"] is True
    assert decision["loss_after_oof"] < decision["loss_before"] - 0.05
    assert decision["loss_before"] == weighted_log_loss(y, p)
    assert decision["per_class_before"] == per_class_log_loss(y, p)
    assert np.abs(np.array(decision["temperatures"]) - 3).max() < 0.5
    assert len(decision["fold_temperatures"]) == decision["n_folds"] == 5
    assert all(decision["ece_after_oof"][k] < decision["ece_before"][k] for k in LABELS)
    assert decision == json.loads(json.dumps(decision))  # metrics.json takes it as it is


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibrated_model_gains_nothing(seed):
    y, p, groups = patients(true_t=1.0, seed=seed)
    decision = decide_calibration(y, p, groups, seed=seed)
    before, after = decision["loss_before"], decision["loss_after_oof"]
    assert decision["use"] == (after < before)
    assert before - after < 5e-4  # fitting noise only: measured -7e-5 to -2e-4 for these seeds
    assert np.abs(np.array(decision["temperatures"]) - 1).max() < 0.15


def test_the_decision_is_out_of_fold():
    # Two patients miscalibrated in opposite directions: fitted on all rows the temperatures
    # look like a gain, but each fold's temperature, fitted on the other patient, hurts.
    a = patients(n_patients=1, per_patient=3000, true_t=3.0, seed=0)
    b = patients(n_patients=1, per_patient=3000, true_t=1 / 3, seed=1)
    y, p = np.vstack([a[0], b[0]]), np.vstack([a[1], b[1]])
    groups = np.repeat(["A", "B"], 3000)
    with pytest.warns(CalibrationWarning, match="using 2 folds"):
        decision = decide_calibration(y, p, groups)
    in_sample = weighted_log_loss(y, apply_temperatures(p, decision["temperatures"]))
    assert in_sample <= decision["loss_before"] + 1e-12
    assert decision["loss_after_oof"] > decision["loss_before"] + 0.1
    assert decision["use"] is False
    assert decision["n_folds"] == 2


def test_decision_is_deterministic():
    y, p, groups = patients(n_patients=20, true_t=2.0)
    assert decide_calibration(y, p, groups, n_folds=4, seed=3) == decide_calibration(y, p, groups, n_folds=4, seed=3)


def test_decide_calibration_rejects_bad_input():
    y, p, groups = patients(n_patients=6, per_patient=5)
    with pytest.raises(ValueError, match="at least 2 patient groups"):
        decide_calibration(y, p, np.full(len(y), "P0"))
    with pytest.raises(ValueError, match="groups must be 1-D"):
        decide_calibration(y, p, groups[:-1])
    with pytest.raises(ValueError, match="NaN"):
        decide_calibration(y, np.where(np.arange(len(p))[:, None] == 0, np.nan, p), groups)
    with pytest.raises(ValueError, match="n_folds"):
        decide_calibration(y, p, groups, n_folds=1)
    with pytest.raises(ValueError, match="0/1"):
        decide_calibration(y * 0.5, p, groups)


# --------------------------------------------------------------------------- unknown labels (NaN)

UNKNOWN = LABELS.index("subarachnoid")


def with_unknowns(y, seed=0, share=0.3):
    """`y` with about `share` of its labels NaN (unknown) and `subarachnoid` unknown in every row."""
    rng = np.random.default_rng([seed, 1])
    out = np.where(rng.random(y.shape) < share, np.nan, y)
    out[:, UNKNOWN] = np.nan
    return out


def test_reliability_and_ece_count_known_rows_only():
    p = np.array([0.15] * 30 + [0.75] * 10 + [0.95] * 5)
    y = np.array([1] * 3 + [0] * 27 + [1] * 9 + [0] + [np.nan] * 5)  # the two bins of before, and 5 unknown
    table = reliability(y, p)
    assert table["count"].tolist() == [0, 30, 0, 0, 0, 0, 0, 10, 0, 0]  # the rows at 0.95 are not in a bin
    assert expected_calibration_error(y, p) == pytest.approx(0.075, abs=1e-12)
    assert max_calibration_error(y, p) == pytest.approx(0.15, abs=1e-12)
    # had they counted as negatives: a bin of 5 at 0.95 observed 0, a gap of 0.95
    assert max_calibration_error(np.nan_to_num(y), p) == pytest.approx(0.95, abs=1e-12)
    nothing = reliability(np.full(4, np.nan), [0.1, 0.5, 0.7, 1.0])
    assert nothing["count"].tolist() == [0] * 10 and nothing["observed"].isna().all()
    assert np.isnan(expected_calibration_error(np.full(4, np.nan), np.full(4, 0.3)))
    assert np.isnan(max_calibration_error(np.full(4, np.nan), np.full(4, 0.3)))


def test_summary_measures_each_class_on_its_known_rows():
    y, p, _ = patients(n_patients=10, true_t=3.0)
    unknown = with_unknowns(y)
    summary = calibration_summary(unknown, p)
    for j, k in enumerate(LABELS):
        known = ~np.isnan(unknown[:, j])
        if j == UNKNOWN:
            assert np.isnan(summary["ece"][k]) and np.isnan(summary["max_calibration_error"][k])
        else:
            assert summary["ece"][k] == expected_calibration_error(y[known, j], p[known, j])
            assert summary["max_calibration_error"][k] == max_calibration_error(y[known, j], p[known, j])


def test_temperatures_are_fitted_on_known_rows_and_one_without_any():
    y, p, _ = patients(n_patients=60, true_t=2.0)
    unknown = with_unknowns(y, seed=1)
    # the unknown rows' predictions are made wildly wrong: they must not move any temperature
    wrong = np.where(np.isnan(unknown), np.where(y == 1, 1e-6, 1 - 1e-6), p)
    fitted = fit_temperatures(unknown, wrong)
    assert fitted[UNKNOWN] == 1.0
    for j in range(6):
        if j != UNKNOWN:
            known = ~np.isnan(unknown[:, j])
            assert fitted[j] == fit_temperatures(six(y[known, j]), six(p[known, j]))[j]
            assert abs(fitted[j] - 2) < 0.3
    assert fit_temperatures(np.full((3, 6), np.nan), np.full((3, 6), 0.3)).tolist() == [1.0] * 6


def test_the_decision_ignores_what_was_predicted_for_unknown_labels():
    y, p, groups = patients(n_patients=30, true_t=3.0, seed=2)
    unknown = with_unknowns(y, seed=2)
    decision = decide_calibration(unknown, p, groups, n_folds=3)
    assert decision["use"] is True and decision["temperatures"][UNKNOWN] == 1.0
    assert all(t[UNKNOWN] == 1.0 for t in decision["fold_temperatures"])
    assert decision["loss_before"] == weighted_log_loss(unknown, p)
    assert np.isfinite([decision["loss_before"], decision["loss_after_oof"]]).all()
    for key in ("per_class_before", "per_class_after_oof", "ece_before", "ece_after_oof"):
        assert np.isnan(decision[key]["subarachnoid"]) and np.isfinite(decision[key]["any"])
    other = decide_calibration(unknown, np.where(np.isnan(unknown), 1 - p, p), groups, n_folds=3)
    for key in ("loss_before", "loss_after_oof", "temperatures", "fold_temperatures"):
        assert other[key] == decision[key], key
    # the same labels with the unknowns called negative decide on other numbers
    assert decide_calibration(np.nan_to_num(unknown), p, groups, n_folds=3)["loss_before"] != decision["loss_before"]


# --------------------------------------------------------------------------- the figure


def test_reliability_figure_is_a_picture(tmp_path):
    y, p, _ = patients(n_patients=20, true_t=2.0)
    path = write_reliability_figure(y, p, tmp_path / "reliability.png")
    assert path == tmp_path / "reliability.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 20_000 < path.stat().st_size < 2_000_000
    img = cv2.imread(str(path))
    assert img is not None and img.shape[1] >= 1000 and img.shape[0] >= 700
    assert img.std() > 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reliability.png"]  # no temporary left


def test_reliability_figure_rejects_mismatched_shapes(tmp_path):
    y, p, _ = patients(n_patients=2, per_patient=10)
    with pytest.raises(ValueError, match="shape"):
        write_reliability_figure(y, p[:-1], tmp_path / "r.png")
    with pytest.raises(ValueError, match=r"shape \(n, 6\)"):
        write_reliability_figure(y[:, :5], p[:, :5], tmp_path / "r.png")
    assert not any(tmp_path.iterdir())
