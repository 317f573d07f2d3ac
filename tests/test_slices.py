"""utils.slices: z-order and neighbours, on hand-made headers and on the real sample."""
import numpy as np
import pandas as pd
import pytest

from utils.headers import scan_headers
from utils.slices import (ALONE_PREFIX, ORDER_COLUMNS, PATIENT_PREFIX, STUDY_PREFIX, neighbour_ids, neighbour_paths,
                          order_slices)


def headers(rows) -> pd.DataFrame:
    """A scan_headers-like table from (image_id, series_uid, study_uid, patient_id, z).
    ID columns stay as given: astype("str") would turn None into the text 'None' under
    pandas 2 (and keep it missing under pandas 3)."""
    table = pd.DataFrame(rows, columns=["image_id", "series_uid", "study_uid", "patient_id", "z"])
    return table.astype({"image_id": "str", "z": "float64"})


# --------------------------------------------------------------------------- order


def test_order_sorts_each_series_by_z_whatever_the_row_order():
    table = headers([
        ("ID_a3", "S1", "T1", "P1", 30.0), ("ID_b1", "S2", "T2", "P2", -5.0),
        ("ID_a1", "S1", "T1", "P1", 10.0), ("ID_a2", "S1", "T1", "P1", 20.0),
        ("ID_b2", "S2", "T2", "P2", 5.0),
    ])
    order = order_slices(table)
    assert list(order.index) == list(table["image_id"])  # rows stay in the input's order
    assert order.index.name == "image_id"
    assert list(order.columns) == list(ORDER_COLUMNS)
    assert order.loc[["ID_a1", "ID_a2", "ID_a3"], "position"].tolist() == [0, 1, 2]
    assert order.loc[["ID_b1", "ID_b2"], "position"].tolist() == [0, 1]
    assert order["n_in_series"].tolist() == [3, 2, 3, 3, 2]
    assert order.loc["ID_a2", ["prev_id", "next_id"]].tolist() == ["ID_a1", "ID_a3"]
    assert order.loc["ID_a1", "prev_id"] == "ID_a1"  # the edge repeats itself
    assert order.loc["ID_a3", "next_id"] == "ID_a3"
    assert order.loc["ID_b1", ["prev_id", "next_id"]].tolist() == ["ID_b1", "ID_b2"]
    assert order.attrs["n_series"] == 2
    assert order.attrs["ties"] == order.attrs["missing_z"] == order.attrs["series_fallback"] == 0

    shuffled = order_slices(table.sample(frac=1, random_state=3))
    pd.testing.assert_frame_equal(shuffled.loc[order.index], order)


def test_equal_z_is_broken_by_image_id_and_counted():
    rows = [("ID_c", "S", "T", "P", 1.0), ("ID_a", "S", "T", "P", 2.0),
            ("ID_b", "S", "T", "P", 2.0), ("ID_d", "S", "T", "P", 2.0), ("ID_e", "S", "T", "P", 3.0)]
    for seed in range(4):
        table = headers(rows).sample(frac=1, random_state=seed)
        order = order_slices(table)
        assert order.sort_values("position").index.tolist() == ["ID_c", "ID_a", "ID_b", "ID_d", "ID_e"]
        assert order.attrs["ties"] == 2  # ID_b and ID_d each tie the slice before them
    assert order.loc["ID_b", ["prev_id", "next_id"]].tolist() == ["ID_a", "ID_d"]


