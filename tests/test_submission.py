"""utils.submission: building, validating and atomically writing Kaggle's submission file."""
import errno
import gzip

import numpy as np
import pandas as pd
import pytest

from utils import submission as submission_module
from utils.labels import LABELS
from utils.submission import (
    FLOAT_FORMAT,
    PROB_MAX,
    PROB_MIN,
    SubmissionError,
    build_submission,
    check_submission_file,
    read_sample_submission,
    validate_submission,
    write_submission,
)

IMAGES = [f"ID_{i:09x}" for i in (0xA1, 0xB2, 0xC3, 0xD4)]


def sample_rows(images):
    return [f"{image}_{name}" for image in images for name in LABELS]


@pytest.fixture
def sample_csv(tmp_path):
    path = tmp_path / "stage_2_sample_submission.csv"
    path.write_text("ID,Label\n" + "".join(f"{row_id},0.5\n" for row_id in sample_rows(IMAGES)))
    return path


def distinct_probs(n):
    """Every cell different, so a row landing in the wrong place is visible."""
    return (np.arange(n * 6, dtype=float).reshape(n, 6) + 1) / (n * 6 + 2)


def valid_submission(sample_csv):
    return build_submission(sample_csv, IMAGES, distinct_probs(len(IMAGES)))


# ----------------------------------------------------------------------- sample file
def test_real_sample_submission(rsna_sample):
    sample = read_sample_submission(rsna_sample / "stage_2_sample_submission.csv")
    assert len(sample.row_ids) == 30
    assert sample.row_ids[0] == "ID_000000e27_epidural"
    assert sample.row_ids[5] == "ID_000000e27_any"
    expected = ["ID_000000e27", "ID_000bf8860", "ID_000009146", "ID_000176f2a", "ID_000a50137"]
    assert sample.image_ids.tolist() == expected
    assert sample.subtype_index.tolist() == list(range(6)) * 5
    assert sample.image_index.tolist() == [i for i in range(5) for _ in range(6)]


def test_real_sample_build_write_check(rsna_sample, tmp_path):
    sample_path = rsna_sample / "stage_2_sample_submission.csv"
    image_ids = read_sample_submission(sample_path).image_ids
    df = build_submission(sample_path, list(image_ids)[::-1], np.full((5, 6), 0.25))
    assert df["ID"].tolist() == pd.read_csv(sample_path)["ID"].tolist()
    out = write_submission(df, tmp_path / "submission.csv", sample_path)
    assert check_submission_file(out, sample_path) == []
    assert check_submission_file(sample_path, sample_path) == []  # the sample itself is valid


@pytest.mark.parametrize(
    "text, message",
    [
        ("id,label\nID_0000000a1_any,0.5\n", r"line 1: expected the header 'ID,Label'"),
        (
            "ID,Label\nID_0000000a1_any,0.5\nID_0000000a1_anyy,0.5\n",
            r"line 3: 'ID_0000000a1_anyy' \(unknown subtype suffix",
        ),
        ("ID,Label\nID_0000000a1_any,0.5\nID_../x_any,0.5\n", r"line 3: 'ID_\.\./x_any'"),
        ("ID,Label\nID_0000000a1_any,0.5\nID_0000000a1_any,0.5\n", r"1 repeated row IDs: line 3: ID_0000000a1_any"),
        ("ID,Label\n", "no rows"),
    ],
)
def test_bad_sample_submission_names_file_and_line(tmp_path, text, message):
    path = tmp_path / "sample.csv"
    path.write_text(text)
    with pytest.raises(SubmissionError, match=rf"sample\.csv.*{message}"):
        read_sample_submission(path)


# ------------------------------------------------------------------------------ build
def test_rows_follow_the_sample_whatever_the_prediction_order(sample_csv):
    probs = distinct_probs(4)
    order = [2, 0, 3, 1]
    df = build_submission(sample_csv, [IMAGES[i] for i in order], probs[order])
    assert list(df.columns) == ["ID", "Label"]
    assert pd.api.types.is_string_dtype(df["ID"]) and df["Label"].dtype == np.float64
    assert df["ID"].tolist() == sample_rows(IMAGES)
    np.testing.assert_array_equal(df["Label"].to_numpy(), probs.ravel())
    assert df.attrs["filled_images"] == 0


