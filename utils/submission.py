"""Kaggle's submission file: one `ID,Label` row per test image and subtype.

    from utils.submission import build_submission, write_submission
    submission = build_submission(sample_csv, image_ids, probs, fill=prior)
    write_submission(submission, "submission.csv", sample_csv)   # validated, atomic

    python kernel.py --check-submission submission.csv    # check_submission_file()

The sample submission (`stage_2_sample_submission.csv`) defines the rows: a submission
has exactly its IDs, each once, with a finite probability in [0, 1].
"""
from __future__ import annotations

import gzip
import logging
import sys
from os import PathLike
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from utils import rundir
from utils.atomic import atomic_write
from utils.errors import EXIT_USAGE, UserError, writing
from utils.labels import (
    HEADER,
    LABELS,
    LabelError,
    check_image_id,
    format_examples,
    is_valid_image_id,
    parse_row_ids,
    read_id_label_csv,
)
from utils.metrics import SUBMISSION_EPS, check_probabilities

logger = logging.getLogger(__name__)

# Log loss punishes a confident miss without limit; keeping every probability this far
# from 0 and 1 caps the cost of one wrong row at -ln(1e-6) ~ 13.8 nats.
PROB_MIN = SUBMISSION_EPS
PROB_MAX = 1 - SUBMISSION_EPS
# Nine significant digits round-trip every float32 exactly (model outputs usually are)
# and keep the clip bounds distinct; "%.6g" would print 1 - 1e-6 as "1".
FLOAT_FORMAT = "%.9g"
SUBMISSION_SUFFIXES = (".csv", ".csv.gz")


class SubmissionError(ValueError):
    """A sample submission that cannot be read, or a submission that cannot be built or written."""


class SampleSubmission(NamedTuple):
    """The rows of Kaggle's sample submission, in file order."""

    row_ids: pd.Index  # "ID_<image>_<subtype>", one per row
    image_ids: pd.Index  # unique image IDs, in order of first appearance
    image_index: np.ndarray  # (n_rows,) position of each row's image in image_ids
    subtype_index: np.ndarray  # (n_rows,) position of each row's subtype in LABELS


def read_sample_submission(path: str | PathLike) -> SampleSubmission:
    """Parse `stage_2_sample_submission.csv` (its Label values are ignored).

    Raises SubmissionError naming the file and line for a bad header, a malformed ID, or
    a row ID that appears twice.
    """
    path = Path(path)
    try:
        table = read_id_label_csv(path)
        if table.num_rows == 0:
            raise LabelError(f"{path}: no rows after the header")
        parsed = parse_row_ids(table["ID"], source=path)
    except LabelError as err:
        raise SubmissionError(f"sample submission: {err}") from None
    row_ids = pd.Index(table["ID"].cast(pa.string()), dtype="str", name="ID")
    repeated = row_ids.duplicated()
    if repeated.any():
        lines = np.flatnonzero(repeated) + 2  # line 1 is the header
        items = [f"line {line}: {row_id}" for line, row_id in zip(lines, row_ids[repeated])]
        examples = format_examples(items, len(lines))
        raise SubmissionError(f"sample submission: {path}: {len(lines)} repeated row IDs: {examples}")
    return SampleSubmission(row_ids, parsed.image_ids, parsed.image_index, parsed.subtype_index)


def build_submission(sample_path: str | PathLike, image_ids, probs, *, fill=None) -> pd.DataFrame:
    """The submission table (`ID,Label`, the sample's rows in the sample's order).

    `probs` is an (n, 6) array of probabilities aligned with `image_ids`, columns in
    LABELS order; they are clipped to [PROB_MIN, PROB_MAX]. A sample image missing from
    `image_ids` is an error listing them, unless `fill` (a (6,) array, e.g. the training
    prior) is given: then it fills those images, and `df.attrs["filled_images"]` counts
    them. Predictions for images not in the sample are ignored (and logged).
    """
    sample = read_sample_submission(sample_path)
    ids = _check_image_ids(image_ids)
    table = _check_probs(probs, len(ids))
    position = ids.get_indexer(sample.image_ids)
    missing = position < 0
    if missing.any():
        if fill is None:
            raise SubmissionError(
                f"{int(missing.sum())} sample images have no prediction (pass fill= to use a default): "
                f"{format_examples(list(sample.image_ids[missing]), int(missing.sum()))}"
            )
        table = np.vstack([table, _check_fill(fill)])
        position[missing] = len(table) - 1
    n_unused = len(ids) - int((~missing).sum())
    if n_unused:
        logger.info("ignoring predictions for %d images that are not in the sample submission", n_unused)
    values = np.clip(table[position[sample.image_index], sample.subtype_index], PROB_MIN, PROB_MAX)
    submission = pd.DataFrame({HEADER[0]: sample.row_ids.to_numpy(), HEADER[1]: values})
    submission.attrs["filled_images"] = int(missing.sum())
    if missing.any():
        logger.info("filled %d images missing from the predictions with the default", int(missing.sum()))
    return submission


