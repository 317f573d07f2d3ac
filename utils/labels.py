"""Kaggle's long label CSV (`ID,Label`, one row per image and subtype) to a wide table.

    from utils.labels import read_labels, label_report, format_label_report
    labels = read_labels("stage_2_train.csv")      # index image_id, six int8 columns
    print(format_label_report(label_report(labels)))

`stage_2_train.csv` has 4.5 million rows, so parsing works on the raw bytes of the
pyarrow columns with numpy instead of Python strings; every check is vectorised and only
the rows that fail one are turned back into strings, to name them in the error.
Line numbers in errors count the header as line 1, like an editor does.
"""
from __future__ import annotations

import csv
import gzip
import io
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
import pyarrow.csv as pacsv

logger = logging.getLogger(__name__)

LABELS = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
ANY = LABELS.index("any")
SUBTYPES = LABELS[:ANY]  # `any` comes last, so the subtypes are a prefix
HEADER = ("ID", "Label")

# Other modules build file paths from image IDs, so an ID is only ever accepted whole:
# no '/', '..' or anything else can reach a path. Use fullmatch: `$` alone also
# matches before a trailing newline.
ID_PATTERN = re.compile(r"^ID_[0-9a-f]{9}$")

_ID_PREFIX = b"ID_"
_HEX_DIGITS = 9
_IMAGE_ID_LEN = len(_ID_PREFIX) + _HEX_DIGITS  # 12: "ID_3a5b7c9d1"
_SUFFIX_START = _IMAGE_ID_LEN + 1  # past the '_' between image ID and subtype
_FIRST_DATA_LINE = 2  # line 1 is the header
_MAX_EXAMPLES = 5  # rows quoted in an error; the count says how many more
_GZIP_MAGIC = b"\x1f\x8b"
# Fewer, larger blocks than pyarrow's 1 MB default: less per-chunk overhead in the numpy
# passes, still enough blocks to keep every core busy on the 120 MB training file.
_CSV_BLOCK_BYTES = 8 << 20

# Parsing reads each ID as little-endian 8-byte words (byte k of a word is character k)
# and works on all eight characters of a word at once with integer arithmetic:
#   head = bytes 0-7:  "ID_" and hex digits 1-5
#   tail = bytes 8-15: hex digits 6-9, "_", and the subtype's first three characters
# The subtype itself is compared as two words read from its own start.
_WORD = "<u8"
_WORD_BYTES = 8
_ONES = np.uint64(0x0101010101010101)  # 1 in every byte
_LOW_NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)
_PREFIX_MASK = np.uint64(0xFFFFFF)  # the first three bytes
_HEAD_HEX = np.uint64(0xFFFFFFFFFF000000)  # bytes 3-7: hex digits 1-5
_TAIL_HEX = np.uint64(0x00000000FFFFFFFF)  # bytes 0-3: hex digits 6-9
_TAIL_UNDERSCORE_SHIFT = np.uint64(32)  # byte 4 of the tail
_BYTE = np.uint64(0xFF)
_HEAD_HEX_DIGITS = 5
_TAIL_HEX_DIGITS = 4
# Reads reach at most two words past a subtype's start; zeros there keep them in bounds.
_READ_PAD = _SUFFIX_START + 2 * _WORD_BYTES


def _as_word(raw: bytes) -> np.uint64:
    return np.uint64(int.from_bytes(raw.ljust(_WORD_BYTES, b"\0"), "little"))


def _suffix_words(name: str) -> tuple[int, np.uint64, np.uint64, np.uint64, np.uint64]:
    """(length, first word, its byte mask, second word, its byte mask) of a subtype name."""
    raw = name.encode()
    mask = b"\xff" * len(raw)
    return (
        len(raw),
        _as_word(raw[:_WORD_BYTES]),
        _as_word(mask[:_WORD_BYTES]),
        _as_word(raw[_WORD_BYTES:]),
        _as_word(mask[_WORD_BYTES:]),
    )


_PREFIX_WORD = _as_word(_ID_PREFIX)
_SUFFIX_WORDS = [_suffix_words(name) for name in LABELS]


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
        raise ValueError(
            f"invalid image ID {image_id!r}: expected 'ID_' followed by "
            f"{_HEX_DIGITS} lowercase hex digits (pattern {ID_PATTERN.pattern})"
        )
    return image_id


