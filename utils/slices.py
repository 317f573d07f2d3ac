"""Slice order along z within each series, and each slice's neighbours along it.

A radiologist reads a slice with the ones above and below it, and every top-5 team of the
competition gained ~0.006-0.008 weighted log loss that way. This module places each slice
in its series; the pipeline then stacks neighbours as channels (neighbour_paths) or
refines per-slice logits along the series (utils.refiner, on the same order):

    from utils.slices import order_slices, neighbour_paths
    order = order_slices(headers)                       # series, position, prev_id, next_id
    stacks = neighbour_paths(order, headers.set_index("image_id")["path"], radius=1)

Ordering rules (`order_slices`):
- The series key is SeriesInstanceUID. A row without one whose study (then patient) has
  exactly one known series on other rows joins that series: the tag missing from one file
  should not cut a slice off from its neighbours. Otherwise the key is "study:<uid>", then
  "patient:<id>", and a row with no ID at all is a series of its own ("image:<id>"). This
  is utils.split.fill_missing_keys, the rule that also groups patients.
- Within a series, slices go by their position along the series' normal (the normal of
  its first slice with geometry, in the table's order: position_along_normal), lowest
  first, as --predict DIR orders a folder's scans; in a tilted or oblique series z alone
  can tie or misorder them. Equal positions are broken by image ID (a deterministic, if
  arbitrary, choice) and counted. A table without the normal (x, y, normal_* columns)
  is ordered by its z column.
- A slice without a finite position is a one-slice series of its own ("image:<id>"):
  placing it by any other rule (image ID, file order) would invent neighbours, and a slice
  whose neighbours are itself is what the edge of every series already looks like.
"""
from __future__ import annotations

import numbers

import numpy as np
import pandas as pd

from utils.labels import format_examples
from utils.split import IMAGE_PREFIX, STUDY_PREFIX, fill_missing_keys, is_missing

PATIENT_PREFIX = "patient:"  # prefixed for the reason split.py's prefixes are
ALONE_PREFIX = IMAGE_PREFIX  # a slice that is a series of its own
ID_COLUMNS = ("series_uid", "study_uid", "patient_id")  # the series key's fallback chain
ORDER_COLUMNS = ("series", "z", "position", "n_in_series", "prev_id", "next_id")
# The model reads axial slices; gantry tilts of head CT stay within about 30 degrees of it.
# A plane further from axial (a coronal or sagittal reformat) is not predicted.
MAX_TILT_DEGREES = 45
GEOMETRY_COLUMNS = ("x", "y", "z", "normal_x", "normal_y", "normal_z")  # utils.dicom.Header's
ORIENTATION_TOLERANCE = 1e-3  # normals' largest difference within one orientation (cosines' rounding)


def position_along_normal(xyz: np.ndarray, normal: np.ndarray, series) -> tuple[np.ndarray, np.ndarray]:
    """Each slice's position (mm) along its series' normal, the unit normal of the series'
    first row with geometry (NaN where a row has none), and whether the row's own normal
    differs from it. ``xyz`` is (n, 3) ImagePositionPatient, ``normal`` (n, 3)."""
    xyz, normal = np.asarray(xyz, np.float64).reshape(-1, 3), np.asarray(normal, np.float64).reshape(-1, 3)
    has = np.isfinite(xyz).all(axis=1) & np.isfinite(normal).all(axis=1)
    codes = pd.factorize(np.asarray(series))[0]
    first = pd.Series(np.flatnonzero(has)).groupby(codes[has]).first()
    reference = np.full((codes.max() + 1 if len(codes) else 0, 3), np.nan)
    reference[first.index] = normal[first.to_numpy()]
    ref = reference[codes] if len(codes) else np.zeros((0, 3))
    position = np.where(has, np.einsum("ij,ij->i", ref, xyz), np.nan)
    differs = has & (np.abs(normal - ref).max(axis=1, initial=0.0) > ORIENTATION_TOLERANCE)
    return position, differs