def validate_submission(submission: pd.DataFrame | str | PathLike, sample_path: str | PathLike) -> list[str]:
    """Problems that would make Kaggle reject or misscore `submission`; [] means valid.

    `submission` is a DataFrame or the path of a .csv / .csv.gz file. Checked: the
    columns are exactly `ID,Label`; every sample ID appears exactly once and no other ID
    does; every Label is a finite number in [0, 1]. Each problem names the first few IDs
    and the count. A broken sample submission raises SubmissionError instead.
    """
    sample = read_sample_submission(sample_path)
    if isinstance(submission, (str, PathLike)):
        submission, problems = _read_submission_file(Path(submission))
        if problems:
            return problems
    if not isinstance(submission, pd.DataFrame):
        raise TypeError(f"expected a DataFrame or a path, got {type(submission).__name__}")
    if list(submission.columns) != list(HEADER):
        return [f"columns are {list(submission.columns)}, expected {','.join(HEADER)}"]

    problems = []
    ids = submission[HEADER[0]]
    no_id = ids.isna().to_numpy()
    if no_id.any():
        rows = [str(row) for row in np.flatnonzero(no_id)]
        problems.append(f"{len(rows)} rows have no ID (rows {format_examples(rows, len(rows))})")
    ids = pd.Index(ids[~no_id].astype("str"))
    counts = ids.value_counts(sort=False)
    # A numpy mask: a boolean Series here makes pandas probe the 727k-string index by name (0.4 s).
    repeated = counts[counts.to_numpy() > 1]
    if len(repeated):
        items = [f"{row_id} ({count} times)" for row_id, count in repeated.items()]
        problems.append(f"{len(repeated)} IDs appear more than once: {format_examples(items, len(repeated))}")
    absent = sample.row_ids[~_isin(sample.row_ids, ids)]
    if len(absent):
        problems.append(f"{len(absent)} sample IDs are missing: {format_examples(list(absent), len(absent))}")
    extra = counts.index[~_isin(counts.index, sample.row_ids)]
    if len(extra):
        examples = format_examples(list(extra), len(extra))
        problems.append(f"{len(extra)} IDs are not in the sample submission: {examples}")
    problems += _value_problems(submission)
    return problems


def write_submission(submission: pd.DataFrame, path: str | PathLike, sample_path: str | PathLike) -> Path:
    """Validate `submission`, then write it atomically to `path` (gzip if it ends in .gz).

    Raises SubmissionError listing the problems, writing nothing, if it is invalid. The
    file is written next to `path` under a temporary name and renamed into place, so a
    crash or a full disk leaves the previous file intact and no partial file behind.
    """
    problems = validate_submission(submission, sample_path)
    if problems:
        raise SubmissionError("submission not written:\n  " + "\n  ".join(problems))
    path = Path(path)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as raw:
            if path.suffix == ".gz":
                # mtime=0 and no file name in the header: same table, same bytes.
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as zipped:
                    _write_csv(submission, zipped)
            else:
                _write_csv(submission, raw)
    atomic_write(path, write)
    logger.info("wrote %d rows to %s", len(submission), path)
    return path


def check_submission_file(path: str | PathLike, sample_path: str | PathLike) -> list[str]:
    """Problems with a submission file on disk (.csv or .csv.gz); [] means valid.

    For `kernel.py --check-submission`: a file that is missing or cannot be parsed is a
    problem in the list, not an exception.
    """
    path = Path(path)
    problems = []
    if not path.name.endswith(SUBMISSION_SUFFIXES):
        problems.append(f"{path}: expected a file ending in {' or '.join(SUBMISSION_SUFFIXES)}")
    return problems + validate_submission(path, sample_path)


def _isin(values: pd.Index, allowed: pd.Index) -> np.ndarray:
    """`values.isin(allowed)` for str indexes, in Arrow: pandas' own isin on the str dtype
    makes a Python object of every allowed value (11 s for the 727,392 sample rows)."""
    # Typed, so that an empty index (object dtype under pandas 2) is an empty string array.
    return np.asarray(pc.is_in(pa.array(values.array, type=pa.string()),
                               value_set=pa.array(allowed.array, type=pa.string())), dtype=bool)


