"""utils.labels: Kaggle's long label CSV to the wide table, its errors, and the label report."""
import gzip
import logging
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from utils import labels as labels_module
from utils.labels import (
    ID_PATTERN,
    LABELS,
    LabelError,
    LabelWarning,
    check_image_id,
    format_label_report,
    is_valid_image_id,
    label_report,
    parse_row_ids,
    read_labels,
)

IMAGE_A = "ID_a67b9a79e"
IMAGE_B = "ID_d2eeb2b7e"
IMAGE_C = "ID_430963c50"


def long_rows(image_id: str, labels) -> list[str]:
    return [f"{image_id}_{name},{label}" for name, label in zip(LABELS, labels)]


def write_csv(path, rows, header="ID,Label"):
    lines = ([header] if header is not None else []) + list(rows)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def naive_wide(path) -> pd.DataFrame:
    """The textbook pandas way, as an independent reference."""
    long = pd.read_csv(path)
    parts = long["ID"].str.rsplit("_", n=1, expand=True)
    long["image_id"], long["subtype"] = parts[0], parts[1]
    return long.pivot(index="image_id", columns="subtype", values="Label")[list(LABELS)]


@pytest.fixture
def three_images(tmp_path):
    rows = (
        long_rows(IMAGE_A, [0, 1, 0, 1, 1, 1])
        + long_rows(IMAGE_B, [0] * 6)
        + long_rows(IMAGE_C, [1, 0, 0, 0, 0, 1])
    )
    return write_csv(tmp_path / "train.csv", rows)


# ------------------------------------------------------------------------- real sample
def test_real_sample_is_65_images_in_file_order(rsna_sample):
    path = rsna_sample / "stage_2_train.csv"
    labels = read_labels(path)
    assert labels.shape == (65, 6)
    assert list(labels.columns) == list(LABELS)
    assert all(dtype == np.int8 for dtype in labels.dtypes)
    assert labels.index.name == "image_id"
    assert labels.index[0] == "ID_a67b9a79e" and labels.index[-1] == "ID_1e77986ba"
    assert labels.loc["ID_a67b9a79e"].tolist() == [0, 1, 0, 1, 1, 1]
    assert labels.loc["ID_d2eeb2b7e"].tolist() == [0, 0, 0, 0, 0, 0]
    assert labels.loc["ID_430963c50"].tolist() == [0, 1, 0, 1, 1, 1]
    assert labels.attrs["duplicates_dropped"] == 0
    reference = naive_wide(path).loc[labels.index]
    np.testing.assert_array_equal(labels.to_numpy(), reference.to_numpy())


def test_real_sample_report_matches_raw_counts(rsna_sample):
    path = rsna_sample / "stage_2_train.csv"
    report = label_report(read_labels(path)).set_index(["section", "name"])
    long = pd.read_csv(path)
    subtype = long["ID"].str.rsplit("_", n=1).str[1]
    for name in LABELS:
        assert report.loc[("positives", name), "count"] == long.loc[subtype == name, "Label"].sum()
    assert report.loc[("images", "total"), "count"] == 65
    text = format_label_report(label_report(read_labels(path)))
    assert "65 images" in text


# ------------------------------------------------------------------------------ parsing
def test_reads_small_file_exactly(three_images):
    labels = read_labels(three_images)
    assert labels.index.tolist() == [IMAGE_A, IMAGE_B, IMAGE_C]
    assert labels.to_numpy().tolist() == [[0, 1, 0, 1, 1, 1], [0] * 6, [1, 0, 0, 0, 0, 1]]


def test_shuffled_rows_match_naive_pivot_and_keep_first_appearance(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"ID_{value:09x}" for value in rng.choice(16**9, size=300, replace=False)]
    values = (rng.random((300, 6)) < 0.3).astype(int)
    values[:, 5] = values[:, :5].max(axis=1)
    rows = [row for image_id, labels in zip(ids, values) for row in long_rows(image_id, labels)]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    path = write_csv(tmp_path / "train.csv", rows)
    labels = read_labels(path)
    first_seen = list(dict.fromkeys(row.split(",")[0].rsplit("_", 1)[0] for row in rows))
    assert labels.index.tolist() == first_seen
    np.testing.assert_array_equal(labels.to_numpy(), naive_wide(path).loc[first_seen].to_numpy())