# ----------------------------------------------------------------------------- reading
def read_id_label_csv(path: str | PathLike) -> pa.Table:
    """Read a Kaggle `ID,Label` file (plain or gzip) into a table of two binary columns.

    Both columns stay raw bytes so each caller decides what a valid value is. Row i of
    the table is line i + 2 of the file: blank lines are kept as empty rows (so they are
    reported, not silently skipped), except trailing ones, which are dropped.
    """
    path = Path(path)
    try:
        with _open_arrow_input(path) as stream:
            table = _read_two_binary_columns(stream)
        names = table.column_names
    except (pa.ArrowInvalid, UnicodeDecodeError) as err:  # the latter: a header that is not UTF-8
        raise LabelError(f"{path}: {_describe_parse_error(path, err)}") from None
    if names != list(HEADER):
        found = ",".join(names)
        raise LabelError(f"{path}: line 1: expected the header {','.join(HEADER)!r}, found {found!r}")
    return _drop_trailing_blank_rows(table)


def _read_two_binary_columns(stream: pa.NativeFile) -> pa.Table:
    return pacsv.read_csv(
        stream,
        read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES),
        # Blank lines stay as rows so that row i is always line i + 2.
        parse_options=pacsv.ParseOptions(ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.binary() for name in HEADER},
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )


def read_labels(path: str | PathLike) -> pd.DataFrame:
    """Read Kaggle's `stage_2_train.csv` into one row per image.

    Returns a DataFrame indexed by `image_id` (order of first appearance in the file) with
    six int8 columns in LABELS order. Identical repeated rows are dropped, logged, and
    counted in `df.attrs["duplicates_dropped"]`. Raises LabelError naming the file and
    lines for a bad header, a malformed or unsafe ID, an unknown subtype, a label other
    than 0/1, conflicting repeats, or an image without all six subtypes. Warns
    (LabelWarning) when `any` disagrees with the subtypes.
    """
    path = Path(path)
    table = read_id_label_csv(path)
    if table.num_rows == 0:
        raise LabelError(f"{path}: no label rows after the header")
    image_key, subtype = _concat(_parse_id_chunk(chunk) for chunk in table["ID"].chunks)
    label = np.concatenate([_parse_label_chunk(chunk) for chunk in table["Label"].chunks])
    bad_id, bad_label = image_key < 0, label < 0
    if bad_id.any() or bad_label.any():
        raise LabelError(_row_problems(path, table, bad_id, bad_label))

    image_index, unique_keys = _factorize_by_runs(image_key)  # index in file order
    n_images = len(unique_keys)
    image_ids = _format_image_ids(unique_keys)
    key = image_index * len(LABELS) + subtype
    n_rows = np.bincount(key, minlength=n_images * len(LABELS))
    problems = []
    if n_rows.max() > 1:
        problems += _conflicting_duplicates(key, label, n_rows, image_ids)
    if n_rows.min() == 0:
        problems += _incomplete_images(n_rows, image_index, image_ids)
    if problems:
        raise LabelError("\n".join(f"{path}: {problem}" for problem in problems))

    wide = np.zeros(n_images * len(LABELS), dtype=np.int8)
    wide[key] = label  # repeats carry identical labels here, so write order is irrelevant
    labels = pd.DataFrame(wide.reshape(n_images, len(LABELS)), index=image_ids, columns=list(LABELS))
    duplicates = int(len(key) - n_images * len(LABELS))
    if duplicates:
        logger.info("%s: dropped %d identical repeated rows", path, duplicates)
    labels.attrs["duplicates_dropped"] = duplicates
    _warn_any_mismatch(labels, path)
    return labels


def parse_row_ids(row_ids, *, source: str | PathLike = "row IDs") -> RowIds:
    """Split Kaggle row IDs (`ID_<9 hex>_<subtype>`) into image IDs and subtype positions.

    `row_ids` is a pyarrow string or binary column (such as read_id_label_csv's "ID") or
    a sequence of str; `source` names it in errors, which give file-style line numbers
    (row i is line i + 2).
    """
    if isinstance(row_ids, (str, bytes)):
        raise TypeError("expected a column of row IDs, got a single string")
    if isinstance(row_ids, pa.Array):
        row_ids = pa.chunked_array([row_ids])
    elif not isinstance(row_ids, pa.ChunkedArray):
        row_ids = pa.chunked_array([pa.array(list(row_ids), type=pa.string())])
    image_key, subtype = _concat(_parse_id_chunk(chunk) for chunk in row_ids.chunks)
    bad = image_key < 0
    if bad.any():
        raise LabelError(_id_problems(source, row_ids, bad))
    image_index, unique_keys = _factorize_by_runs(image_key)
    return RowIds(_format_image_ids(unique_keys), image_index.astype(np.int64, copy=False), subtype)


