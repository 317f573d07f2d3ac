"""utils.evaluation: every point figure against scikit-learn on the known labels, the series
rules in closed form, the patient bootstrap (coverage, width, one patient, skipped
resamples, a resample recomputed by hand), Youden's threshold against a loop, the page."""
import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss, recall_score, roc_auc_score  # test-only dependency

from utils.calibration import expected_calibration_error
from utils.evaluation import (evaluate, patient_resamples, series_frame, series_labels_from_slices, slice_frame,
                              validation_threshold, worst_series, worst_slices, write_evaluate_html,
                              youden_threshold)
from utils.labels import LABELS
from utils.metrics import CLASS_WEIGHTS
from utils.rundir import PRED_COLUMNS

LN2 = math.log(2)
N_FIGURES = 1 + 2 * len(LABELS) + len(LABELS) + 2 * 2  # slice loss, per-class loss and AUC, series AUC, sens/spec


def synthetic(n_patients: int, seed: int = 0) -> pd.DataFrame:
    """Patients of one or two series of 4 to 9 slices; in a series that bleeds with a subtype
    (30 %), about half its slices show it; predictions separate the classes imperfectly and
    are rounded to 0.01, so that ties occur."""
    rng = np.random.default_rng(seed)
    keys, series, patients, labels = [], [], [], []
    for i in range(n_patients):
        for s in range(rng.integers(1, 3)):
            n = int(rng.integers(4, 10))
            subtypes = (rng.random((n, 5)) < 0.5) & (rng.random(5) < 0.3)
            labels.append(np.c_[subtypes, subtypes.any(axis=1)].astype(float))
            keys += [f"p{i:03d}s{s}i{k}" for k in range(n)]
            series += [f"p{i:03d}s{s}"] * n
            patients += [f"p{i:03d}"] * n
    y = np.concatenate(labels)
    p = 1 / (1 + np.exp(-(1.5 * (2 * y - 1) + rng.normal(0, 1.5, y.shape))))
    return slice_frame(keys, y, np.clip(np.round(p, 2), 0.01, 0.99), series, patients)


def validation(seed: int = 0, n: int = 400) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(float)
    return pd.DataFrame({"any": y, "pred_any": np.round(np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1), 2)})


def figures(tree, path=()):
    """Every bootstrapped figure {"value", "low", "high", "n_boot"} of a summary, with its path."""
    if isinstance(tree, dict) and "n_boot" in tree and "value" in tree:
        yield path, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from figures(value, (*path, key))