def test_reads_gzip_and_crlf(tmp_path):
    rows = long_rows(IMAGE_A, [0, 1, 0, 1, 1, 1])
    path = tmp_path / "train.csv.gz"
    path.write_bytes(gzip.compress(("ID,Label\r\n" + "\r\n".join(rows) + "\r\n").encode()))
    assert read_labels(path).loc[IMAGE_A].tolist() == [0, 1, 0, 1, 1, 1]


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(("\ufeffID,Label\n" + "\n".join(long_rows(IMAGE_A, [0] * 6)) + "\n").encode())
    assert read_labels(path).index.tolist() == [IMAGE_A]


def test_trailing_blank_lines_are_ignored(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("ID,Label\n" + "\n".join(long_rows(IMAGE_A, [0] * 6)) + "\n\n\n")
    assert read_labels(path).shape == (1, 6)


# ------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "header", ["id,label", "ID", "ID,Label,extra", "Label,ID"],
)
def test_wrong_header_names_file_and_line_1(tmp_path, header):
    path = write_csv(tmp_path / "train.csv", long_rows(IMAGE_A, [0] * 6), header=header)
    with pytest.raises(LabelError, match=r"train\.csv: line 1: expected the header 'ID,Label'"):
        read_labels(path)


def test_missing_header(tmp_path):
    path = write_csv(tmp_path / "train.csv", long_rows(IMAGE_A, [0] * 6), header=None)
    with pytest.raises(LabelError, match=r"line 1: expected the header 'ID,Label', found 'ID_a67b9a79e_epidural,0'"):
        read_labels(path)


