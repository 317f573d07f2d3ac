"""Find the CT slices to predict in any folder tree (a PACS export, a CD) and order each series.

    from utils.scans import scan_folder
    scan = scan_folder("exports/")   # or scan_folder(root, workers=8) for a large tree
    scan.slices                      # one row per slice to predict, in (study, series, index) order
    scan.skipped                     # path, reason: each file found and not predicted
    rows = scan.model_rows()         # absolute path, below, above: what the model reads
    scan.patients                    # PatientID of each slice ("" when absent): never written

Rules:
- Files are found by content, not by name: a DICOM Part-10 file has b"DICM" at byte 128,
  a NIfTI volume its header's magic (utils.nifti, gzip or not). Other files (a CD's viewer,
  PDFs, text, pre-1993 ACR-NEMA files) are counted, not listed. A DICOMDIR is the index of a
  CD, not an image: it is skipped, and the images it lists are found as the files they are.
- A slice is a single-frame DICOM file (any transfer syntax pydicom's decoders read), a
  frame of an Enhanced CT file (utils.multiframe) or a slice of a NIfTI volume; ``path``
  names it with utils.sources' reference ("ct.dcm::frame=3"), ``file`` and ``frame`` apart,
  ``format`` says what it was read from. A NIfTI volume is a series of its own, named by
  its path.
- Folders are walked in name order, and symlinked folders followed, each real folder once
  (a link back up the tree is no loop).
- Skipped, with a reason: a damaged file (utils.dicom's reason), another modality, a
  localizer (ImageType LOCALIZER), a slice more than 45 degrees from axial (a coronal or
  sagittal reformat: the model reads axial slices), a multi-frame file that is no Enhanced CT,
  a NIfTI volume that is no CT in HU, colour data, a second file of one
  SOPInstanceUID, and a second slice at one position of a series (the first path, sorted,
  is kept; the reason names it).
- A series is a SeriesInstanceUID within its StudyInstanceUID (utils.split's fallback when
  a file lacks one); the ``series`` column names it "<study UID>/<series UID>", or
  "image:<path>" for a slice placed alone. It is ordered by position along the slice normal n = row x column
  direction (ImageOrientationPatient): position = n . ImagePositionPatient, in mm. On an
  oblique or tilted series z alone can tie or misorder slices. A series whose slices
  disagree in orientation goes along its first slice's normal, and each such slice is noted.
- A slice without ImagePositionPatient or ImageOrientationPatient is predicted alone (its
  neighbours are itself, as at the edge of any series), and noted.
- Outputs hold paths, UIDs and SeriesDescription only: no patient text is put into them.
  PatientID is kept apart (``patients``), for splitting a labelled folder by patient
  (utils.dataset), which writes pseudonyms in its place.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from utils import nifti
from utils.dicom import DicomError, MultiFrame, NotPart10, SliceInfo, read_slice_info
from utils.headers import map_chunks
from utils.multiframe import read_frames
from utils.slices import MAX_TILT_DEGREES, order_slices, position_along_normal
from utils.sources import FRAME, SLICE, slice_ref
from utils.split import STUDY_PREFIX, fill_missing_keys

SLICE_COLUMNS = ["path", "file", "frame", "format", "sop_uid", "study_uid", "series_uid", "series_description", "series",
                 "index", "n_in_series", "position_mm", "prev_path", "next_path", "note"]
SKIPPED_COLUMNS = ["path", "reason"]
POSITION_TOLERANCE_MM = 0.01  # closer slices are one position written twice (0.3 mm is the thinnest)
_INFO_COLUMNS = ["sop_uid", "study_uid", "series_uid", "series_description", "position",
                 "orientation"]  # what _read_chunk gives of a slice
NO_GEOMETRY = "no ImagePositionPatient/ImageOrientationPatient: predicted alone"
OTHER_ORIENTATION = "orientation differs from the series' first slice; placed along that slice's normal"


@dataclass(frozen=True)
class FolderScan:
    """scan_folder's result: paths in both tables are relative to ``root``, with '/'."""

    root: Path
    slices: pd.DataFrame  # SLICE_COLUMNS, one row per slice to predict
    skipped: pd.DataFrame  # SKIPPED_COLUMNS, sorted by path
    n_files: int  # every file found (DICOM or not)
    n_non_dicom: int  # files without b"DICM" at byte 128: counted, not listed
    notes: dict = field(default_factory=dict)  # without_position, other_orientation: rows noted
    patients: pd.Series = None  # PatientID of each row of ``slices`` ("" when absent); not an output

    def model_rows(self) -> pd.DataFrame:
        """Absolute ``path``, ``below`` and ``above`` (the neighbours along the series) of
        each slice, in ``slices``' order and index: the columns the model's dataset reads."""
        absolute = lambda col: [str(self.root / p) for p in self.slices[col]]  # noqa: E731
        return pd.DataFrame({"path": absolute("path"), "below": absolute("prev_path"),
                             "above": absolute("next_path")}, index=self.slices.index)

    def summary(self) -> str:
        s = self.slices
        return (f"{self.n_files} files: {len(s)} CT slices to predict in "
                f"{s['series_uid'].nunique() if len(s) else 0} series of "
                f"{s['study_uid'].nunique() if len(s) else 0} studies "
                f"({self.notes.get('without_position', 0)} without position, predicted alone); "
                f"{len(self.skipped)} skipped; {self.n_non_dicom} not DICOM")


