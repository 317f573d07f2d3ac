"""Kaggle's long label CSV (`ID,Label`, one row per image and subtype) to a wide table, and its report.

    from utils.labels import read_labels, label_report, format_label_report
    labels = read_labels("stage_2_train.csv")      # index image_id, six int8 columns
    print(format_label_report(label_report(labels)))
"""
import csv
import gzip
import logging
import re
import warnings
from itertools import combinations
from os import PathLike
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

logger = logging.getLogger(__name__)

LABELS = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
ANY = LABELS.index("any")
SUBTYPES = LABELS[:ANY]  # `any` comes last, so the subtypes are a prefix
HEADER = ("ID", "Label")
REPORT_COLUMNS = ("section", "name", "count", "share")

# Image IDs become file paths, so only a whole ID is valid (no '/', '..'): fullmatch, as `re`'s `$` allows a final "\n".
_IMAGE_ID = r"ID_[0-9a-f]{9}"
_IMAGE_ID_LEN = len("ID_") + 9
ID_PATTERN = re.compile(rf"^{_IMAGE_ID}$")
_ROW_ID_PATTERN = rf"^{_IMAGE_ID}_({'|'.join(LABELS)})$"  # for Arrow's RE2, whose `$` is only the very end
_LABEL_VALUES = pa.array([b"0", b"1"])  # a label's position in this list is its value
_FIRST_DATA_LINE = 2  # errors number lines as an editor does: line 1 is the header
_MAX_EXAMPLES = 5  # rows quoted in an error; the count says how many more


class LabelError(ValueError):
    """A label (or sample-submission) file that does not have Kaggle's layout."""


class LabelWarning(UserWarning):
    """Labels that parse but look inconsistent (e.g. `any` disagreeing with the subtypes)."""


class RowIds(NamedTuple):
    """Kaggle row IDs (`ID_<image>_<subtype>`) split into their two parts."""
    image_ids: pd.Index  # unique image IDs, in order of first appearance
    image_index: np.ndarray  # (n_rows,) int64 position of each row's image in image_ids
    subtype_index: np.ndarray  # (n_rows,) int8 position of each row's subtype in LABELS


def is_valid_image_id(image_id: object) -> bool:
    """Whether `image_id` is a whole dataset image ID: 'ID_' and 9 lowercase hex digits."""
    return isinstance(image_id, str) and ID_PATTERN.fullmatch(image_id) is not None


def check_image_id(image_id: object) -> str:
    """Return `image_id` unchanged, or raise ValueError if it is not a valid image ID."""
    if not is_valid_image_id(image_id):
        expected = f"'ID_' followed by 9 lowercase hex digits (pattern {ID_PATTERN.pattern})"
        raise ValueError(f"invalid image ID {image_id!r}: expected {expected}")
    return image_id


def read_id_label_csv(path: str | PathLike) -> pa.Table:
    """Read a Kaggle `ID,Label` file (plain or gzip) into two binary columns: callers decide what is valid.

    Row i is line i + 2 of the file: blank lines stay as empty rows (reported, not skipped), except trailing ones.
    """
    path = Path(path)
    with open(path, "rb") as fh:  # sniff the content, not the name: Kaggle downloads arrive both ways
        gzipped = fh.read(2) == b"\x1f\x8b"
    parse = pacsv.ParseOptions(ignore_empty_lines=False)
    convert = pacsv.ConvertOptions(column_types={name: pa.binary() for name in HEADER})  # never null, by default
    try:
        with pa.input_stream(str(path), compression="gzip" if gzipped else None) as stream:
            table = pacsv.read_csv(stream, parse_options=parse, convert_options=convert)
        names = table.column_names
    except (pa.ArrowInvalid, UnicodeDecodeError) as err:  # the latter: a header that is not UTF-8
        raise LabelError(f"{path}: {_describe_parse_error(path, gzipped, err)}") from None
    if names != list(HEADER):
        raise LabelError(f"{path}: line 1: expected the header {','.join(HEADER)!r}, found {','.join(names)!r}")
    n = table.num_rows
    while n and table["ID"][n - 1].as_py() == b"" and table["Label"][n - 1].as_py() == b"":
        n -= 1
    return table.slice(0, n)