def _open_arrow_input(path: Path) -> pa.NativeFile:
    # Sniff the content rather than trust the name: Kaggle downloads arrive both ways.
    with open(path, "rb") as fh:
        gzipped = fh.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC
    return pa.input_stream(str(path), compression="gzip" if gzipped else None)


def _open_text(path: Path) -> io.TextIOBase:
    with open(path, "rb") as fh:
        gzipped = fh.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="backslashreplace", newline="")
    return open(path, encoding="utf-8-sig", errors="backslashreplace", newline="")


def _describe_parse_error(path: Path, err: Exception) -> str:
    # pyarrow's parse errors give the offending text but no line number, so find the
    # line with the slow reader; this only runs once the file is known to be broken.
    number = 0
    try:
        with _open_text(path) as fh:
            for number, line in enumerate(fh, start=1):
                fields = next(csv.reader([line.rstrip("\r\n")]), [])
                if number == 1 and fields != list(HEADER):
                    return f"line 1: expected the header {','.join(HEADER)!r}, found {line.rstrip()!r}"
                if len(fields) != len(HEADER):
                    found = f"found {len(fields)}: {line.rstrip()!r}"
                    return f"line {number}: expected {len(HEADER)} fields, {found}"
    except (OSError, EOFError, csv.Error) as scan_err:
        return f"cannot parse as CSV ({err}; {scan_err})"
    if number == 0:
        return f"line 1: empty file, expected the header {','.join(HEADER)!r}"
    return f"cannot parse as CSV ({err})"


def _drop_trailing_blank_rows(table: pa.Table) -> pa.Table:
    n = table.num_rows
    ids, labels = table["ID"], table["Label"]
    while n and ids[n - 1].as_py() == b"" and labels[n - 1].as_py() == b"":
        n -= 1
    return table.slice(0, n) if n < table.num_rows else table


# ------------------------------------------------------------------- vectorised parsing
def _binary_buffers(chunk: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, lengths, data bytes) of a string/binary array; nulls get length -1.

    The data is copied with zero padding so that a fixed-width read from any row start
    stays in bounds; bytes read past a row's end are never trusted, as lengths are checked.
    """
    if pa.types.is_large_string(chunk.type) or pa.types.is_large_binary(chunk.type):
        offset_type = np.int64
    elif pa.types.is_string(chunk.type) or pa.types.is_binary(chunk.type):
        offset_type = np.int32
    else:
        raise TypeError(f"expected a string or binary column, got {chunk.type}")
    _, offsets_buf, data_buf = chunk.buffers()
    itemsize = np.dtype(offset_type).itemsize
    offsets = np.frombuffer(offsets_buf, offset_type, count=len(chunk) + 1, offset=chunk.offset * itemsize)
    data = np.zeros(offsets[-1] + _READ_PAD, dtype=np.uint8)
    if data_buf is not None:
        data[: offsets[-1]] = np.frombuffer(data_buf, dtype=np.uint8, count=offsets[-1])
    starts = offsets[:-1].astype(np.int64)
    lengths = np.diff(offsets).astype(np.int64)
    if chunk.null_count:
        lengths[chunk.is_null().to_numpy(zero_copy_only=False)] = -1
    return starts, lengths, data


def _words(data: np.ndarray) -> np.ndarray:
    """Read-only view whose element i is data[i : i + 8] as one uint64: any offset, one index."""
    view = np.ndarray(shape=(len(data) - _WORD_BYTES + 1,), dtype=_WORD, buffer=data, strides=(1,))
    view.flags.writeable = False
    return view


def _hex_nibbles(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per byte of each word: its value as a hex digit, and a nonzero byte where it isn't one.

    '0'-'9' are 0x30-0x39 and 'a'-'f' 0x61-0x66, so the low four bits plus 9 for a
    letter (bit 6 set) give the value. A byte is a lowercase hex digit exactly when that
    value is below 16 and turns back into the same character.
    """
    nibbles = (words & _LOW_NIBBLES) + np.uint64(9) * ((words >> np.uint64(6)) & _ONES)
    too_big = (nibbles + np.uint64(0x70) * _ONES) & (np.uint64(0x80) * _ONES)
    return nibbles, too_big | (_hex_chars(nibbles) ^ words)