def scan_folder(root, workers: int = 0, parallel_min: int = 2000) -> FolderScan:
    """Every CT slice under ``root`` to predict, each series in order, and what was skipped
    and why (see the module docstring). Files are read in ``workers`` processes when there
    are at least ``parallel_min`` of them, as scan_headers does."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    files, skipped = _walk(root)
    results = map_chunks(_read_chunk, [os.path.join(root, f) for f in files], workers, parallel_min)
    found, first_of, n_non_dicom = [], {}, 0
    for rel, (kind, value) in zip(files, results):
        if kind == "not_dicom":
            n_non_dicom += 1
        elif kind == "skip":
            skipped.append((rel, value))
        elif value[0] in first_of:  # one SOP instance twice (an export made twice): files are sorted
            skipped.append((rel, f"duplicate SOPInstanceUID: the file kept is {first_of[value[0]]}"))
        else:
            sop_uid, fmt, patient, rows = value
            if sop_uid:
                first_of[sop_uid] = rel
            found.extend((slice_ref(rel, part, index), rel, index, fmt, patient, sop_uid, study,
                          rel if series is None else series, *rest) for part, index, study, series, *rest in rows)
    found = pd.DataFrame(found, columns=["path", "file", "frame", "format", "patient_id", *_INFO_COLUMNS])
    slices, notes = _order(found, skipped)
    patients = found.set_index("path")["patient_id"].reindex(slices["path"]).set_axis(slices.index)
    skipped = pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)
    return FolderScan(root, slices, skipped.sort_values("path", ignore_index=True),
                      len(files), n_non_dicom, notes, patients.fillna("").astype(str))


def _walk(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Relative paths of the files under ``root``, sorted, and (path, reason) of what
    could not be walked (an unreadable folder, a broken link, a device)."""
    files, problems, seen, stack = [], [], set(), [""]
    while stack:
        rel = stack.pop()
        try:
            st = os.stat(os.path.join(root, rel))
            if (st.st_dev, st.st_ino) in seen:
                continue  # a second link to a folder already walked, or a loop
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(os.path.join(root, rel)), key=lambda e: e.name)
        except OSError as err:
            problems.append((rel or ".", f"cannot list folder ({err.strerror or err})"))
            continue
        folders = []
        for entry in entries:
            path = f"{rel}/{entry.name}" if rel else entry.name
            try:
                if entry.is_dir():
                    folders.append(path)
                elif entry.is_file():
                    files.append(path)
                else:
                    problems.append((path, "not a regular file (a broken link, a device or a pipe)"))
            except OSError as err:
                problems.append((path, f"cannot stat ({err.strerror or err})"))
        stack.extend(reversed(folders))  # walked in name order: the first link to a folder wins
    return sorted(files), problems