def _check_headers(headers: pd.DataFrame) -> tuple[pd.Series, np.ndarray]:
    """The image IDs (str, index 0..n-1) and z (float64, NaN where absent or not finite)."""
    if not isinstance(headers, pd.DataFrame):
        raise TypeError(f"headers must be a DataFrame, got {type(headers).__name__}")
    needed = ("image_id", "z", *ID_COLUMNS)
    absent = [c for c in needed if c not in headers.columns]
    if absent:
        raise ValueError(f"headers lack the columns {absent} (scan_headers gives them all)")
    if len(headers) == 0:
        raise ValueError("headers have no rows")
    no_id = is_missing(headers["image_id"])
    if no_id.any():
        raise ValueError(f"{int(no_id.sum())} rows have no image_id (first at row {int(np.argmax(no_id))})")
    image_id = headers["image_id"].astype("str").reset_index(drop=True)
    repeated = image_id[image_id.duplicated()].unique()
    if len(repeated):
        raise ValueError(f"{len(repeated)} image IDs occur more than once: {format_examples(repeated)}")
    try:
        z = pd.to_numeric(headers["z"], errors="raise").to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError) as err:
        raise ValueError(f"headers['z'] must be numeric: {err}") from None
    return image_id, np.where(np.isfinite(z), z, np.nan)


def _series_keys(headers: pd.DataFrame, image_id: pd.Series, no_z: np.ndarray) -> tuple[pd.Series, dict]:
    """The series key of each row (str) and how many rows fell back, and how."""
    no_series = is_missing(headers["series_uid"])
    if not no_series.any() and not no_z.any():
        # The usual case, kept in Arrow strings: a Python object per row costs seconds.
        zero = dict(series_from_study=0, series_from_patient=0, series_alone=0, series_fallback=0)
        return headers["series_uid"].astype("str").reset_index(drop=True), zero
    ids = {c: np.where(is_missing(headers[c]), None, headers[c].astype("str").to_numpy(dtype=object))
           for c in ID_COLUMNS}
    key, filled = fill_missing_keys(ids["series_uid"],
                                    [(ids["study_uid"], STUDY_PREFIX), (ids["patient_id"], PATIENT_PREFIX)],
                                    image_id.to_numpy(dtype=object))
    counts = dict(zip(("series_from_study", "series_from_patient", "series_alone"), filled))
    counts["series_fallback"] = sum(filled)
    # Without z a slice's place is unknown; it keeps no neighbours rather than invented ones.
    key[no_z] = [ALONE_PREFIX + i for i in image_id[no_z]]
    return pd.Series(key, dtype="str"), counts


def _break_ties(order: np.ndarray, tied: np.ndarray, image_id: pd.Series) -> np.ndarray:
    """`order` with each run of tied rows (tied[i]: sorted row i ties row i-1) sorted by
    image ID. Only tied rows are compared as strings: a full string sort of 750k IDs
    costs more than the rest of order_slices."""
    in_run = np.zeros(len(order), dtype=bool)
    in_run[1:] |= tied
    in_run[:-1] |= tied
    at = np.flatnonzero(in_run)
    run = np.cumsum(~tied[at - 1] | (at == 0))  # a new run starts where a row ties no predecessor
    ids = image_id.to_numpy(dtype=object)[order[at]]
    within = pd.factorize(ids, sort=True)[0]
    order = order.copy()
    order[at] = order[at][np.lexsort((within, run))]
    return order