def _hex_chars(nibbles: np.ndarray) -> np.ndarray:
    """Inverse of _hex_nibbles: one value (0-15) per byte to its character '0'-'9', 'a'-'f'."""
    letters = ((nibbles + np.uint64(6) * _ONES) >> np.uint64(4)) & _ONES  # 1 where value >= 10
    return nibbles + np.uint64(ord("0")) * _ONES + np.uint64(ord("a") - ord("9") - 1) * letters


def _parse_id_chunk(chunk: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Per row: an int64 key of the image ID, and the subtype's position in LABELS.

    Both are -1 for a row whose ID is not exactly `ID_<9 lowercase hex>_<subtype>`. The
    fixed width of the image part is what lets this read bytes at fixed offsets instead
    of splitting strings; any other shape is an error anyway, diagnosed by _id_problems.
    The key keeps the nine digit values one per nibble (see _format_image_ids).
    """
    starts, lengths, data = _binary_buffers(chunk)
    words = _words(data)
    head, tail = words[starts], words[starts + _WORD_BYTES]
    head_nibbles, head_bad = _hex_nibbles(head)
    tail_nibbles, tail_bad = _hex_nibbles(tail)
    # Only rows whose length fits "ID_<9 hex>_<subtype>" can match a subtype below, so the
    # bytes read past the end of a shorter row never decide anything.
    ok = (
        ((head & _PREFIX_MASK) == _PREFIX_WORD)
        & (((head_bad & _HEAD_HEX) | (tail_bad & _TAIL_HEX)) == 0)
        & (((tail >> _TAIL_UNDERSCORE_SHIFT) & _BYTE) == ord("_"))
    )
    subtype = np.full(len(chunk), -1, dtype=np.int8)
    suffix_length = lengths - _SUFFIX_START
    first, second = words[starts + _SUFFIX_START], words[starts + _SUFFIX_START + _WORD_BYTES]
    for code, (length, word1, mask1, word2, mask2) in enumerate(_SUFFIX_WORDS):
        same = (suffix_length == length) & ((first & mask1) == word1)
        if length > _WORD_BYTES:
            same &= (second & mask2) == word2
        np.copyto(subtype, code, where=same)
    ok &= subtype >= 0
    # Digits 1-5 in the low nibbles of bytes 0-4, digits 6-9 in the high nibbles of 0-3.
    head_digits = head_nibbles >> np.uint64(8 * len(_ID_PREFIX))
    key = (head_digits | ((tail_nibbles & _TAIL_HEX) << np.uint64(4))).astype(np.int64)
    key[~ok] = -1
    subtype[~ok] = -1
    return key, subtype


def _format_image_ids(keys: np.ndarray) -> pd.Index:
    """Image IDs back from _parse_id_chunk's keys, as one Arrow buffer (no Python strings)."""
    keys = keys.astype(np.uint64)
    n = len(keys)
    head_chars = _word_bytes(_hex_chars(keys & _LOW_NIBBLES))
    tail_chars = _word_bytes(_hex_chars((keys >> np.uint64(4)) & _LOW_NIBBLES))
    chars = np.empty((n, _IMAGE_ID_LEN), dtype=np.uint8)
    chars[:, : len(_ID_PREFIX)] = np.frombuffer(_ID_PREFIX, np.uint8)
    chars[:, len(_ID_PREFIX) : len(_ID_PREFIX) + _HEAD_HEX_DIGITS] = head_chars[:, :_HEAD_HEX_DIGITS]
    chars[:, len(_ID_PREFIX) + _HEAD_HEX_DIGITS :] = tail_chars[:, :_TAIL_HEX_DIGITS]
    offsets = np.arange(0, _IMAGE_ID_LEN * (n + 1), _IMAGE_ID_LEN, dtype=np.int32)
    strings = pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(chars))
    return pd.Index(strings, dtype="str", name="image_id")


def _word_bytes(words: np.ndarray) -> np.ndarray:
    """(n,) words to their (n, 8) bytes, character order (little-endian) on any machine."""
    return words.astype(_WORD).view(np.uint8).reshape(len(words), _WORD_BYTES)