def _write_csv(submission: pd.DataFrame, fh: BinaryIO) -> None:
    """`ID,Label` lines, each Label printed with FLOAT_FORMAT: the bytes of pandas'
    ``to_csv(float_format=FLOAT_FORMAT)`` for a float column, in a tenth of the time."""
    values = pd.to_numeric(submission[HEADER[1]]).to_numpy(dtype=np.float64)
    labels = pa.array([FLOAT_FORMAT % value for value in values.tolist()], type=pa.string())
    table = pa.table({HEADER[0]: pa.array(submission[HEADER[0]].astype("str").array), HEADER[1]: labels})
    fh.write(",".join(HEADER).encode() + b"\n")
    # Unquoted is safe: a validated submission holds only the sample's IDs, which parse_row_ids
    # restricts to letters, digits and '_'.
    pacsv.write_csv(table, fh, pacsv.WriteOptions(include_header=False, quoting_style="none"))


def _read_submission_file(path: Path) -> tuple[pd.DataFrame | None, list[str]]:
    if not path.is_file():
        return None, [f"{path}: no such file"]
    try:
        table = read_id_label_csv(path)
        ids = table["ID"].cast(pa.string()).to_pandas()
        labels = table["Label"].cast(pa.string()).to_pandas()
    except (ValueError, OSError, EOFError, pa.ArrowException) as err:  # LabelError is a ValueError
        return None, [f"cannot read the submission: {err}"]
    # Text that is not a number becomes NaN here and is reported as not finite.
    return pd.DataFrame({HEADER[0]: ids, HEADER[1]: pd.to_numeric(labels, errors="coerce")}), []


def _value_problems(submission: pd.DataFrame) -> list[str]:
    ids = submission[HEADER[0]].astype("str").to_numpy()
    values = pd.to_numeric(submission[HEADER[1]], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    problems = []
    not_finite = ~np.isfinite(values)
    if not_finite.any():
        items = list(ids[not_finite])
        examples = format_examples(items, len(items))
        problems.append(f"{len(items)} rows have a Label that is not a finite number: {examples}")
    outside = np.isfinite(values) & ((values < 0) | (values > 1))
    if outside.any():
        items = [f"{row_id}={value:g}" for row_id, value in zip(ids[outside], values[outside])]
        problems.append(f"{len(items)} rows have a Label outside [0, 1]: {format_examples(items, len(items))}")
    return problems


def _check_image_ids(image_ids) -> pd.Index:
    if isinstance(image_ids, (str, bytes)):
        raise TypeError("image_ids must be a sequence of image IDs, not a single string")
    ids = pd.Index(list(image_ids), dtype="object")
    bad = [row_id for row_id in ids if not is_valid_image_id(row_id)]
    if bad:
        check_image_id(bad[0])  # raises the standard message for the first one
    if not ids.is_unique:
        repeated = list(ids[ids.duplicated()].unique())
        examples = format_examples(repeated, len(repeated))
        raise ValueError(f"{len(repeated)} image IDs appear more than once: {examples}")
    return pd.Index(ids, dtype="str")


def _check_probs(probs, n_images: int) -> np.ndarray:
    if n_images == 0:
        array = np.asarray(probs, dtype=np.float64)
        if array.size:
            raise ValueError(f"probs has shape {array.shape} but image_ids is empty")
        return np.zeros((0, len(LABELS)))
    array = check_probabilities(probs, "probs")
    if len(array) != n_images:
        raise ValueError(f"probs has {len(array)} rows but there are {n_images} image_ids")
    return array


def _check_fill(fill) -> np.ndarray:
    array = np.asarray(fill, dtype=np.float64)
    if array.shape != (len(LABELS),):
        raise ValueError(f"fill must have shape ({len(LABELS)},) in LABELS order, got {array.shape}")
    return check_probabilities(array[None, :], "fill")[0]


def write_checked_submission(probs: pd.DataFrame, sample: Path, out_dir: Path) -> int:
    """OUT/submission.csv, built from ``probs`` (one row per image ID, LABELS columns) and
    checked against the sample, and OUT/test_predictions.csv: the same probabilities
    unclipped, what --ensemble averages. Returns the submission's rows."""
    submission = build_submission(sample, probs.index.tolist(), probs.to_numpy())
    with writing(out_dir / rundir.SUBMISSION):
        write_submission(submission, out_dir / rundir.SUBMISSION, sample)
    rundir.write_csv(out_dir / rundir.TEST_PREDICTIONS, probs)
    return len(submission)


def check_submission_command(path: str, data_dir: Path | None) -> int:
    """--check-submission PATH: the file checked against the sample submission in
    ``data_dir``; 0 when it is valid, 2 (its problems on stderr) when not."""
    if data_dir is None:
        raise UserError("--check-submission needs --data-dir, the folder holding stage_2_sample_submission.csv")
    sample = Path(data_dir) / "stage_2_sample_submission.csv"
    if not sample.is_file():
        raise UserError(f"{sample} does not exist: --data-dir must hold the sample submission")
    problems = check_submission_file(path, sample)
    if problems:
        print(f"{path} is not a valid submission:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_USAGE
    logger.info(f"{path}: valid, every row of {sample} exactly once, values in [0, 1]")
    return 0
