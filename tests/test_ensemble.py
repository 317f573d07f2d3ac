"""utils.ensemble: out-of-fold assembly, weighted averages, same-data checks, shared scores."""
import numpy as np
import pandas as pd
import pytest

from utils.ensemble import assemble_oof, average, check_same_data, shared_scores
from utils.labels import LABELS
from utils.metrics import weighted_log_loss
from utils.rundir import (OOF_PREDICTIONS, PRED_COLUMNS, REFINED_COLUMNS, VAL_PREDICTIONS, final_columns,
                          validation_predictions)


def _table(ids, y, p, refined=None):
    frame = pd.DataFrame(y, index=pd.Index(ids, name="image_id"), columns=list(LABELS))
    frame[PRED_COLUMNS] = p
    if refined is not None:
        frame[REFINED_COLUMNS] = refined
    return frame


def _data(seed=0, n=40):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 6)) < 0.3).astype(float)
    return [f"ID_{i:04x}" for i in range(n)], y, rng.uniform(0.05, 0.95, (n, 6))


def test_each_run_is_scored_on_what_it_submitted_its_refined_values_where_used(tmp_path):
    # a run whose refiner was used keeps pred_* and submits refined_*: a fold run in
    # oof_predictions.csv, a single run in val_predictions.csv
    ids, y, p = _data()
    refined = np.clip(0.5 * p + 0.5 * y, 0.01, 0.99)  # much better than pred_*
    other = _data(seed=1)[2]
    (tmp_path / "folds").mkdir()
    (tmp_path / "single").mkdir()
    _table(ids, y, p, refined).to_csv(tmp_path / "folds" / OOF_PREDICTIONS)
    _table(ids, y, other).to_csv(tmp_path / "single" / VAL_PREDICTIONS)
    runs = {name: validation_predictions(tmp_path / name) for name in ("folds", "single")}
    assert list(runs["folds"].columns) == [*LABELS, *PRED_COLUMNS]
    scores = shared_scores(runs)
    assert scores["n_images"] == 40
    assert scores["runs"]["folds"] == pytest.approx(weighted_log_loss(y, refined))
    assert scores["runs"]["single"] == pytest.approx(weighted_log_loss(y, other))
    assert scores["blend"] == pytest.approx(weighted_log_loss(y, (refined + other) / 2))
    assert final_columns(_table(ids, y, p, refined)) == REFINED_COLUMNS
    assert final_columns(_table(ids, y, p)) == PRED_COLUMNS


def test_shared_scores_use_only_the_images_every_run_predicted():
    ids, y, p = _data()
    a, b = _table(ids, y, p), _table(ids[10:], y[10:], p[10:])
    scores = shared_scores({"a": a, "b": b}, weights=[1, 3])
    assert scores["n_images"] == 30
    assert scores["runs"]["a"] == pytest.approx(weighted_log_loss(y[10:], p[10:]))
    assert shared_scores({"a": a.iloc[:5], "b": b.iloc[:5]}) == {}  # nothing shared


def test_average_is_the_weighted_mean_and_refuses_mismatched_tables():
    index = pd.Index(["x", "y"])
    t1 = pd.DataFrame([[0.2, 0.4], [0.6, 0.8]], index=index, columns=["a", "b"])
    t2 = pd.DataFrame([[0.4, 0.0], [0.0, 0.4]], index=index, columns=["a", "b"])
    np.testing.assert_allclose(average([t1, t2], [3, 1]).to_numpy(), [[0.25, 0.3], [0.45, 0.7]])
    with pytest.raises(ValueError, match="different images or columns"):
        average([t1, t2.iloc[::-1]])
    with pytest.raises(ValueError, match="weights must be 2 non-negative numbers"):
        average([t1, t2], [1, -1])


def test_assemble_oof_refuses_an_image_in_two_folds():
    ids, y, p = _data(n=4)
    oof = assemble_oof({1: _table(ids[2:], y[2:], p[2:]), 0: _table(ids[:2], y[:2], p[:2])})
    assert oof["fold"].tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="in the validation set of two folds"):
        assemble_oof({0: _table(ids, y, p), 1: _table(ids[:1], y[:1], p[:1])})


def test_runs_on_other_data_are_named():
    same = {"stage_2_train.csv": "a" * 40, "stage_2_sample_submission.csv": "b" * 40}
    check_same_data({"r1": same, "r2": dict(same)})
    with pytest.raises(ValueError, match="r1 and r2 were made on different data: their stage_2_train.csv"):
        check_same_data({"r1": same, "r2": {**same, "stage_2_train.csv": "c" * 40}})
