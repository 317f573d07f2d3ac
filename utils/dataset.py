"""One table of labelled slices, whatever the data came as: a folder of your own scans with a
label CSV here; the Kaggle layout in kernel.load_data, which gives the same two frames.

    from utils.dataset import labelled_folder
    data = labelled_folder("exports/", "labels.csv")
    data.labels          # index: slice key; the six LABELS columns, float, NaN where unknown
    data.headers         # same index: path, below, above, patient_id, study_uid, series, position
    data.series_labels   # index: series; the series-level labels the CSV gave (NaN unknown)

What training, validation, the refiner and the report read is ``labels`` and ``headers``:
the slice key (the Kaggle image ID, or a slice's reference relative to the folder, as
``--predict``'s slices.csv names it), its path, its neighbours, its patient, study and
series and its place along the series.

The label CSV of a folder (README, "Validate on your own scans") has one row per slice or
per series, and any subset of the six LABELS columns, each 0, 1 or empty:
- a slice is named by ``path`` (relative to the folder; a frame of a multi-frame file or a
  slice of a NIfTI volume by its ``frame`` beside it, or by the reference "ct.dcm::frame=3")
  or by ``sop_uid`` (with ``frame`` for a multi-frame file);
- a series by ``series_uid`` alone: a label of the whole series (with ``frame``, the slice of
  that index of a NIfTI volume, whose series_uid is its path, or of a one-file Enhanced CT series).
A column that is absent, or a cell that is empty, is unknown: never 0. A series-level 0 is
every slice's 0 (no slice of a series without a subdural shows one); a series-level 1 says
only that some slice does, so its slices stay unknown for that class (the series-level
loss, kernel.label_series_maxima with utils.labels.series_picks, learns from it). Every key
must name exactly one slice or series of the folder, once; the errors name the line.
Patients are the files' PatientID (else their study: utils.split.resolve_groups), written
only as pseudonyms (patient_0001).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from utils.errors import UserError
from utils.labels import LABELS, LabelError
from utils.scans import FolderScan, scan_folder
from utils.split import resolve_groups

SLICE_KEYS, SERIES_KEY, FRAME_COLUMN = ("path", "sop_uid"), "series_uid", "frame"
KEY_COLUMNS = (*SLICE_KEYS, SERIES_KEY)
HEADER_COLUMNS = ["path", "below", "above", "patient_id", "study_uid", "series", "position"]
VALUES = {"0": 0.0, "1": 1.0, "": np.nan}


@dataclass(frozen=True)
class LabelledSlices:
    """The one table (split into the labels and the rest, on one index) and what made it."""
    labels: pd.DataFrame         # LABELS columns, float, NaN unknown
    headers: pd.DataFrame        # HEADER_COLUMNS
    series_labels: pd.DataFrame  # index: series key; LABELS, NaN unknown
    scan: FolderScan | None = None

    def describe(self) -> str:
        known = self.labels.notna().sum()
        return (f"{len(self.labels)} labelled slices in {self.headers['series'].nunique()} series of "
                f"{self.headers['patient_id'].nunique()} patients; {len(self.series_labels)} series labelled "
                f"as a whole; known slice labels per class: "
                + ", ".join(f"{k} {known[k]}" for k in LABELS))


def read_folder_labels(csv_path) -> pd.DataFrame:
    """The label CSV of a folder as a table: ``line`` (the CSV's line number), ``kind``
    (slice or series), ``key`` column name and value, ``frame`` (Int64) and the LABELS
    columns (float, NaN unknown). A LabelError naming the file and the line otherwise.
    Read with the csv module, not pandas, which would take a row with one field too many
    as an index or drop the extra field: here it is an error naming its line."""
    path = Path(csv_path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
            reader = csv.reader(f, skipinitialspace=True)
            header = [c.strip() for c in next(reader, [])]
            records = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise LabelError(f"{path}: cannot be read as a CSV ({str(err).splitlines()[0][:200]})") from None
    unknown = [c for c in header if c not in (*KEY_COLUMNS, FRAME_COLUMN, *LABELS)]
    keys = [c for c in KEY_COLUMNS if c in header]
    classes = [c for c in LABELS if c in header]
    twice = sorted({c for c in header if header.count(c) > 1})
    problems = [f"line 1: unknown columns {unknown}; the columns are a key ({', '.join(KEY_COLUMNS)}), "
                f"optionally {FRAME_COLUMN}, and any of {', '.join(LABELS)}"] if unknown else []
    if not keys:
        problems.append(f"line 1: no key column: give {', '.join(KEY_COLUMNS)} (one per row)")
    if not classes:
        problems.append(f"line 1: no label column: give any of {', '.join(LABELS)}")
    if twice:
        problems.append(f"line 1: columns named twice: {twice}")
    if problems:
        raise LabelError(f"{path}: {problems[0]}")
    if not records:
        raise LabelError(f"{path}: no label rows after the header")
    rows, problems = [], []
    for line, fields in records:
        try:
            if len(fields) != len(header):
                raise ValueError(f"{len(fields)} fields, but the header names {len(header)}")
            rows.append(_parse_row(dict(zip(header, fields)), keys, classes, line))
        except ValueError as err:
            problems.append(f"line {line}: {err}")
    if problems:
        more = f" (and {len(problems) - 5} more lines)" if len(problems) > 5 else ""
        raise LabelError("\n".join(f"{path}: {p}" for p in problems[:5]) + more)
    table = pd.DataFrame(rows, columns=["line", "kind", "key", "value", "frame", *LABELS])
    return table.astype({"frame": "Int64", **{c: float for c in LABELS}})


def _parse_row(row: dict, keys: list[str], classes: list[str], line: int) -> tuple:
    given = [k for k in keys if row[k].strip()]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(keys)} (found {len(given) or 'none'})")
    key, value = given[0], row[given[0]].strip()
    frame_text = row.get(FRAME_COLUMN, "").strip()
    frame = None
    if frame_text:
        if not frame_text.isdigit():
            raise ValueError(f"{FRAME_COLUMN} must be a whole number >= 0, got {frame_text!r}")
        frame = int(frame_text)
    values = []
    for c in LABELS:
        text = row[c].strip() if c in classes else ""
        if text not in VALUES:
            raise ValueError(f"{c} must be 0, 1 or empty (unknown), got {text!r}")
        values.append(VALUES[text])
    if key == "path":
        value = value.replace("\\", "/").removeprefix("./")
    kind = "series" if key == SERIES_KEY and frame is None else "slice"
    return (line, kind, key, value, frame, *values)


def labelled_folder(folder, labels_csv, workers: int = 0) -> LabelledSlices:
    """The labelled slices of ``folder`` (scanned as --predict scans it) by ``labels_csv``."""
    if not Path(folder).is_dir():
        raise UserError(f"{folder}: no such folder of scans")
    table = read_folder_labels(labels_csv)
    scan = scan_folder(folder, workers=workers)
    return match_labels(scan, table, Path(labels_csv))


def match_labels(scan: FolderScan, table: pd.DataFrame, source: Path) -> LabelledSlices:
    """read_folder_labels' rows joined to the scan's slices: each key must name one slice (or
    series) the scan found, once. The slices with no known label are left out."""
    s = scan.slices
    slice_rows, series_rows = table[table["kind"] == "slice"], table[table["kind"] == "series"]
    problems = []
    at = _slice_positions(s, slice_rows, scan.skipped, problems)
    series_of = _series_keys(s, series_rows, problems)
    for what, where, rows in (("slice", at, slice_rows), ("series", series_of, series_rows)):
        lines = pd.Series(rows["line"].to_numpy(), index=where).loc[lambda x: x.index.notna()]
        for target, group in lines.groupby(level=0):
            if len(group) > 1:
                problems.append((group.min(), f"lines {', '.join(map(str, group))}: the same {what} "
                                 f"({s['path'].iloc[int(target)] if what == 'slice' else target}) labelled twice"))
    if problems:
        raise LabelError("\n".join(f"{source}: {text}" for _, text in sorted(problems)[:5])
                         + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    y = np.full((len(s), len(LABELS)), np.nan)
    y[at.astype(int)] = slice_rows[list(LABELS)].to_numpy()
    series_labels = pd.DataFrame(series_rows[list(LABELS)].to_numpy(), columns=list(LABELS),
                                 index=pd.Index(series_of, name="series"))
    y = _with_series_negatives(y, s["series"].to_numpy(), series_labels, series_rows["line"].to_numpy(),
                               s["path"].to_numpy(), source)
    keep = ~np.isnan(y).all(axis=1) | s["series"].isin(series_labels.index).to_numpy()
    headers = _headers(scan)
    labels = pd.DataFrame(y, index=headers.index, columns=list(LABELS))
    return LabelledSlices(labels[keep], headers[keep], series_labels, scan)


def _slice_positions(s: pd.DataFrame, rows: pd.DataFrame, skipped: pd.DataFrame, problems: list) -> np.ndarray:
    """The row of ``s`` each slice row names (float, NaN where none); a (line, problem) per miss."""
    by_ref = dict(zip(s["path"], range(len(s))))
    frames = s["frame"].astype("float").to_numpy()
    by_file = {(f, None if np.isnan(k) else int(k)): i for i, (f, k) in enumerate(zip(s["file"], frames))}
    by_sop = {(u, None if np.isnan(k) else int(k)): i for i, (u, k) in enumerate(zip(s["sop_uid"], frames)) if u}
    by_series = pd.Series(range(len(s))).groupby([s["series_uid"].to_numpy(), frames]).agg(list).to_dict()
    n_in_file = s["file"].value_counts()
    reasons = dict(zip(skipped["path"], skipped["reason"]))
    out = np.full(len(rows), np.nan)
    for j, (line, key, value, frame) in enumerate(zip(rows["line"], rows["key"], rows["value"], rows["frame"])):
        frame = None if pd.isna(frame) else int(frame)
        if key == "path":
            hit = by_ref.get(value) if frame is None else by_file.get((value, frame))
        elif key == SERIES_KEY:  # a slice of a series by its frame: a NIfTI volume's, or one Enhanced CT file's
            hits = by_series.get((value, float(frame)), [])
            hit = hits[0] if len(hits) == 1 else None
            if len(hits) > 1:
                problems.append((line, f"line {line}: {FRAME_COLUMN} {frame} of series_uid {value} names "
                                       f"{len(hits)} slices (in different files); name the slice by path"))
                continue
        else:
            hit = by_sop.get((value, frame))
        if hit is not None:
            out[j] = hit
        elif key == "path" and value in reasons:
            problems.append((line, f"line {line}: {value} was not read as a CT slice: {reasons[value]}"))
        elif frame is None and n_in_file.get(value if key == "path" else "", 0) > 1:
            problems.append((line, f"line {line}: {value} holds {n_in_file[value]} slices: give the {FRAME_COLUMN}"))
        else:
            where = f"{FRAME_COLUMN} {frame} of " if frame is not None else ""
            problems.append((line, f"line {line}: no CT slice found under the folder is {where}{key} {value}"))
    return out


def _series_keys(s: pd.DataFrame, rows: pd.DataFrame, problems: list) -> np.ndarray:
    """The scan's series key each series row names (object, None where none)."""
    keys = s.groupby("series_uid")["series"].unique()
    out = np.full(len(rows), None, dtype=object)
    for j, (line, value) in enumerate(zip(rows["line"], rows["value"])):
        found = keys.get(value, [])
        if len(found) == 1:
            out[j] = found[0]
        elif len(found) > 1:
            problems.append((line, f"line {line}: series_uid {value} names {len(found)} series (in different "
                                   f"studies); label their slices by path instead"))
        else:
            problems.append((line, f"line {line}: no series of CT slices found under the folder has series_uid {value}"))
    return out


def _with_series_negatives(y: np.ndarray, series: np.ndarray, series_labels: pd.DataFrame, lines: np.ndarray,
                           paths: np.ndarray, source: Path) -> np.ndarray:
    """Each series-level 0 given to every slice of the series, where the slice's own label
    is unknown; a slice labelled 1 in a series labelled 0 is a contradiction."""
    y, rows_of = y.copy(), pd.Series(np.arange(len(series))).groupby(series).indices
    for (key, labels), line in zip(series_labels.iterrows(), lines):
        rows = rows_of[key]
        for j, c in enumerate(LABELS):
            if labels[c] == 0:
                clash = rows[y[rows, j] == 1]
                if len(clash):
                    raise LabelError(f"{source}: line {line}: series {key} is labelled {c} 0, but its slice "
                                     f"{paths[clash[0]]} is labelled {c} 1")
                y[rows, j] = np.where(np.isnan(y[rows, j]), 0.0, y[rows, j])
    return y


def _headers(scan: FolderScan) -> pd.DataFrame:
    """HEADER_COLUMNS of every scanned slice, indexed by its reference; patients pseudonymised."""
    s = scan.slices
    blank = lambda v: np.where(v == "", None, v).astype(object)  # noqa: E731
    groups, _, _ = resolve_groups(blank(scan.patients.to_numpy(dtype=object)), blank(s["study_uid"].to_numpy(dtype=object)),
                                  s["path"].to_numpy(dtype=object))
    codes = pd.factorize(groups)[0]
    rows = scan.model_rows()
    return pd.DataFrame({"path": rows["path"].to_numpy(), "below": rows["below"].to_numpy(),
                         "above": rows["above"].to_numpy(), "patient_id": [f"patient_{c + 1:04d}" for c in codes],
                         "study_uid": s["study_uid"].to_numpy(), "series": s["series"].to_numpy(),
                         "position": s["index"].to_numpy()},
                        index=pd.Index(s["path"].to_numpy(), name="image_id"))