def _read_chunk(paths: list[str]) -> list[tuple[str, object]]:
    """Per file: ("slices", (sop_uid, format, patient_id, rows)) | ("not_dicom", None) | ("skip", reason);
    rows: (part, index, study_uid, series_uid, series_description, position, orientation)
    of each slice it holds (part and index None for a single-slice file, series_uid None
    for a NIfTI volume: its path names it)."""
    out = []
    for p in paths:
        try:
            out.append(_read_file(p))
        except DicomError as err:
            out.append(("skip", err.reason))
    return out


def _read_file(path: str) -> tuple[str, object]:
    try:
        h, info = read_slice_info(path)
    except NotPart10:
        kind = nifti.sniff(path)
        if not kind:
            return "not_dicom", None
        volume = nifti.read_volume(path)
        return "slices", ("", volume.kind, "", [(SLICE, k, "", None, "", tuple(map(float, position)), volume.orientation)
                                            for k, position in enumerate(volume.positions)])
    except MultiFrame:
        return _frame_slices(path)
    reason = _not_predictable(info, info.orientation)
    # h.patient_id goes into FolderScan.patients, never into the scan's tables
    return ("skip", reason) if reason else \
        ("slices", (info.sop_uid, _format("DICOM", h.transfer_syntax), h.patient_id,
                    [(None, None, h.study_uid, h.series_uid, info.series_description, info.position, info.orientation)]))


def _frame_slices(path: str) -> tuple[str, object]:
    """_read_file's answer for a multi-frame file: a slice per frame of an Enhanced CT file."""
    frames = read_frames(path)
    h, info = frames.header, frames.info
    for orientation in dict.fromkeys(frames.orientations):
        reason = _not_predictable(info, orientation)
        if reason:
            return "skip", f"{len(frames)} frames: {reason}"
    return "slices", (info.sop_uid, _format(frames.kind, h.transfer_syntax), h.patient_id,
                      [(FRAME, i, h.study_uid, h.series_uid, info.series_description, position, orientation)
                       for i, (position, orientation) in enumerate(zip(frames.positions, frames.orientations))])


# Short names of the transfer syntaxes exports use; pydicom's own name for any other.
SYNTAX_NAMES = {pydicom.uid.ExplicitVRLittleEndian: "uncompressed", pydicom.uid.ImplicitVRLittleEndian: "uncompressed",
                pydicom.uid.RLELossless: "RLE", pydicom.uid.JPEGBaseline8Bit: "JPEG baseline",
                pydicom.uid.JPEGExtended12Bit: "JPEG extended", pydicom.uid.JPEGLossless: "JPEG lossless",
                pydicom.uid.JPEGLosslessSV1: "JPEG lossless SV1", pydicom.uid.JPEGLSLossless: "JPEG-LS lossless",
                pydicom.uid.JPEGLSNearLossless: "JPEG-LS near-lossless", pydicom.uid.JPEG2000Lossless: "JPEG 2000 lossless",
                pydicom.uid.JPEG2000: "JPEG 2000", pydicom.uid.DeflatedExplicitVRLittleEndian: "deflated",
                pydicom.uid.ExplicitVRBigEndian: "uncompressed, big endian"}


def _format(kind: str, syntax: str) -> str:
    """"DICOM (JPEG-LS lossless)": the kind of file and its transfer syntax, by its short name."""
    return f"{kind} ({SYNTAX_NAMES.get(syntax) or pydicom.uid.UID(syntax).name})"


def _not_predictable(info: SliceInfo, orientation) -> str:
    """Why a readable DICOM file (or a frame of one, of ``orientation``) is no CT slice to
    predict; "" when it is one."""
    if not info.modality:
        return "no Modality tag: not known to be CT"
    if info.modality != "CT":
        return f"modality {info.modality}, not CT"
    if "LOCALIZER" in info.image_type:
        return "a localizer (scout) image: ImageType " + "\\".join(info.image_type)
    if orientation is not None:
        row, col = orientation[:3], orientation[3:]
        normal_z = row[0] * col[1] - row[1] * col[0]  # of the unit normal row x column
        tilt = math.degrees(math.acos(min(1.0, abs(normal_z))))
        if tilt > MAX_TILT_DEGREES:
            return (f"not an axial slice: its plane is {tilt:.0f} degrees from axial (a coronal or "
                    f"sagittal reformat?); the model reads axial slices")
    return ""