def test_a_slice_without_z_becomes_its_own_series():
    table = headers([
        ("ID_1", "S", "T", "P", 0.0), ("ID_2", "S", "T", "P", np.nan),
        ("ID_3", "S", "T", "P", 10.0), ("ID_4", "S", "T", "P", np.inf), ("ID_5", "S", "T", "P", 5.0),
    ])
    order = order_slices(table)
    assert order.attrs["missing_z"] == 2  # an infinite z is as useless as none
    for lost in ("ID_2", "ID_4"):
        assert order.loc[lost, "series"] == ALONE_PREFIX + lost
        assert order.loc[lost, ["position", "n_in_series"]].tolist() == [0, 1]
        assert order.loc[lost, ["prev_id", "next_id"]].tolist() == [lost, lost]
    kept = order.loc[["ID_1", "ID_5", "ID_3"]]
    assert kept["position"].tolist() == [0, 1, 2]  # the rest close up around the gap
    assert kept["n_in_series"].tolist() == [3, 3, 3]
    assert order.loc["ID_1", "next_id"] == "ID_5"
    assert order.attrs["n_series"] == 3


def test_series_fallback_borrows_a_single_known_series_else_study_patient_image():
    table = headers([
        ("ID_1", "S1", "T1", "P1", 0.0), ("ID_2", "", "T1", "P1", 1.0),  # joins S1 via T1
        ("ID_3", None, "T2", "P2", 0.0), ("ID_4", "", "T2", "P2", 1.0),  # T2 has no series
        ("ID_5", " ", "", "P3", 0.0),  # no series, no study: patient P3
        ("ID_6", "", "", "", 0.0),  # nothing: alone
        ("ID_7", "S7", "T7", "P1", 5.0), ("ID_8", "", "T3", "P1", 2.0),  # T3 unknown: study wins
        ("ID_9", "S9", "T9", "P9", 0.0), ("ID_10", "", "", "P9", 1.0),  # joins S9 via P9
    ])
    order = order_slices(table)
    assert order.loc["ID_2", "series"] == "S1"
    assert order.loc[["ID_1", "ID_2"], "position"].tolist() == [0, 1]
    assert order.loc[["ID_3", "ID_4"], "series"].tolist() == [STUDY_PREFIX + "T2"] * 2
    assert order.loc["ID_4", "prev_id"] == "ID_3"
    assert order.loc["ID_5", "series"] == PATIENT_PREFIX + "P3"
    assert order.loc["ID_6", "series"] == ALONE_PREFIX + "ID_6"
    assert order.loc["ID_8", "series"] == STUDY_PREFIX + "T3"
    assert order.attrs["series_from_study"] == 4  # ID_2, ID_3, ID_4, ID_8
    assert order.loc["ID_10", "series"] == "S9"
    assert order.attrs["series_from_patient"] == 2  # ID_5, ID_10
    assert order.attrs["series_alone"] == 1
    assert order.attrs["series_fallback"] == 7


@pytest.mark.parametrize("absent", ["None", "NaN", "pd.NA in a string column", "empty"])
def test_an_absent_series_uid_is_missing_in_every_pandas_form(absent):
    # pandas 2.2 and 3 store missing text differently; none of the forms may become an ID
    rows = [("ID_1", "S1", "T1", "P1", 0.0), ("ID_2", None, "T2", "P2", 0.0), ("ID_3", None, "T3", "P3", 0.0)]
    table = headers(rows)
    value = {"None": None, "NaN": np.nan, "pd.NA in a string column": pd.NA, "empty": ""}[absent]
    series = pd.Series(["S1", value, value], dtype="string" if value is pd.NA else object)
    table["series_uid"] = series
    order = order_slices(table)
    assert order.loc[["ID_2", "ID_3"], "series"].tolist() == [STUDY_PREFIX + "T2", STUDY_PREFIX + "T3"]
    assert order.attrs["series_from_study"] == 2


def test_order_rejects_nonsense():
    good = headers([("ID_1", "S", "T", "P", 0.0), ("ID_2", "S", "T", "P", 1.0)])
    with pytest.raises(ValueError, match="more than once"):
        order_slices(pd.concat([good, good.iloc[:1]]))
    with pytest.raises(ValueError, match="lack the columns"):
        order_slices(good.drop(columns="study_uid"))
    with pytest.raises(ValueError, match="no rows"):
        order_slices(good.iloc[:0])
    with pytest.raises(ValueError, match="numeric"):
        order_slices(good.astype({"z": "object"}).assign(z=["1.0", "top"]))
    with pytest.raises(ValueError, match="no image_id"):
        order_slices(good.assign(image_id=["ID_1", ""]))
    with pytest.raises(TypeError):
        order_slices(good.to_numpy())