def _factorize_by_runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pd.factorize (codes in order of first appearance), hashing each run of equal keys once.

    Kaggle lists an image's six rows together, so this hashes a sixth of the rows; any
    other order gives the same answer, just without the saving.
    """
    if len(keys) == 0:
        return np.zeros(0, np.int64), keys
    run_starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    run_codes, uniques = pd.factorize(keys[run_starts])
    return np.repeat(run_codes, np.diff(np.append(run_starts, len(keys)))), uniques


def _parse_label_chunk(chunk: pa.Array) -> np.ndarray:
    """Per row: 0 or 1 as int8, or -1 for anything but exactly '0' or '1'."""
    starts, lengths, data = _binary_buffers(chunk)
    first = data[starts]
    ok = (lengths == 1) & ((first == ord("0")) | (first == ord("1")))
    return np.where(ok, first.astype(np.int16) - ord("0"), -1).astype(np.int8)


def _concat(parts) -> tuple[np.ndarray, np.ndarray]:
    parts = list(parts)
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int8)
    return np.concatenate([value for value, _ in parts]), np.concatenate([code for _, code in parts])


# ------------------------------------------------------------------------- diagnostics
def format_examples(items, total: int | None = None) -> str:
    """The first few items for an error message, and how many more there are."""
    items = list(items)
    total = len(items) if total is None else total
    shown = ", ".join(str(item) for item in items[:_MAX_EXAMPLES])
    return shown + (f" and {total - _MAX_EXAMPLES} more" if total > _MAX_EXAMPLES else "")


def _decode(raw: bytes | str | None) -> str:
    if raw is None:
        return "<missing>"
    return raw if isinstance(raw, str) else raw.decode("utf-8", errors="backslashreplace")


def _why_bad_id(row_id: str) -> str:
    if not row_id:
        return "empty ID, e.g. a blank line"
    image, _, suffix = row_id.rpartition("_")
    if suffix not in LABELS:
        return f"unknown subtype suffix {suffix!r} (expected one of {', '.join(LABELS)})"
    if not is_valid_image_id(image):
        return f"image ID {image!r} is outside the dataset's pattern ID_[0-9a-f]{{{_HEX_DIGITS}}}"
    return "not of the form ID_<image>_<subtype>"


def _id_problems(source: str | Path, ids: pa.ChunkedArray, bad: np.ndarray) -> str:
    rows = np.flatnonzero(bad)
    shown = ids.take(pa.array(rows[:_MAX_EXAMPLES])).to_pylist()
    items = [
        f"line {row + _FIRST_DATA_LINE}: {_decode(raw)!r} ({_why_bad_id(_decode(raw))})"
        for row, raw in zip(rows, shown)
    ]
    return f"{source}: {len(rows)} rows with a malformed ID: {format_examples(items, len(rows))}"


def _row_problems(path: Path, table: pa.Table, bad_id: np.ndarray, bad_label: np.ndarray) -> str:
    problems = []
    if bad_id.any():
        problems.append(_id_problems(path, table["ID"], bad_id))
    if bad_label.any():
        rows = np.flatnonzero(bad_label)
        shown = table["Label"].take(pa.array(rows[:_MAX_EXAMPLES])).to_pylist()
        items = [f"line {row + _FIRST_DATA_LINE}: {_decode(raw)!r}" for row, raw in zip(rows, shown)]
        examples = format_examples(items, len(rows))
        problems.append(f"{path}: {len(rows)} rows with a Label other than 0 or 1: {examples}")
    return "\n".join(problems)


def _conflicting_duplicates(
    key: np.ndarray, label: np.ndarray, n_rows: np.ndarray, image_ids: pd.Index
) -> list[str]:
    n_positive = np.bincount(key, weights=label, minlength=len(n_rows))
    conflicts = np.flatnonzero((n_positive > 0) & (n_positive < n_rows))
    if not conflicts.size:
        return []
    items = []
    for k in conflicts[:_MAX_EXAMPLES]:
        lines = ", ".join(str(row + _FIRST_DATA_LINE) for row in np.flatnonzero(key == k))
        row_id = f"{image_ids[k // len(LABELS)]}_{LABELS[k % len(LABELS)]}"
        items.append(f"{row_id} (lines {lines})")
    return [f"{len(conflicts)} IDs are repeated with both labels 0 and 1: {format_examples(items, len(conflicts))}"]


def _incomplete_images(n_rows: np.ndarray, image_index: np.ndarray, image_ids: pd.Index) -> list[str]:
    present = n_rows.reshape(-1, len(LABELS)) > 0
    incomplete = np.flatnonzero(~present.all(axis=1))
    items = []
    for image in incomplete[:_MAX_EXAMPLES]:
        first_line = int(np.argmax(image_index == image)) + _FIRST_DATA_LINE
        missing = ", ".join(name for name, seen in zip(LABELS, present[image]) if not seen)
        items.append(f"{image_ids[image]} (line {first_line}; missing {missing})")
    return [
        f"{len(incomplete)} images have fewer than {len(LABELS)} subtype rows: "
        f"{format_examples(items, len(incomplete))}"
    ]


def _warn_any_mismatch(labels: pd.DataFrame, source: str | Path) -> None:
    # Kaggle defines `any` as "some subtype is present"; a disagreement is a labelling
    # quirk worth seeing, not a reason to refuse the file.
    values = labels.to_numpy()
    some_subtype = values[:, :ANY].any(axis=1)
    has_any = values[:, ANY].astype(bool)
    missed = np.flatnonzero(some_subtype & ~has_any)
    orphan = np.flatnonzero(has_any & ~some_subtype)
    parts = []
    for rows, what in ((missed, "any=0 while a subtype is 1"), (orphan, "any=1 but no subtype")):
        if rows.size:
            examples = format_examples(list(labels.index[rows[:_MAX_EXAMPLES]]), rows.size)
            parts.append(f"{rows.size} images have {what} (e.g. {examples})")
    if parts:
        warnings.warn(f"{source}: " + "; ".join(parts), LabelWarning, stacklevel=3)


# ------------------------------------------------------------------------------ report
REPORT_COLUMNS = ("section", "name", "count", "share")


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

    Columns `section,name,count,share` (share = count / images). Sections, in order:
    `images` (name `total`), `positives` (one row per label), `subtypes_per_image`
    (names "0".."5": images with that many positive subtypes, `any` not counted), and
    `co_occurrence` (names "a&b": images positive for both subtypes a and b).
    """
    values = check_label_table(labels)
    n = len(values)
    rows = [("images", "total", n)]
    rows += [("positives", name, int(count)) for name, count in zip(LABELS, values.sum(axis=0))]
    per_image = np.bincount(values[:, :ANY].sum(axis=1), minlength=len(SUBTYPES) + 1)
    rows += [("subtypes_per_image", str(k), int(count)) for k, count in enumerate(per_image)]
    both = values[:, :ANY].T @ values[:, :ANY]
    rows += [
        ("co_occurrence", f"{SUBTYPES[i]}&{SUBTYPES[j]}", int(both[i, j]))
        for i, j in combinations(range(len(SUBTYPES)), 2)
    ]
    report = pd.DataFrame(rows, columns=list(REPORT_COLUMNS[:3]))
    report["count"] = report["count"].astype(np.int64)
    report["share"] = report["count"] / n if n else np.nan
    return report