def test_empty_file_and_header_only(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(LabelError, match=r"empty\.csv: line 1: empty file"):
        read_labels(empty)
    with pytest.raises(LabelError, match="no label rows"):
        read_labels(write_csv(tmp_path / "header.csv", []))


def test_unknown_subtype_suffix(tmp_path):
    rows = long_rows(IMAGE_A, [0] * 6)
    rows[2] = f"{IMAGE_A}_intraventriculr,0"
    path = write_csv(tmp_path / "train.csv", rows)
    expected = r"train\.csv: 1 rows with a malformed ID: line 4: .*unknown subtype suffix 'intraventriculr'"
    with pytest.raises(LabelError, match=expected):
        read_labels(path)


@pytest.mark.parametrize(
    "bad_id",
    [
        "ID_../etc_any",
        "ID_a67b9a79E_any",  # uppercase hex
        "ID_a67b9a79_any",  # 8 digits
        "ID_a67b9a79e0_any",  # 10 digits
        "../ID_a67b9a79e_any",
        "ID_a67b9a7/e_any",
        "ID_a67b9a79e_any ",
        "id_a67b9a79e_any",
    ],
)
def test_id_outside_dataset_pattern_is_rejected_with_line(tmp_path, bad_id):
    rows = long_rows(IMAGE_B, [0] * 6) + long_rows(IMAGE_A, [0] * 6)
    rows[-1] = f"{bad_id},0"  # line 13
    path = write_csv(tmp_path / "train.csv", rows)
    with pytest.raises(LabelError, match=r"line 13: ") as info:
        read_labels(path)
    assert repr(bad_id) in str(info.value)


def test_path_traversal_id_is_explained(tmp_path):
    rows = long_rows(IMAGE_A, [0] * 6)
    rows[5] = "ID_../etc_any,0"
    expected = r"line 7: 'ID_\.\./etc_any' \(image ID 'ID_\.\./etc' is outside the dataset's pattern"
    with pytest.raises(LabelError, match=expected):
        read_labels(write_csv(tmp_path / "train.csv", rows))


def test_many_bad_ids_show_a_few_and_the_count(tmp_path):
    rows = [f"ID_bad{i}_any,0" for i in range(8)]
    with pytest.raises(LabelError, match=r"8 rows with a malformed ID: line 2: .* and 3 more"):
        read_labels(write_csv(tmp_path / "train.csv", rows))


@pytest.mark.parametrize("bad_label", ["2", "0.5", "", "1.0", " 1", "-1", "yes"])
def test_label_other_than_0_or_1(tmp_path, bad_label):
    rows = long_rows(IMAGE_A, [0] * 6)
    rows[3] = f"{IMAGE_A}_subarachnoid,{bad_label}"
    with pytest.raises(LabelError, match=rf"1 rows with a Label other than 0 or 1: line 5: '{bad_label}'"):
        read_labels(write_csv(tmp_path / "train.csv", rows))


def test_wrong_number_of_fields_names_the_line(tmp_path):
    rows = long_rows(IMAGE_A, [0] * 6)
    rows[1] = f"{IMAGE_A}_intraparenchymal,0,1"
    with pytest.raises(LabelError, match=r"line 3: expected 2 fields, found 3"):
        read_labels(write_csv(tmp_path / "train.csv", rows))


def test_blank_line_in_the_middle_is_an_error_at_its_line(tmp_path):
    rows = long_rows(IMAGE_A, [0] * 6)
    rows.insert(3, "")
    with pytest.raises(LabelError, match=r"line 5: '' \(empty ID"):
        read_labels(write_csv(tmp_path / "train.csv", rows))


def test_image_with_fewer_than_six_rows(tmp_path):
    rows = long_rows(IMAGE_A, [0] * 6) + long_rows(IMAGE_B, [0] * 6)[:5]
    expected = rf"1 images have fewer than 6 subtype rows: {IMAGE_B} \(line 8; missing any\)"
    with pytest.raises(LabelError, match=expected):
        read_labels(write_csv(tmp_path / "train.csv", rows))


def test_conflicting_duplicate_lists_ids_and_lines(tmp_path):
    rows = long_rows(IMAGE_A, [0] * 6) + long_rows(IMAGE_B, [0] * 6)
    rows += [f"{IMAGE_A}_subdural,1", f"{IMAGE_B}_any,1"]
    with pytest.raises(LabelError) as info:
        read_labels(write_csv(tmp_path / "train.csv", rows))
    message = str(info.value)
    assert "2 IDs are repeated with both labels 0 and 1" in message
    assert f"{IMAGE_A}_subdural (lines 6, 14)" in message
    assert f"{IMAGE_B}_any (lines 13, 15)" in message


def test_identical_duplicates_are_dropped_counted_and_logged(tmp_path, caplog):
    image_a = long_rows(IMAGE_A, [0, 1, 0, 1, 1, 1])
    rows = image_a + long_rows(IMAGE_B, [0] * 6) + image_a + [image_a[2]]
    with caplog.at_level(logging.INFO, logger="utils.labels"):
        labels = read_labels(write_csv(tmp_path / "train.csv", rows))
    assert labels.attrs["duplicates_dropped"] == 7
    assert labels.index.tolist() == [IMAGE_A, IMAGE_B]
    assert labels.loc[IMAGE_A].tolist() == [0, 1, 0, 1, 1, 1]
    assert any("dropped 7 identical repeated rows" in record.getMessage() for record in caplog.records)


def test_any_disagreeing_with_subtypes_warns_with_counts(tmp_path):
    rows = (
        long_rows(IMAGE_A, [0, 1, 0, 0, 0, 0])  # any=0 with a subtype
        + long_rows(IMAGE_B, [1, 0, 0, 0, 0, 0])  # any=0 with a subtype
        + long_rows(IMAGE_C, [0, 0, 0, 0, 0, 1])  # any=1 without one
        + long_rows("ID_000000001", [0, 0, 1, 0, 0, 1])  # consistent
    )
    expected = r"2 images have any=0 while a subtype is 1 .*1 images have any=1 but no subtype"
    with pytest.warns(LabelWarning, match=expected) as record:
        labels = read_labels(write_csv(tmp_path / "train.csv", rows))
    assert len(record) == 1
    assert labels.loc[IMAGE_A, "any"] == 0  # reported, not corrected


def test_consistent_labels_do_not_warn(three_images, recwarn):
    read_labels(three_images)
    assert not [w for w in recwarn if issubclass(w.category, LabelWarning)]


# ------------------------------------------------------------------------ ID helpers
@pytest.mark.parametrize("image_id", ["ID_a67b9a79e", "ID_000000000", "ID_fffffffff"])
def test_valid_image_ids(image_id):
    assert is_valid_image_id(image_id)
    assert check_image_id(image_id) == image_id


@pytest.mark.parametrize(
    "image_id",
    [
        "ID_../etc", "ID_a67b9a79e\n", "ID_A67B9A79E", "ID_a67b9a79", "ID_a67b9a79e0", "a67b9a79e",
        "ID_a67b9a79e/", "", None, 12, b"ID_a67b9a79e",
    ],
)
def test_invalid_image_ids(image_id):
    assert not is_valid_image_id(image_id)
    with pytest.raises(ValueError, match="invalid image ID"):
        check_image_id(image_id)


def test_parse_row_ids_splits_and_reports_source():
    parsed = parse_row_ids([f"{IMAGE_B}_any", f"{IMAGE_A}_epidural", f"{IMAGE_B}_subdural"])
    assert parsed.image_ids.tolist() == [IMAGE_B, IMAGE_A]
    assert parsed.image_index.tolist() == [0, 1, 0]
    assert parsed.subtype_index.tolist() == [5, 0, 4]
    with pytest.raises(LabelError, match=r"^my ids: 1 rows with a malformed ID: line 3: 'ID_x_any'"):
        parse_row_ids([f"{IMAGE_A}_any", "ID_x_any"], source="my ids")


def test_parse_row_ids_on_a_sliced_arrow_array():
    ids = pa.array(["junk", f"{IMAGE_C}_subarachnoid", f"{IMAGE_A}_intraparenchymal"]).slice(1)
    parsed = parse_row_ids(ids)
    assert parsed.image_ids.tolist() == [IMAGE_C, IMAGE_A]
    assert parsed.subtype_index.tolist() == [3, 1]


def test_vectorised_id_check_agrees_with_the_pattern_on_every_one_byte_edit():
    # The vectorised check cuts IDs at fixed offsets; this pins it to the written-down rule
    # (ID_PATTERN plus a known subtype) for every substitution, deletion and insertion.
    full_row_id = re.compile(rf"{ID_PATTERN.pattern[1:-1]}_({'|'.join(LABELS)})".encode())
    row_ids = []
    for base in ("ID_a67b9a79e_subdural", "ID_0f9a8b7c6_any", "ID_123456789_intraparenchymal"):
        for pos in range(len(base) + 1):
            head, rest = base[:pos].encode(), base[pos:].encode()
            row_ids += [head + bytes([byte]) + rest[1:] for byte in range(256) if rest]
            row_ids += [head + rest[1:], head + b"x" + rest]
    _, keys, subtypes = labels_module._split_row_ids(pa.array(row_ids, pa.binary()))
    expected = np.array([full_row_id.fullmatch(row_id) is not None for row_id in row_ids])
    assert expected.sum() > 3 * 16  # the hex substitutions of each base are valid
    np.testing.assert_array_equal(keys >= 0, expected)
    valid = [row_id.decode() for row_id in np.array(row_ids, dtype=object)[expected]]
    parsed = parse_row_ids(valid)
    assert parsed.image_ids[parsed.image_index].tolist() == [row_id[:12] for row_id in valid]
    assert [LABELS[k] for k in parsed.subtype_index] == [row_id[13:] for row_id in valid]


# ------------------------------------------------------------------------------ report
def test_label_report_closed_form(three_images):
    report = label_report(read_labels(three_images))
    assert list(report.columns) == ["section", "name", "count", "share"]
    assert report["section"].unique().tolist() == ["images", "positives", "subtypes_per_image", "co_occurrence"]
    table = report.set_index(["section", "name"])
    assert table.loc[("images", "total"), "count"] == 3
    assert [table.loc[("positives", name), "count"] for name in LABELS] == [1, 1, 0, 1, 1, 2]
    assert table.loc[("positives", "any"), "share"] == pytest.approx(2 / 3)
    assert [table.loc[("subtypes_per_image", str(k)), "count"] for k in range(6)] == [1, 1, 0, 1, 0, 0]
    co = table.xs("co_occurrence")["count"]
    assert len(co) == 10
    assert co["intraparenchymal&subarachnoid"] == 1 and co["subarachnoid&subdural"] == 1
    assert co["epidural&subdural"] == 0
    assert co.sum() == 3  # only image A has more than one subtype: 3 pairs


def test_label_report_round_trips_through_csv(three_images, tmp_path):
    report = label_report(read_labels(three_images))
    report.to_csv(tmp_path / "label_report.csv", index=False)
    again = pd.read_csv(tmp_path / "label_report.csv", dtype={"name": str})
    pd.testing.assert_frame_equal(again, report, check_dtype=False)


def test_format_label_report_lists_every_class(three_images):
    text = format_label_report(label_report(read_labels(three_images)))
    assert text.splitlines()[0] == "labels: 3 images"
    for name in LABELS:
        assert name in text
    assert "66.67%" in text  # any: 2 of 3


def test_label_report_rejects_bad_tables():
    good = pd.DataFrame([[0, 1, 0, 0, 0, 1]], columns=list(LABELS))
    with pytest.raises(ValueError, match="expected label columns"):
        label_report(good[list(reversed(LABELS))])
    with pytest.raises(ValueError, match="0 or 1"):
        label_report(good.replace(1, 2))
    with pytest.raises(TypeError):
        label_report(good.to_numpy())