def order_slices(headers: pd.DataFrame) -> pd.DataFrame:
    """Each slice's series, rank along z and neighbours, from scan_headers' table.

    Returns a DataFrame indexed by image_id, rows in the input's order, with columns
    `series` (the key used; see the module docstring for fallbacks), `z`, `position`
    (0-based rank within the series, lowest z first), `n_in_series`, and `prev_id` /
    `next_id` (the slice below / above; at an edge the slice itself). `attrs` holds the
    counts `ties` (rows whose z equals the previous slice's in their series), `missing_z`
    (rows made one-slice series), `series_from_study`, `series_from_patient`,
    `series_alone`, `series_fallback` (their sum; a row without z may count here too)
    and `n_series`.
    """
    image_id, z = _check_headers(headers)
    if set(GEOMETRY_COLUMNS) <= set(headers.columns):
        key = _series_keys(headers, image_id, np.isnan(z))[0]
        geometry = headers[list(GEOMETRY_COLUMNS)].to_numpy(np.float64, na_value=np.nan)
        z = position_along_normal(geometry[:, :3], geometry[:, 3:], key.to_numpy())[0]
    no_z = np.isnan(z)
    key, counts = _series_keys(headers, image_id, no_z)

    codes = pd.factorize(key)[0]
    order = np.lexsort((np.where(no_z, 0.0, z), codes))  # stable: ties stay in input order
    tied = (codes[order][1:] == codes[order][:-1]) & (z[order][1:] == z[order][:-1])
    if tied.any():
        order = _break_ties(order, tied, image_id)
    n_in = np.bincount(codes)
    step = np.arange(len(order))
    sorted_pos = step - (np.cumsum(n_in) - n_in)[codes[order]]
    sorted_n = n_in[codes[order]]
    position, prev_row, next_row = (np.empty(len(order), dtype=np.int64) for _ in range(3))
    position[order] = sorted_pos
    prev_row[order] = order[np.where(sorted_pos > 0, step - 1, step)]
    next_row[order] = order[np.where(sorted_pos < sorted_n - 1, step + 1, step)]
    table = pd.DataFrame(
        {
            "series": key.array,
            "z": z,
            "position": position,
            "n_in_series": n_in[codes].astype(np.int64),
            "prev_id": image_id.take(prev_row).array,
            "next_id": image_id.take(next_row).array,
        },
        index=pd.Index(image_id.array, name="image_id"),
    )
    table.attrs.update(ties=int(tied.sum()), missing_z=int(no_z.sum()), n_series=len(n_in), **counts)
    return table


def _neighbour_rows(order: pd.DataFrame, radius: int) -> dict[int, np.ndarray]:
    """Row number (into `order`) of each row's neighbour at every offset."""
    if isinstance(radius, bool) or not isinstance(radius, numbers.Integral) or radius < 0:
        raise ValueError(f"radius must be a non-negative int, got {radius!r}")
    if not isinstance(order, pd.DataFrame) or not {"series", "position"} <= set(order.columns):
        raise ValueError("order must be order_slices' table (columns series and position)")
    codes = pd.factorize(order["series"])[0]
    if (codes < 0).any():
        raise ValueError(f"order has {int((codes < 0).sum())} rows without a series")
    position = order["position"].to_numpy()
    rows = np.lexsort((position, codes))
    n_in = np.bincount(codes)
    start = (np.cumsum(n_in) - n_in)[codes]
    # order_slices' positions run 0..n-1 in every series; anything else would send an
    # offset into the neighbouring series.
    if not np.array_equal(position[rows], np.arange(len(rows)) - start[rows]):
        raise ValueError("positions are not 0..n-1 within each series; use order_slices' output")
    last = n_in[codes] - 1
    return {offset: rows[start + np.clip(position + offset, 0, last)] for offset in range(-radius, radius + 1)}


def neighbour_ids(order: pd.DataFrame, radius: int = 1) -> pd.DataFrame:
    """Image IDs at offsets -radius..+radius along each slice's series (columns named by
    the offset, an int); beyond an edge the nearest slice of the series repeats."""
    ids = pd.Series(order.index.array)
    columns = {k: ids.take(rows).array for k, rows in _neighbour_rows(order, radius).items()}
    return pd.DataFrame(columns, index=order.index)


def neighbour_paths(order: pd.DataFrame, paths: pd.Series, radius: int = 1) -> pd.DataFrame:
    """neighbour_ids mapped to file paths, for stacking neighbours as channels: `paths` is
    indexed by image_id (``headers.set_index("image_id")["path"]``) and must cover `order`."""
    if not isinstance(paths, pd.Series):
        raise TypeError(f"paths must be a Series indexed by image_id, got {type(paths).__name__}")
    if paths.index.has_duplicates:
        repeated = paths.index[paths.index.duplicated()].unique()
        raise ValueError(f"paths has repeated image IDs: {format_examples(repeated)}")
    at = paths.index.get_indexer(order.index)
    if (at < 0).any():
        raise ValueError(f"paths lacks {int((at < 0).sum())} images of order: {format_examples(order.index[at < 0])}")
    own = pd.Series(paths.astype("str").array).take(at).reset_index(drop=True)
    columns = {k: own.take(rows).array for k, rows in _neighbour_rows(order, radius).items()}
    return pd.DataFrame(columns, index=order.index)