def read_labels(path: str | PathLike) -> pd.DataFrame:
    """Read Kaggle's `stage_2_train.csv` into one row per image: index `image_id` (order of first appearance).

    Six int8 columns in LABELS order. Identical repeated rows are dropped, logged, and counted in
    `df.attrs["duplicates_dropped"]`. Raises LabelError naming the file and lines for a bad header, a malformed or
    unsafe ID, an unknown subtype, a label other than 0/1, conflicting repeats, or an image without all six subtypes.
    Warns (LabelWarning) when `any` disagrees with the subtypes.
    """
    path = Path(path)
    table = read_id_label_csv(path)
    if table.num_rows == 0:
        raise LabelError(f"{path}: no label rows after the header")
    image_ids, image_index, subtype = _split_row_ids(table["ID"])
    label = pc.index_in(table["Label"], value_set=_LABEL_VALUES).fill_null(-1).to_numpy().astype(np.int8)
    problems = _bad_rows(table["ID"], image_index < 0, "a malformed ID", _why_bad_id)
    problems += _bad_rows(table["Label"], label < 0, "a Label other than 0 or 1")
    if not problems:
        key = image_index * len(LABELS) + subtype  # the row's cell in the flattened wide table
        wide = np.zeros(len(image_ids) * len(LABELS), dtype=np.int8)
        wide[key] = label  # a repeated cell keeps one of its labels; _repeated_or_missing checks they agree
        problems = _repeated_or_missing(key, label, wide, image_ids)
    if problems:
        raise LabelError("\n".join(f"{path}: {problem}" for problem in problems))
    labels = pd.DataFrame(wide.reshape(-1, len(LABELS)), index=image_ids, columns=list(LABELS))
    duplicates = len(key) - wide.size
    if duplicates:
        logger.info("%s: dropped %d identical repeated rows", path, duplicates)
    labels.attrs["duplicates_dropped"] = duplicates
    _warn_any_mismatch(labels, path)
    return labels


def parse_row_ids(row_ids, *, source: str | PathLike = "row IDs") -> RowIds:
    """Split Kaggle row IDs (`ID_<9 hex>_<subtype>`): a pyarrow string/binary column or a sequence of str.

    `source` names them in errors, which give file-style line numbers (row i is line i + 2).
    """
    if isinstance(row_ids, (str, bytes)):
        raise TypeError("expected a column of row IDs, got a single string")
    if not isinstance(row_ids, (pa.Array, pa.ChunkedArray)):
        row_ids = pa.array(list(row_ids), type=pa.string())
    parsed = _split_row_ids(row_ids)
    problems = _bad_rows(row_ids, parsed.image_index < 0, "a malformed ID", _why_bad_id)
    if problems:
        raise LabelError(f"{source}: {problems[0]}")
    return parsed


def _split_row_ids(row_ids: pa.Array | pa.ChunkedArray) -> RowIds:
    """parse_row_ids without the check: both indexes are -1 for a malformed row ID."""
    if row_ids.type not in (pa.string(), pa.binary(), pa.large_string(), pa.large_binary()):
        raise TypeError(f"expected a string or binary column, got {row_ids.type}")
    row_ids = row_ids.cast(pa.binary())  # a malformed ID need not be UTF-8
    # In a whole match, the image ID is the first 12 bytes and the subtype follows them and a '_'.
    whole = pc.match_substring_regex(row_ids, _ROW_ID_PATTERN).fill_null(False)
    suffix = pc.binary_replace_slice(row_ids, 0, _IMAGE_ID_LEN + 1, b"")
    subtype = pc.if_else(whole, pc.index_in(suffix, value_set=pa.array(LABELS, pa.binary())), -1)
    image = pc.if_else(whole, pc.binary_slice(row_ids, 0, _IMAGE_ID_LEN), None)
    image_index, image_ids = pd.factorize(pd.array(image, dtype=pd.ArrowDtype(pa.string())))  # null: -1
    image_ids = pd.Index(image_ids, dtype="str", name="image_id")
    return RowIds(image_ids, image_index.astype(np.int64, copy=False), subtype.to_numpy().astype(np.int8))


def _describe_parse_error(path: Path, gzipped: bool, err: Exception) -> str:
    # pyarrow's parse errors name no line, so the slow reader finds it; it only runs on a broken file.
    number = 0
    try:
        opener = gzip.open if gzipped else open
        with opener(path, "rt", encoding="utf-8-sig", errors="backslashreplace", newline="") as fh:
            for number, line in enumerate(fh, start=1):
                fields = next(csv.reader([line.rstrip("\r\n")]), [])
                if number == 1 and fields != list(HEADER):
                    return f"line 1: expected the header {','.join(HEADER)!r}, found {line.rstrip()!r}"
                if len(fields) != len(HEADER):
                    return f"line {number}: expected {len(HEADER)} fields, found {len(fields)}: {line.rstrip()!r}"
    except (OSError, EOFError, csv.Error) as scan_err:
        return f"cannot parse as CSV ({err}; {scan_err})"
    empty = f"line 1: empty file, expected the header {','.join(HEADER)!r}"
    return empty if number == 0 else f"cannot parse as CSV ({err})"