def test_probabilities_are_clipped(sample_csv):
    probs = np.zeros((4, 6))
    probs[:, 5] = 1.0
    probs[0, 0] = 0.3
    df = build_submission(sample_csv, IMAGES, probs)
    values = df["Label"].to_numpy().reshape(4, 6)
    assert values[0, 0] == 0.3
    assert values[1, 0] == PROB_MIN == 1e-6
    assert (values[:, 5] == PROB_MAX).all() and PROB_MAX == 1 - 1e-6


def test_missing_images_are_an_error_listing_them(sample_csv):
    with pytest.raises(SubmissionError, match=r"2 sample images have no prediction .*: ID_0000000b2, ID_0000000d4$"):
        build_submission(sample_csv, [IMAGES[0], IMAGES[2]], distinct_probs(2))


def test_fill_covers_missing_images_and_is_counted(sample_csv):
    fill = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.14])
    probs = distinct_probs(2)
    df = build_submission(sample_csv, [IMAGES[3], IMAGES[1]], probs, fill=fill)
    values = df["Label"].to_numpy().reshape(4, 6)
    np.testing.assert_array_equal(values[0], fill)
    np.testing.assert_array_equal(values[2], fill)
    np.testing.assert_array_equal(values[3], probs[0])
    np.testing.assert_array_equal(values[1], probs[1])
    assert df.attrs["filled_images"] == 2


def test_extra_predictions_are_ignored(sample_csv):
    df = build_submission(sample_csv, IMAGES + ["ID_000000fff"], distinct_probs(5))
    assert df["ID"].tolist() == sample_rows(IMAGES)


@pytest.mark.parametrize(
    "image_ids, probs, fill, error, message",
    [
        (IMAGES, distinct_probs(3), None, ValueError, "probs has 3 rows but there are 4 image_ids"),
        (IMAGES, np.full((4, 5), 0.5), None, ValueError, r"shape \(n, 6\)"),
        (IMAGES, np.full((4, 6), np.nan), None, ValueError, "NaN"),
        (IMAGES, np.full((4, 6), 1.5), None, ValueError, r"outside \[0, 1\]"),
        (IMAGES[:3] + ["ID_../../x"], distinct_probs(4), None, ValueError, "invalid image ID 'ID_../../x'"),
        (IMAGES[:3] + [IMAGES[0]], distinct_probs(4), None, ValueError, "1 image IDs appear more than once: ID_0000000a1"),
        (IMAGES[:2], distinct_probs(2), [0.5] * 5, ValueError, r"fill must have shape \(6,\)"),
        (IMAGES[:2], distinct_probs(2), [np.nan] * 6, ValueError, "fill has 6 NaN"),
        ("ID_0000000a1", distinct_probs(1), None, TypeError, "single string"),
    ],
)
def test_build_rejects_bad_input(sample_csv, image_ids, probs, fill, error, message):
    with pytest.raises(error, match=message):
        build_submission(sample_csv, image_ids, probs, fill=fill)


# --------------------------------------------------------------------------- validate
def test_valid_submission_has_no_problems(sample_csv):
    assert validate_submission(valid_submission(sample_csv), sample_csv) == []


def test_row_order_does_not_matter(sample_csv):
    shuffled = valid_submission(sample_csv).sample(frac=1, random_state=0)
    assert validate_submission(shuffled, sample_csv) == []