def format_label_report(report: pd.DataFrame) -> str:
    """A short printable summary of label_report's table."""
    if list(report.columns) != list(REPORT_COLUMNS):
        found = list(report.columns)
        raise ValueError(f"expected label_report's columns {list(REPORT_COLUMNS)}, got {found}")
    sections = dict(tuple(report.groupby("section", sort=False)))
    n_images = int(sections["images"]["count"].iloc[0])
    width = max(len(name) for name in LABELS)
    lines = [f"labels: {n_images} images", f"  {'class':<{width}} {'positives':>10} {'share':>8}"]
    for name, count, share in _rows(sections["positives"]):
        lines.append(f"  {name:<{width}} {count:>10} {share:>8.2%}")
    per_image = _rows(sections["subtypes_per_image"])
    lines.append("  subtypes per image: " + "  ".join(f"{name}: {count}" for name, count, _ in per_image))
    pairs = sections["co_occurrence"]
    pairs = pairs[pairs["count"] > 0].sort_values("count", ascending=False, kind="stable")
    shown = "  ".join(f"{name}: {count}" for name, count, _ in _rows(pairs.head(_MAX_EXAMPLES))) or "none"
    lines.append(f"  commonest subtype pairs (images with both): {shown}")
    return "\n".join(lines)


def _rows(section: pd.DataFrame) -> list[tuple[str, int, float]]:
    return list(zip(section["name"], section["count"], section["share"]))