def with_unknowns(slices: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """A fifth of the labels unknown, and epidural unknown everywhere."""
    out = slices.copy()
    mask = np.random.default_rng(seed).random((len(out), len(LABELS))) < 0.2
    out[list(LABELS)] = out[list(LABELS)].mask(mask)
    out["epidural"] = np.nan
    return out


# ---------------------------------------------------------------------------------------
# Point figures against scikit-learn.

def test_slice_figures_equal_scikit_learn_on_the_known_labels():
    slices = with_unknowns(synthetic(40, seed=1))
    summary = evaluate(slices, threshold=0.5, n_boot=20)
    checked = 0
    for label, pred in zip(LABELS, PRED_COLUMNS):
        entry, known = summary["slice"]["per_class"][label], slices[label].notna()
        y, p = slices.loc[known, label].to_numpy(), slices.loc[known, pred].to_numpy()
        assert entry["n_known"] == len(y) and entry["n_positive"] == int(y.sum())
        if label == "epidural":
            assert len(y) == 0
            assert entry["auc"]["value"] is None and entry["log_loss"]["value"] is None and entry["ece"] is None
            assert entry["auc"]["n_boot"] == 0
            continue
        assert entry["auc"]["value"] == pytest.approx(roc_auc_score(y, p), rel=1e-12)
        assert entry["log_loss"]["value"] == pytest.approx(log_loss(y, p, labels=[0, 1]), rel=1e-12)
        assert entry["ece"] == pytest.approx(expected_calibration_error(y, p), rel=1e-12)
        checked += 1
    assert checked == len(LABELS) - 1
    truth, pred = slices[list(LABELS)].to_numpy(), slices[PRED_COLUMNS].to_numpy()
    known = ~np.isnan(truth)
    weights = np.broadcast_to(CLASS_WEIGHTS, truth.shape)
    expected = log_loss(truth[known], pred[known], sample_weight=weights[known], labels=[0, 1])
    assert summary["slice"]["weighted_log_loss"]["value"] == pytest.approx(expected, rel=1e-12)


def test_with_every_label_known_the_weighted_loss_is_the_competition_metric():
    from utils.metrics import weighted_log_loss
    slices = synthetic(15, seed=2)
    summary = evaluate(slices, threshold=0.5, n_boot=0)
    assert summary["slice"]["weighted_log_loss"]["value"] == pytest.approx(
        weighted_log_loss(slices[list(LABELS)].to_numpy(), slices[PRED_COLUMNS].to_numpy()), rel=1e-12)


def test_series_figures_equal_scikit_learn():
    slices = with_unknowns(synthetic(50, seed=3), seed=1)
    site = pd.DataFrame({k: np.nan for k in LABELS}, index=pd.Index(slices["series"].unique()[:10]))
    site["any"] = [1, 0] * 5
    summary = evaluate(slices, site, threshold=0.6, validation=validation(), n_boot=20)
    series = series_frame(slices, site)
    for label, pred in zip(LABELS, PRED_COLUMNS):
        known = series[label].notna()
        entry = summary["series"]["per_class"][label]
        assert entry["n_known"] == known.sum() and entry["n_positive"] == (series[label] == 1).sum()
        if label != "epidural":  # every slice label unknown: no series label either
            expected = roc_auc_score(series.loc[known, label], series.loc[known, pred])
            assert entry["auc"]["value"] == pytest.approx(expected, rel=1e-12)
    known = series["any"].notna()
    y = series.loc[known, "any"].to_numpy()
    chosen = summary["thresholds"]["validation"]["threshold"]
    for key, threshold in (("at_threshold", 0.6), ("at_validation_threshold", chosen)):
        called = series.loc[known, "pred_any"].to_numpy() > threshold
        assert summary["series"][key]["threshold"] == threshold
        assert summary["series"][key]["sensitivity"]["value"] == pytest.approx(recall_score(y, called))
        assert summary["series"][key]["specificity"]["value"] == pytest.approx(recall_score(y, called, pos_label=0))


# ---------------------------------------------------------------------------------------
# Series: the maximum over slices, labels from the site or the slices.

def closed_form_slices() -> pd.DataFrame:
    #         key   series patient  label  p(any)
    rows = [("a1", "A", "P1", 0, 0.1), ("a2", "A", "P1", 1, 0.7), ("a3", "A", "P1", np.nan, 0.4),
            ("b1", "B", "P1", 0, 0.2), ("b2", "B", "P1", 0, 0.3),
            ("c1", "C", "P2", 0, 0.6), ("c2", "C", "P2", np.nan, 0.05),
            ("d1", "D", "P3", np.nan, 0.9), ("d2", "D", "P3", np.nan, 0.2),  # series-level labels only
            ("e1", "E", "P4", 1, 0.8)]
    keys, series, patients, label, p = zip(*rows)
    y = np.repeat(np.array(label, dtype=float)[:, None], len(LABELS), axis=1)  # every class alike
    pred = np.c_[np.repeat(np.array(p)[:, None] / 2, len(LABELS) - 1, axis=1), p]  # subtypes: half of `any`
    return slice_frame(keys, y, pred, series, patients)


def test_series_labels_from_slices_in_closed_form():
    derived = series_labels_from_slices(closed_form_slices())
    assert derived["any"].to_dict() == pytest.approx({"A": 1.0, "B": 0.0, "C": np.nan, "D": np.nan, "E": 1.0},
                                                     nan_ok=True)
    assert list(derived.columns) == list(LABELS)


def test_series_take_the_maximum_and_the_site_label_wins():
    slices = closed_form_slices()
    site = pd.DataFrame({k: np.nan for k in LABELS}, index=["D", "E"])
    site.loc["D", ["any", "epidural"]] = [1, 0]
    site.loc["E", [k for k in LABELS if k != "subdural"]] = 0  # conflicts with its slice; subdural not given
    series = series_frame(slices, site)
    assert list(series.index) == ["A", "B", "C", "D", "E"]
    assert series["patient"].tolist() == ["P1", "P1", "P2", "P3", "P4"]
    assert series["n_slices"].tolist() == [3, 2, 2, 2, 1]
    assert series["pred_any"].tolist() == pytest.approx([0.7, 0.3, 0.6, 0.9, 0.8])
    assert series["at_any"].tolist() == ["a2", "b2", "c1", "d1", "e1"]
    assert series["pred_epidural"].tolist() == pytest.approx([0.35, 0.15, 0.3, 0.45, 0.4])
    nan = np.nan
    assert series["any"].tolist() == pytest.approx([1, 0, nan, 1, 0], nan_ok=True)
    assert series["epidural"].tolist() == pytest.approx([1, 0, nan, 0, 0], nan_ok=True)
    assert series["subdural"].tolist() == pytest.approx([1, 0, nan, nan, 1], nan_ok=True)
    summary = evaluate(slices, site, threshold=0.65, n_boot=0)
    # any: A 1 (0.7), B 0 (0.3), D 1 (0.9), E 0 (0.8): over 0.65 are A, D, E
    assert summary["series"]["at_threshold"]["sensitivity"]["value"] == 1.0
    assert summary["series"]["at_threshold"]["specificity"]["value"] == 0.5
    assert summary["series"]["per_class"]["any"]["auc"]["value"] == 0.75
    assert summary["counts"] == {"slices": 10, "slices_labelled": 6, "series": 5, "series_labelled": 4,
                                 "patients": 4}


def test_series_labels_must_name_predicted_series_and_be_binary():
    slices = closed_form_slices()
    stray = pd.DataFrame({k: [0.0] for k in LABELS}, index=["Z"])
    with pytest.raises(ValueError, match="without predicted slices"):
        series_frame(slices, stray)
    with pytest.raises(ValueError, match="0, 1 or NaN"):
        series_frame(slices, pd.DataFrame({k: [0.5] for k in LABELS}, index=["A"]))


# ---------------------------------------------------------------------------------------
# The bootstrap over patients.

def test_intervals_cover_the_figure_and_repeat_for_a_seed():
    slices = synthetic(60, seed=4)
    first = evaluate(slices, threshold=0.5, validation=validation(), n_boot=200, seed=3)
    assert first == evaluate(slices, threshold=0.5, validation=validation(), n_boot=200, seed=3)
    assert first != evaluate(slices, threshold=0.5, validation=validation(), n_boot=200, seed=4)
    found = list(figures(first))
    assert len(found) == N_FIGURES
    for path, figure in found:
        assert figure["low"] <= figure["value"] <= figure["high"], path
        assert 0 < figure["n_boot"] <= 200, path
    assert json.loads(json.dumps(first, allow_nan=False)) == first  # strict JSON


def test_intervals_narrow_with_more_patients():
    widths = {}
    for n_patients in (20, 400):
        summary = evaluate(synthetic(n_patients, seed=5), threshold=0.5, n_boot=200)
        widths[n_patients] = {path: f["high"] - f["low"] for path, f in figures(summary)}
    # the same distribution: the width goes as 1 / sqrt(patients), about 4.5 times narrower
    for path in [("slice", "weighted_log_loss"), ("slice", "per_class", "any", "auc"),
                 ("series", "per_class", "any", "auc"), ("series", "at_threshold", "specificity")]:
        assert widths[400][path] < widths[20][path] / 2, path


def test_one_patient_has_figures_but_no_interval():
    slices = synthetic(1, seed=6)
    slices = pd.concat([slices, slices.rename(index=lambda k: f"{k}b").assign(series="other")])
    summary = evaluate(slices, threshold=0.5, n_boot=50)
    found = [f for _, f in figures(summary) if f["value"] is not None]
    assert found and summary["counts"]["patients"] == 1
    assert all(f["low"] is None and f["high"] is None and f["n_boot"] == 0 for f in found)


def test_resamples_where_a_figure_is_undefined_are_skipped_and_counted():
    slices = synthetic(10, seed=7)
    slices[list(LABELS)] = 0.0
    slices.loc[slices["patient"] == "p003", "any"] = 1.0  # one patient holds every positive
    summary = evaluate(slices, threshold=0.5, n_boot=300, seed=1)
    counts = patient_resamples(10, 300, seed=1)
    defined = (counts[:, 3] > 0) & (np.delete(counts, 3, axis=1).sum(axis=1) > 0)
    assert 0 < defined.sum() < 300
    assert summary["series"]["per_class"]["any"]["auc"]["n_boot"] == defined.sum()
    assert summary["slice"]["per_class"]["any"]["auc"]["n_boot"] == defined.sum()
    assert summary["slice"]["weighted_log_loss"]["n_boot"] == 300


def test_a_resample_is_the_data_with_each_patient_repeated_as_often_as_drawn():
    slices = with_unknowns(synthetic(12, seed=8), seed=2)
    one = evaluate(slices, threshold=0.5, validation=validation(), n_boot=1, seed=11)
    counts = patient_resamples(12, 1, seed=11)[0]  # patients p000..p011 in sorted order
    assert counts.max() > 1  # some patient counts twice
    copies = [slices[slices["patient"] == f"p{i:03d}"].rename(index=lambda k, c=c: f"{k}#{c}")
              .assign(series=lambda s, c=c: s["series"] + f"#{c}")
              for i, n in enumerate(counts) for c in range(n)]
    redrawn = evaluate(pd.concat(copies), threshold=0.5, validation=validation(), n_boot=0)
    expected = dict(figures(redrawn))
    found = list(figures(one))
    assert len(found) == N_FIGURES
    for path, figure in found:
        if figure["n_boot"]:
            assert figure["low"] == figure["high"] == pytest.approx(expected[path]["value"], rel=1e-12), path
        else:
            assert expected[path]["value"] is None or figure["value"] is None, path


def test_patient_resamples_draw_every_patient_count_with_replacement():
    counts = patient_resamples(7, 500, seed=0)
    assert counts.shape == (500, 7) and (counts.sum(axis=1) == 7).all()
    assert (patient_resamples(7, 500, seed=0) == counts).all()
    assert counts.mean() == pytest.approx(1, abs=0.1) and (counts >= 2).any()


# ---------------------------------------------------------------------------------------
# The validation threshold.

def brute_force_youden(y, p):
    best, best_j = None, -np.inf
    positive = y == 1
    for t in np.unique(p):  # ascending: a later tie does not replace the lower one
        called = p > t
        j = (called & positive).sum() / positive.sum() + (~called & ~positive).sum() / (~positive).sum() - 1
        if j > best_j + 1e-12:
            best, best_j = t, j
    return best, best_j


@pytest.mark.parametrize("seed", range(5))
def test_youden_threshold_equals_a_loop_over_the_candidates(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(300) < 0.3).astype(float)
    p = np.round(np.clip(0.25 * y + rng.random(300) * 0.75, 0, 1), 2)  # ties
    threshold, j = youden_threshold(y, p)
    expected_t, expected_j = brute_force_youden(y, p)
    assert threshold == expected_t and j == pytest.approx(expected_j)


def test_youden_threshold_in_closed_form_takes_the_lowest_tie_and_skips_unknowns():
    # t = 0.1: sensitivity 1, specificity 1/2; t = 0.4: 1/2 and 1; both J = 1/2
    assert youden_threshold([0, 0, 1, 1, np.nan], [0.1, 0.4, 0.35, 0.8, 0.9]) == (0.1, 0.5)
    table = pd.DataFrame({"any": [0, 0, 1, 1, np.nan], "pred_any": [0.1, 0.4, 0.35, 0.8, 0.9]})
    assert validation_threshold(table) == {"threshold": 0.1, "youden_j": 0.5, "n": 4, "n_positive": 2}
    with pytest.raises(ValueError, match="positive and negative"):
        youden_threshold([1, 1, np.nan], [0.2, 0.3, 0.4])


# ---------------------------------------------------------------------------------------
# The most wrong slices and series.

def test_worst_slices_and_series_in_closed_form():
    nan = np.nan
    y = [[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1], [nan] * 6, [0, nan, nan, nan, nan, 0]]
    p = [[0.5, 0.5, 0.5, 0.5, 0.5, 0.9], [0.5] * 6, [0.99] * 6, [0.1] * 6]
    slices = slice_frame(["x", "y", "z", "w"], y, p, ["S", "S", "T", "U"], ["P", "P", "Q", "R"])
    table = worst_slices(slices, k=3)
    assert list(table.index) == ["x", "y", "w"]  # z: no known label
    assert table["loss"].tolist() == pytest.approx([(5 * LN2 - 2 * math.log(0.1)) / 7, LN2, -math.log(0.9)])
    assert table.loc["y", "worst_class"] == "epidural"  # every class ln 2: the first
    assert table.loc[["x", "w"], "worst_class"].tolist() == ["any", "epidural"]
    assert table["label"].tolist() == [0, 0, 0] and table["predicted"].tolist() == [0.9, 0.5, 0.1]
    assert list(worst_slices(slices, k=1).index) == ["x"]
    series = worst_series(series_frame(slices), k=5)
    # S: labels 0 0 0 0 0 1 from x and y, maximum 0.5 0.5 0.5 0.5 0.5 0.9; T: no label; U: two known 0
    assert list(series.index) == ["S", "U"]
    assert series.loc["U", "loss"] == pytest.approx(-math.log(0.9))
    assert series.loc["S", "loss"] == pytest.approx((5 * LN2 - 2 * math.log(0.9)) / 7)
    assert series.loc["S", "worst_class"] == "epidural" and series.loc["S", "at"] == "x"


# ---------------------------------------------------------------------------------------
# evaluate.html

def test_the_page_shows_the_figures_and_the_heatmaps(tmp_path):
    slices = synthetic(30, seed=9)
    slices["epidural"] = np.nan
    summary = evaluate(slices, threshold=0.5, validation=validation(), n_boot=50)
    slice_table, series_table = worst_slices(slices, k=4), worst_series(series_frame(slices), k=3)
    heatmaps = {slice_table.index[0]: ("any", np.zeros((32, 32, 3), np.uint8)),
                series_table["at"].iloc[0]: ("subdural", np.full((32, 32, 3), 200, np.uint8))}
    path = write_evaluate_html(tmp_path / "evaluate.html", summary, slice_table, series_table, heatmaps,
                               ["<script>alert(1)</script>"])
    page = path.read_text(encoding="utf-8")
    shown = [("slice", "weighted_log_loss"), ("slice", "per_class", "any", "auc"),
             ("series", "per_class", "subdural", "auc"), ("series", "at_validation_threshold", "specificity")]
    for path_ in shown:
        figure = dict(figures(summary))[path_]
        for key in ("value", "low", "high"):
            assert f"{figure[key]:.4f}" in page, (path_, key)
    assert f"{summary['thresholds']['validation']['threshold']:.4f}" in page
    assert f"{summary['slice']['per_class']['any']['ece']:.4f}" in page
    assert all(str(k) in page for k in [*slice_table.index, *series_table.index])
    assert all(f"{v:.4f}" in page for v in [*slice_table["loss"], *series_table["loss"]])
    rows = [*slice_table.index, *series_table["at"]]  # a slice may head both tables
    assert page.count("alt='heatmap'") == sum(k in heatmaps for k in rows) >= 2
    assert page.count("alt='reliability'") == 1
    assert "<script>" not in page
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------------------------------
# Inputs.

def arrays(n=4):
    return ([f"k{i}" for i in range(n)], np.zeros((n, 6)), np.full((n, 6), 0.5), ["s"] * n, ["p"] * n)


@pytest.mark.parametrize("change, message", [
    (lambda a: (a[0], np.full((4, 6), 0.5), *a[2:]), "0, 1 or NaN"),
    (lambda a: (a[0], a[1], np.full((4, 6), np.nan), *a[3:]), "finite probabilities"),
    (lambda a: (a[0], a[1], np.full((4, 6), 1.5), *a[3:]), "finite probabilities"),
    (lambda a: (["k"] * 4, *a[1:]), "unique"),
    (lambda a: (*a[:4], ["p", "p", "q", "q"]), "more than one patient"),
    (lambda a: (a[0], np.zeros((4, 5)), *a[2:]), "shape"),
    (lambda a: (*a[:3], ["s"] * 3, a[4]), "1-D with 4 rows"),
    (lambda a: (*a[:3], ["s", None, "s", "s"], a[4]), "series and patient"),
])
def test_bad_slices_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        slice_frame(*change(arrays()))


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": 1.0}, "threshold"), ({"threshold": 0.5, "n_boot": -1}, "n_boot"),
    ({"threshold": 0.5, "seed": 1.5}, "seed"), ({"threshold": 0.5, "level": 95}, "level"),
    ({"threshold": 0.5, "validation": pd.DataFrame({"any": [0, 1]})}, "pred_any"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate(slice_frame(*arrays()), **kwargs)
    with pytest.raises(ValueError, match="k must be"):
        worst_slices(slice_frame(*arrays()), k=0)