def format_examples(items, total: int | None = None) -> str:
    """The first few items for an error message, and how many more there are."""
    items = list(items)
    total = len(items) if total is None else total
    shown = ", ".join(str(item) for item in items[:_MAX_EXAMPLES])
    return shown + (f" and {total - _MAX_EXAMPLES} more" if total > _MAX_EXAMPLES else "")


def _why_bad_id(row_id: str) -> str:
    if not row_id:
        return "empty ID, e.g. a blank line"
    image, _, suffix = row_id.rpartition("_")
    if suffix not in LABELS:
        return f"unknown subtype suffix {suffix!r} (expected one of {', '.join(LABELS)})"
    if not is_valid_image_id(image):
        return f"image ID {image!r} is outside the dataset's pattern {_IMAGE_ID}"
    return "not of the form ID_<image>_<subtype>"


def _bad_rows(column: pa.Array | pa.ChunkedArray, bad: np.ndarray, what: str, why=None) -> list[str]:
    rows = np.flatnonzero(bad)
    shown = column.take(rows[:_MAX_EXAMPLES]).to_pylist() if rows.size else []  # take copies a chunked column
    items = []
    for row, raw in zip(rows, shown):
        text = "<missing>" if raw is None else raw if isinstance(raw, str) else raw.decode(errors="backslashreplace")
        items.append(f"line {row + _FIRST_DATA_LINE}: {text!r}" + (f" ({why(text)})" if why else ""))
    return _summary(len(rows), f"rows with {what}", items)


def _summary(total: int, what: str, items: list[str]) -> list[str]:
    """`<total> <what>: <a few items>` for an error, as a list of one; none if total is 0."""
    return [f"{total} {what}: {format_examples(items, total)}"] if total else []