def real_headers(rsna_sample) -> pd.DataFrame:
    table, bad = scan_headers(sorted((rsna_sample / "stage_2_train").glob("*.dcm")))
    assert bad.empty
    return table


def test_real_sample_orders_two_complete_series(rsna_sample):
    table = real_headers(rsna_sample)
    order = order_slices(table)
    assert order.attrs["n_series"] == 2
    assert order.attrs["ties"] == order.attrs["missing_z"] == order.attrs["series_fallback"] == 0
    patient = table.set_index("image_id")["patient_id"]
    sizes = {}
    for series, part in order.groupby("series"):
        part = part.sort_values("position")
        (owner,) = patient[part.index].unique()
        sizes[owner] = len(part)
        assert part["position"].tolist() == list(range(len(part)))
        assert (part["n_in_series"] == len(part)).all()
        assert (np.diff(part["z"].to_numpy()) > 0).all()  # strictly increasing along the series
        ids = part.index.tolist()
        assert part["prev_id"].tolist() == ids[:1] + ids[:-1]
        assert part["next_id"].tolist() == ids[1:] + ids[-1:]
    assert sizes == {"ID_cd5a85fd": 33, "ID_ee4d05e4": 32}


def test_real_sample_neighbour_paths(rsna_sample):
    table = real_headers(rsna_sample)
    order = order_slices(table)
    paths = table.set_index("image_id")["path"]
    stacks = neighbour_paths(order, paths, radius=2)
    assert list(stacks.columns) == [-2, -1, 0, 1, 2]
    assert stacks.index.equals(order.index)
    assert (stacks[0] == paths[order.index].to_numpy()).all()
    assert (stacks[-1] == paths[order["prev_id"]].to_numpy()).all()
    assert (stacks[1] == paths[order["next_id"]].to_numpy()).all()
    first = order.index[(order["position"] == 0)]
    assert (stacks.loc[first, -2] == stacks.loc[first, 0]).all()


# --------------------------------------------------------------------------- neighbours


def test_neighbours_repeat_the_nearest_slice_at_the_edges():
    table = headers([
        ("ID_3", "A", "T", "P", 3.0), ("ID_1", "A", "T", "P", 1.0), ("ID_2", "A", "T", "P", 2.0),
        ("ID_9", "B", "U", "Q", 7.0),
    ])
    order = order_slices(table)
    ids = neighbour_ids(order, radius=2)
    assert ids.loc["ID_1"].tolist() == ["ID_1", "ID_1", "ID_1", "ID_2", "ID_3"]
    assert ids.loc["ID_2"].tolist() == ["ID_1", "ID_1", "ID_2", "ID_3", "ID_3"]
    assert ids.loc["ID_3"].tolist() == ["ID_1", "ID_2", "ID_3", "ID_3", "ID_3"]
    assert ids.loc["ID_9"].tolist() == ["ID_9"] * 5  # a one-slice series is all itself
    assert neighbour_ids(order, radius=0).columns.tolist() == [0]

    paths = pd.Series({i: f"/data/{i}.dcm" for i in order.index}).sample(frac=1, random_state=0)
    stacks = neighbour_paths(order, paths, radius=1)
    assert stacks.loc["ID_1"].tolist() == ["/data/ID_1.dcm", "/data/ID_1.dcm", "/data/ID_2.dcm"]
    with pytest.raises(ValueError, match="lacks 1 images"):
        neighbour_paths(order, paths.drop("ID_2"))
    with pytest.raises(ValueError, match="radius"):
        neighbour_ids(order, radius=-1)
    with pytest.raises(ValueError, match="positions"):
        neighbour_ids(order.assign(position=[0, 0, 1, 0]))