def _positions(ct: pd.DataFrame, series: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each slice's position along its series' normal and whether its own normal differs
    (utils.slices.position_along_normal: the rule training orders slices by too)."""
    n = len(ct)
    ipp = np.full((n, 3), np.nan)
    iop = np.full((n, 6), np.nan)
    for i, (p, o) in enumerate(zip(ct["position"], ct["orientation"])):
        if p is not None and o is not None:
            ipp[i], iop[i] = p, o
    normal = np.cross(iop[:, :3], iop[:, 3:])  # read_slice_info checked: near unit length, or NaN
    with np.errstate(invalid="ignore"):
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    # ct is sorted by path: the first row of a series with geometry gives its normal.
    return position_along_normal(ipp, normal, series)


def _drop_repeated_positions(table: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """One slice per position of a series: the first by path (the reason names it). The
    rows are in path order, so a row's number stands for its path."""
    position, codes = table["position_mm"].to_numpy(), pd.factorize(table["series"])[0]
    rows = np.flatnonzero(~np.isnan(position))
    rows = rows[np.lexsort((position[rows], codes[rows]))]
    new = np.ones(len(rows), dtype=bool)  # the first row of each run of one position
    new[1:] = (codes[rows][1:] != codes[rows][:-1]) | (np.diff(position[rows]) > POSITION_TOLERANCE_MM)
    kept = np.minimum.reduceat(rows, np.flatnonzero(new))[np.cumsum(new) - 1] if len(rows) else rows
    again = kept != rows
    paths, series = table["path"].to_numpy(), table["series"].to_numpy()
    skipped = [(paths[r], f"duplicate position {position[r]:.3f} mm along the normal of series "
                          f"{series[r]}: the file kept is {paths[k]}")
               for r, k in zip(rows[again], kept[again])]
    return table.drop(index=table.index[rows[again]]), skipped


def _order(ct: pd.DataFrame, skipped: list) -> tuple[pd.DataFrame, dict]:
    """The slices table (SLICE_COLUMNS) of the CT slices kept; appends to ``skipped``."""
    paths = ct["path"].to_numpy(dtype=object)
    missing = lambda col: np.where(ct[col] == "", None, ct[col].to_numpy(dtype=object))  # noqa: E731
    series = fill_missing_keys(missing("series_uid"), [(missing("study_uid"), STUDY_PREFIX)], paths)[0]
    # A series UID is unique by the standard; the study in the key keeps a reused one apart.
    series = np.where(ct["study_uid"] == "", series, ct["study_uid"] + "/" + series.astype(str))
    position, differs = _positions(ct, series)
    table = ct.assign(series=series.astype(str), position_mm=position)
    table["note"] = np.where(np.isnan(position), NO_GEOMETRY, np.where(differs, OTHER_ORIENTATION, ""))
    table, repeated = _drop_repeated_positions(table)
    skipped.extend(repeated)
    notes = {"without_position": int(table["position_mm"].isna().sum()),
             "other_orientation": int((table["note"] == OTHER_ORIENTATION).sum())}
    if table.empty:
        return pd.DataFrame(columns=SLICE_COLUMNS), notes
    order = order_slices(pd.DataFrame({"image_id": table["path"], "z": table["position_mm"],
                                       "series_uid": table["series"], "study_uid": table["study_uid"],
                                       "patient_id": None}))
    order = order.loc[table["path"]]
    table = table.assign(series=order["series"].to_numpy(), index=order["position"].to_numpy(),
                         n_in_series=order["n_in_series"].to_numpy(),
                         prev_path=order["prev_id"].to_numpy(), next_path=order["next_id"].to_numpy())
    table = table.sort_values(["study_uid", "series_uid", "series", "index"], ignore_index=True)
    return table[SLICE_COLUMNS].astype({"frame": "Int64"}), notes