def _repeated_or_missing(key: np.ndarray, label: np.ndarray, wide: np.ndarray, image_ids: pd.Index) -> list[str]:
    """Cells of the (flat) wide table given both 0 and 1, and images without all six subtypes."""
    conflicts = np.unique(key[wide[key] != label])
    present = np.bincount(key, minlength=wide.size).reshape(-1, len(LABELS)) > 0
    incomplete = np.flatnonzero(~present.all(axis=1))
    repeated, missing = [], []
    for k in conflicts[:_MAX_EXAMPLES]:
        lines = ", ".join(str(row + _FIRST_DATA_LINE) for row in np.flatnonzero(key == k))
        repeated.append(f"{image_ids[k // len(LABELS)]}_{LABELS[k % len(LABELS)]} (lines {lines})")
    for image in incomplete[:_MAX_EXAMPLES]:
        first_line = int(np.argmax(key // len(LABELS) == image)) + _FIRST_DATA_LINE
        absent = ", ".join(name for name, seen in zip(LABELS, present[image]) if not seen)
        missing.append(f"{image_ids[image]} (line {first_line}; missing {absent})")
    return (_summary(len(conflicts), "IDs are repeated with both labels 0 and 1", repeated)
            + _summary(len(incomplete), f"images have fewer than {len(LABELS)} subtype rows", missing))


def _warn_any_mismatch(labels: pd.DataFrame, source: str | Path) -> None:
    # Kaggle defines `any` as "some subtype is present"; a disagreement is a quirk worth seeing, not an error.
    values = labels.to_numpy().astype(bool)
    some_subtype, has_any = values[:, :ANY].any(axis=1), values[:, ANY]
    cases = {"any=0 while a subtype is 1": some_subtype & ~has_any, "any=1 but no subtype": has_any & ~some_subtype}
    parts = [f"{rows.sum()} images have {what} (e.g. {format_examples(labels.index[rows])})"
             for what, rows in cases.items() if rows.any()]
    if parts:
        warnings.warn(f"{source}: " + "; ".join(parts), LabelWarning, stacklevel=3)


def check_label_table(labels: pd.DataFrame) -> np.ndarray:
    """Validate a wide label table (columns LABELS in order, values 0/1); return its values."""
    if not isinstance(labels, pd.DataFrame):
        raise TypeError(f"expected a DataFrame of labels, got {type(labels).__name__}")
    if list(labels.columns) != list(LABELS):
        raise ValueError(f"expected label columns {list(LABELS)}, got {list(labels.columns)}")
    values = labels.to_numpy()
    if not np.isin(values, (0, 1)).all():
        raise ValueError("label values must all be 0 or 1")
    return values.astype(np.int64)


def label_report(labels: pd.DataFrame) -> pd.DataFrame:
    """One tidy table of label statistics, ready for `to_csv("label_report.csv")`.

    Columns `section,name,count,share` (share = count / images). Sections, in order: `images` (name `total`),
    `positives` (one row per label), `subtypes_per_image` (names "0".."5": images with that many positive subtypes,
    `any` not counted), and `co_occurrence` (names "a&b": images positive for both subtypes a and b).
    """
    values = check_label_table(labels)
    n, subtypes = len(values), values[:, :ANY]
    per_image = np.bincount(subtypes.sum(axis=1), minlength=len(SUBTYPES) + 1)
    both = subtypes.T @ subtypes
    rows = [("images", "total", n)] + [("positives", name, count) for name, count in zip(LABELS, values.sum(axis=0))]
    rows += [("subtypes_per_image", str(k), count) for k, count in enumerate(per_image)]
    rows += [("co_occurrence", f"{a}&{b}", both[i, j]) for (i, a), (j, b) in combinations(enumerate(SUBTYPES), 2)]
    report = pd.DataFrame(rows, columns=list(REPORT_COLUMNS[:3])).astype({"count": np.int64})
    report["share"] = report["count"] / n if n else np.nan
    return report


def format_label_report(report: pd.DataFrame) -> str:
    """A short printable summary of label_report's table."""
    if list(report.columns) != list(REPORT_COLUMNS):
        raise ValueError(f"expected label_report's columns {list(REPORT_COLUMNS)}, got {list(report.columns)}")
    sections = {name: list(zip(rows["name"], rows["count"], rows["share"]))
                for name, rows in report.groupby("section", sort=False)}
    width = max(len(name) for name in LABELS)
    lines = [f"labels: {int(sections['images'][0][1])} images", f"  {'class':<{width}} {'positives':>10} {'share':>8}"]
    lines += [f"  {name:<{width}} {count:>10} {share:>8.2%}" for name, count, share in sections["positives"]]
    per_image = "  ".join(f"{name}: {count}" for name, count, _ in sections["subtypes_per_image"])
    lines.append(f"  subtypes per image: {per_image}")
    pairs = sorted((pair for pair in sections["co_occurrence"] if pair[1] > 0), key=lambda pair: -pair[1])  # stable
    shown = "  ".join(f"{name}: {count}" for name, count, _ in pairs[:_MAX_EXAMPLES]) or "none"
    return "\n".join([*lines, f"  commonest subtype pairs (images with both): {shown}"])


def series_picks(probs: np.ndarray, series: np.ndarray, labels: np.ndarray, series_labels: pd.DataFrame) -> np.ndarray:
    """The series-level loss of a series labelled 1 for a class that none of its slices is
    known to show: (k, 2) int64 pairs (row, class), one per such series and class, the row
    being the series' slice of that class's largest probability among those whose label of
    it is unknown.

    A series labelled 1 says some slice shows the class; its loss -log(max over its slices
    of p) has the gradient of its maximum, which flows to that one slice: so that slice,
    labelled 1, gives the loss (with the model that picked it). A learned attention pooling
    was left out: one series-labelled scan is too little to learn where to look, and the
    maximum is the rule --predict and --evaluate call a series positive by. A series labelled
    0 needs no pick: each of its slices is a known 0 (utils.dataset).
    """
    probs, labels, series = np.asarray(probs), np.asarray(labels, dtype=np.float64), np.asarray(series)
    if probs.shape != labels.shape or probs.shape != (len(series), len(LABELS)):
        raise ValueError(f"probs {probs.shape} and labels {labels.shape} must be (n, {len(LABELS)}) "
                         f"with n = {len(series)} series keys")
    picks, rows_of = [], pd.Series(np.arange(len(series))).groupby(series).indices
    for key, row in series_labels.reindex(columns=list(LABELS)).iterrows():
        rows = rows_of.get(key, np.empty(0, dtype=np.int64))
        for c in np.flatnonzero(row.to_numpy() == 1):
            unknown = rows[np.isnan(labels[rows, c])]
            if len(unknown) and not (labels[rows, c] == 1).any():
                picks.append((unknown[np.argmax(probs[unknown, c])], c))
    return np.array(picks, dtype=np.int64).reshape(-1, 2)