def test_every_kind_of_problem_is_reported_with_ids(sample_csv):
    df = valid_submission(sample_csv)
    df = df[df["ID"] != f"{IMAGES[1]}_any"]  # missing
    extra = pd.DataFrame({"ID": ["ID_0000000ff_any"], "Label": [0.5]})
    df = pd.concat([df, df.iloc[[0]], extra], ignore_index=True)
    df.loc[2, "Label"] = np.nan
    df.loc[3, "Label"] = np.inf
    df.loc[4, "Label"] = -0.1
    df.loc[6, "Label"] = 1.0000001
    problems = validate_submission(df, sample_csv)
    assert problems == [
        f"1 IDs appear more than once: {IMAGES[0]}_epidural (2 times)",
        f"1 sample IDs are missing: {IMAGES[1]}_any",
        "1 IDs are not in the sample submission: ID_0000000ff_any",
        f"2 rows have a Label that is not a finite number: {IMAGES[0]}_intraventricular, {IMAGES[0]}_subarachnoid",
        f"2 rows have a Label outside [0, 1]: {IMAGES[0]}_subdural=-0.1, {IMAGES[1]}_epidural=1",
    ]


def test_long_lists_are_cut_to_a_few_and_the_count(sample_csv):
    df = valid_submission(sample_csv).iloc[:10]
    [problem] = validate_submission(df, sample_csv)
    first_three = f"{IMAGES[1]}_subdural, {IMAGES[1]}_any, {IMAGES[2]}_epidural"
    assert problem.startswith(f"14 sample IDs are missing: {first_three}, ")
    assert problem.endswith(" and 9 more")


def test_wrong_columns(sample_csv):
    df = valid_submission(sample_csv).rename(columns={"Label": "label"})
    assert validate_submission(df, sample_csv) == ["columns are ['ID', 'label'], expected ID,Label"]


def test_missing_ids_and_text_labels_are_problems_not_crashes(sample_csv):
    df = valid_submission(sample_csv).astype({"Label": object})
    df.loc[0, "ID"] = None
    df.loc[1, "Label"] = "high"
    problems = validate_submission(df, sample_csv)
    assert "1 rows have no ID (rows 0)" in problems
    assert f"1 sample IDs are missing: {IMAGES[0]}_epidural" in problems
    assert f"1 rows have a Label that is not a finite number: {IMAGES[0]}_intraparenchymal" in problems


# ------------------------------------------------------------------------------ write
def test_write_round_trips_values(sample_csv, tmp_path):
    probs = distinct_probs(4)
    probs[0, 0], probs[0, 1] = 0.0, 1.0  # become the clip bounds
    probs[1] = np.float32([0.1, 0.2, 0.3, 0.123456789, 0.987654321, 1 / 3])
    df = build_submission(sample_csv, IMAGES, probs)
    path = write_submission(df, tmp_path / "submission.csv", sample_csv)
    text = path.read_text()
    assert text.startswith("ID,Label\nID_0000000a1_epidural,1e-06\nID_0000000a1_intraparenchymal,0.999999\n")
    back = pd.read_csv(path)
    assert back["ID"].tolist() == df["ID"].tolist()
    np.testing.assert_allclose(back["Label"], df["Label"], rtol=1e-8, atol=0)
    assert back["Label"][0] == PROB_MIN and back["Label"][1] == PROB_MAX
    np.testing.assert_array_equal(back["Label"][6:12].astype(np.float32), probs[1].astype(np.float32))
    assert FLOAT_FORMAT == "%.9g"


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64])
def test_written_bytes_are_pandas_float_format(sample_csv, tmp_path, dtype):
    """The Arrow writer prints what pandas' to_csv(float_format=FLOAT_FORMAT) printed."""
    df = valid_submission(sample_csv)
    edge = [0.0, 1.0, PROB_MIN, PROB_MAX, 0.5, 1 / 3, 0.123456789, 5e-324, 1e-300, 2 / 3]
    values = np.resize(edge, len(df)) if dtype != np.int64 else np.arange(len(df)) % 2
    df["Label"] = values.astype(dtype)
    path = write_submission(df, tmp_path / "submission.csv", sample_csv)
    expected = df.to_csv(index=False, float_format=FLOAT_FORMAT, lineterminator="\n")
    assert path.read_text() == expected


def test_id_membership_in_arrow_matches_pandas():
    sample = pd.Index(sample_rows(IMAGES), dtype="str")
    chunked = pd.Index(pd.concat([pd.Series(sample[:5]), pd.Series(["ID_0000000ff_any"], dtype="str")]))
    for values, allowed in [(sample, chunked), (chunked, sample), (sample, sample[:0]), (sample[:0], sample)]:
        expected = np.array([value in set(allowed) for value in values], dtype=bool)
        np.testing.assert_array_equal(submission_module._isin(values, allowed), expected)


def test_gzip_round_trip(sample_csv, tmp_path):
    df = valid_submission(sample_csv)
    path = write_submission(df, tmp_path / "submission.csv.gz", sample_csv)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    back = pd.read_csv(gzip.open(path))
    assert back["ID"].tolist() == df["ID"].tolist()
    np.testing.assert_allclose(back["Label"], df["Label"], rtol=1e-8)
    assert check_submission_file(path, sample_csv) == []
    header = path.read_bytes()[:10]
    assert header[4:8] == b"\0\0\0\0" and not header[3] & 0x08  # no timestamp, no temp file name
    again = write_submission(df, tmp_path / "again.csv.gz", sample_csv)
    assert again.read_bytes() == path.read_bytes()


def test_invalid_submission_is_not_written(sample_csv, tmp_path):
    target = tmp_path / "submission.csv"
    with pytest.raises(SubmissionError, match=r"submission not written:\n  1 sample IDs are missing"):
        write_submission(valid_submission(sample_csv).iloc[1:], target, sample_csv)
    assert sorted(p.name for p in tmp_path.iterdir()) == [sample_csv.name]


def test_failed_write_keeps_previous_file_and_leaves_no_temp(sample_csv, tmp_path, monkeypatch):
    target = tmp_path / "submission.csv"
    target.write_text("previous contents\n")

    def disk_full(submission, fh):
        fh.write(b"ID,Label\nID_0000000a1_epi")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(submission_module, "_write_csv", disk_full)
    with pytest.raises(OSError) as info:
        write_submission(valid_submission(sample_csv), target, sample_csv)
    assert info.value.errno == errno.ENOSPC
    assert target.read_text() == "previous contents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([sample_csv.name, target.name])


def test_write_replaces_previous_file(sample_csv, tmp_path):
    target = tmp_path / "submission.csv"
    target.write_text("previous contents\n")
    write_submission(valid_submission(sample_csv), target, sample_csv)
    assert target.read_text().startswith("ID,Label\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([sample_csv.name, target.name])


# ------------------------------------------------------------------------------ check
@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file"),
        (b"\x00\x01garbage\xff\n", "expected the header"),
        (b"ID,Label\nID_0000000a1_epidural,0.5,0.5\n", "line 2: expected 2 fields, found 3"),
        (b"\x1f\x8bnot really gzip", "cannot read the submission"),
    ],
)
def test_unparsable_file_is_a_problem_not_a_traceback(sample_csv, tmp_path, content, message):
    path = tmp_path / "submission.csv"
    path.write_bytes(content)
    problems = check_submission_file(path, sample_csv)
    assert len(problems) == 1 and message in problems[0]


def test_check_file_reports_values_and_missing_rows(sample_csv, tmp_path):
    rows = [f"{row_id},0.5" for row_id in sample_rows(IMAGES)]
    rows[0] = f"{IMAGES[0]}_epidural,abc"
    rows[1] = f"{IMAGES[0]}_intraparenchymal,"
    path = tmp_path / "submission.csv"
    path.write_text("ID,Label\n" + "\n".join(rows[:-1]) + "\n")
    assert check_submission_file(path, sample_csv) == [
        f"1 sample IDs are missing: {IMAGES[3]}_any",
        f"2 rows have a Label that is not a finite number: {IMAGES[0]}_epidural, {IMAGES[0]}_intraparenchymal",
    ]


def test_check_file_missing_and_wrong_extension(sample_csv, tmp_path):
    assert check_submission_file(tmp_path / "nope.csv", sample_csv) == [f"{tmp_path / 'nope.csv'}: no such file"]
    path = write_submission(valid_submission(sample_csv), tmp_path / "submission.txt", sample_csv)
    problems = check_submission_file(path, sample_csv)
    assert problems == [f"{path}: expected a file ending in .csv or .csv.gz"]
