"""NIfTI volumes of head CT: their slices in Hounsfield units, as an axial DICOM slice shows them.

    if is_nifti(path):
        volume = read_volume(path)                  # NiftiError if no CT volume in HU
        img, box = read_slice_windowed(path, k, size=256)  # slice k, inferior first

- Found by content: a NIfTI-1 (sizeof_hdr 348, magic "n+1") or NIfTI-2 (540, "n+2") file,
  gzip-compressed or not, whatever its name. A header with a separate .img ("ni1") is skipped.
- The slices run along the voxel axis nearest the patient's superior direction (nibabel's
  io_orientation of the affine). Each slice is turned into the orientation the model was
  trained on, that of an axial DICOM slice as radiology shows it: rows from anterior to
  posterior, columns from the patient's right to left; slice 0 is the most inferior. Its
  position and orientation are given in DICOM's patient coordinates (LPS, mm), so a volume
  is ordered along its normal like any series (utils.scans).
- Values are the stored ones after scl_slope/scl_inter (nibabel applies them): HU. A volume
  whose air is not near -1000 (an MR, CT stored without its rescale) is skipped, as are 4-D
  files and a volume whose slice axis is more than utils.slices' MAX_TILT_DEGREES from axial.
- Memory: an uncompressed file is memory-mapped and a slice read alone; a gzip-compressed one
  is decompressed whole (gzip cannot seek), and the last such volume is kept per process.
nibabel is optional: without it NIfTI files are skipped with that reason.
"""
from __future__ import annotations

import functools
import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.dicom import DEFAULT_WINDOWS, DicomError, _reading, windowed_hu
from utils.slices import MAX_TILT_DEGREES

AIR_HU = (-1100.0, -900.0)  # air in a CT in HU reads about -1000
MIN_AIR_SHARE = 0.02  # of the voxels sampled; a head CT's field of view is a third or more air
_SAMPLE_SLICES = 16  # slices sampled for the HU check
_MAGIC = {348: (344, (b"n+1\x00",), b"ni1\x00"), 540: (4, (b"n+2\x00\r\n\x1a\n",), b"ni2\x00\r\n\x1a\n")}


class NiftiError(DicomError):
    """A NIfTI file that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class Volume:
    """What read_volume finds: a slice per row, inferior first."""

    kind: str  # "NIfTI-1", "NIfTI-2 (gzip)"...
    shape: tuple[int, int, int]  # rows, columns, slices, after reorientation
    positions: np.ndarray  # (slices, 3): each slice's first pixel in LPS mm
    orientation: tuple[float, ...]  # row then column direction cosines in LPS, as DICOM's
    axes: tuple  # (slice axis, flip), (row axis, flip), (column axis, flip) of the stored array


def nifti_kind(head: bytes) -> str:
    """"NIfTI-1", "NIfTI-2", "NIfTI pair" (a .hdr with its .img apart) or "" from a file's
    first bytes (decompressed when gzip)."""
    for size, (at, single, pair) in _MAGIC.items():
        if len(head) >= at + len(pair) and size in (struct.unpack_from("<i", head)[0], struct.unpack_from(">i", head)[0]):
            magic = head[at:at + len(pair)]
            if magic in single:
                return f"NIfTI-{1 if size == 348 else 2}"
            if magic == pair:
                return "NIfTI pair"
    return ""


def sniff(path) -> str:
    """nifti_kind of a file, with " (gzip)" when compressed; "" for any other file."""
    try:
        with open(path, "rb") as f:
            head = f.read(548)
        if head[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as g:
                kind = nifti_kind(g.read(548))
            return f"{kind} (gzip)" if kind else ""
        return nifti_kind(head)
    except (OSError, EOFError, struct.error, zlib.error):  # a damaged gzip stream is no NIfTI we read
        return ""


def read_volume(path) -> Volume:
    """The slices of a NIfTI CT volume; NiftiError naming the file and the reason when it
    is none we can read (see the module docstring)."""
    path = Path(path)
    with _reading(path):
        st = os.stat(path)
        return _volume(str(path), st.st_size, st.st_mtime_ns)[0]


def read_slice_hu(path, index: int) -> np.ndarray:
    """Slice ``index`` (0: the most inferior) in HU, float64, rows anterior to posterior and
    columns right to left."""
    path = Path(path)
    with _reading(path):
        st = os.stat(path)
        volume, data, scale = _volume(str(path), st.st_size, st.st_mtime_ns)
        return _slice(path, volume, data, scale, index)


def read_slice_windowed(path, index: int, windows=DEFAULT_WINDOWS, size: int | None = None, crop=None):
    """Slice ``index`` as utils.dicom.read_windowed_box gives a DICOM slice: the image and
    the box it was cut to."""
    return windowed_hu(path, read_slice_hu(path, index), windows, size, crop)


def _load(path: str, kind: str):
    """nibabel's image of the file, read by content whatever its name: a gzip file is
    decompressed here (nibabel tells compression by the extension)."""
    try:
        import nibabel
    except ImportError:
        raise NiftiError(path, "a NIfTI volume, and nibabel is not installed (pip install nibabel)") from None
    image_class = nibabel.Nifti2Image if kind.startswith("NIfTI-2") else nibabel.Nifti1Image
    try:
        if "gzip" in kind:
            with gzip.open(path, "rb") as f:
                return nibabel, image_class.from_bytes(f.read())
        holder = nibabel.fileholders.FileHolder(filename=path)  # opened by name at each read: safe in workers
        return nibabel, image_class.from_file_map({"header": holder, "image": holder})
    except Exception as err:  # noqa: BLE001 - a damaged header or stream: any of nibabel's errors
        raise NiftiError(path, f"unreadable NIfTI ({type(err).__name__}: {str(err)[:160]})") from None


@functools.lru_cache(maxsize=1)
def _volume(path: str, size: int, mtime_ns: int) -> tuple[Volume, object, tuple[float, float]]:
    """read_volume's work; with the stored data (a memory-mapped proxy, or the decompressed
    array of a gzip file) and the (slope, intercept) that makes it HU."""
    kind = sniff(path)
    if not kind or kind.startswith("NIfTI pair"):
        raise NiftiError(path, "a NIfTI header whose image is a separate .img file: save it as one .nii"
                         if kind else "not a NIfTI-1 or NIfTI-2 file")
    nibabel, img = _load(path, kind)
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3 or min(shape) < 1:
        raise NiftiError(path, f"image of shape {tuple(img.shape)}: not one 3-D volume")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise NiftiError(path, "its affine is damaged (not finite or not invertible)")
    axes = _axes(nibabel.orientations.io_orientation(affine))
    volume = _geometry(path, kind, affine, shape, axes)
    proxy = img.dataobj
    scale = (float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0)))
    data = np.asarray(proxy.get_unscaled()) if "gzip" in kind else proxy
    data = data.reshape(shape) if data.shape != shape else data
    _check_hu(path, volume, data, scale)
    return volume, data, scale


def _axes(ornt: np.ndarray) -> tuple:
    """((slice axis, flip), (row axis, flip), (column axis, flip)) of the stored array:
    slices inferior to superior, rows anterior to posterior, columns right to left. nibabel's
    orientation: stored axis i points along RAS world axis ornt[i, 0], ornt[i, 1] = -1 when
    it runs the other way (toward L, P, I)."""
    by_world = {int(w): (axis, int(sign)) for axis, (w, sign) in enumerate(ornt[:3])}
    (s, s_sign), (r, r_sign), (c, c_sign) = by_world[2], by_world[1], by_world[0]
    return (s, s_sign < 0), (r, r_sign > 0), (c, c_sign > 0)  # flip toward I, toward A, toward R


def _geometry(path: str, kind: str, affine: np.ndarray, shape: tuple, axes: tuple) -> Volume:
    (s, s_flip), (r, r_flip), (c, c_flip) = axes
    lps = np.diag([-1.0, -1.0, 1.0])
    direction = lambda axis, flip: lps @ affine[:3, axis] / np.linalg.norm(affine[:3, axis]) * (-1 if flip else 1)  # noqa: E731
    row_cosines, column_cosines = direction(c, c_flip), direction(r, r_flip)  # DICOM: along a row, down a column
    normal = np.cross(row_cosines, column_cosines)
    tilt = math.degrees(math.acos(min(1.0, abs(normal[2]) / np.linalg.norm(normal))))
    if tilt > MAX_TILT_DEGREES:
        raise NiftiError(path, f"its slices nearest to axial are {tilt:.0f} degrees from axial: the model reads axial slices")
    first = np.zeros((shape[s], 4))
    first[:, 3] = 1
    first[:, r] = shape[r] - 1 if r_flip else 0
    first[:, c] = shape[c] - 1 if c_flip else 0
    k = np.arange(shape[s])
    first[:, s] = shape[s] - 1 - k if s_flip else k
    positions = (first @ affine.T)[:, :3] @ lps
    return Volume(kind=kind, shape=(shape[r], shape[c], shape[s]), positions=positions,
                  orientation=tuple(float(x) for x in (*row_cosines, *column_cosines)), axes=axes)


def _slice(path, volume: Volume, data, scale: tuple[float, float], index: int) -> np.ndarray:
    """Slice ``index`` of the stored data in HU, turned as the module docstring says."""
    (s, s_flip), (r, r_flip), (c, c_flip) = volume.axes
    n = data.shape[s]
    if not 0 <= index < n:
        raise NiftiError(path, f"no slice {index}: the volume has {n}")
    at = [slice(None)] * 3
    at[s] = n - 1 - index if s_flip else index
    plane = np.asarray(data[tuple(at)], dtype=np.float64)
    if r > c:  # the two axes left keep their stored order: rows must come first
        plane = plane.T
    plane = plane[::-1] if r_flip else plane
    plane = plane[:, ::-1] if c_flip else plane
    slope, intercept = scale
    return np.ascontiguousarray(plane * slope + intercept)


def _check_hu(path: str, volume: Volume, data, scale: tuple[float, float]) -> None:
    """A CT in HU has air near -1000; an MR or CT stored without its rescale has none."""
    s = volume.axes[0][0]
    picks = np.unique(np.linspace(0, data.shape[s] - 1, min(_SAMPLE_SLICES, data.shape[s])).astype(int))
    values = np.concatenate([_slice(path, volume, data, scale, int(i))[::4, ::4].ravel() for i in picks])
    finite = values[np.isfinite(values)]
    share = float(np.mean((finite >= AIR_HU[0]) & (finite <= AIR_HU[1]))) if finite.size else 0.0
    if share < MIN_AIR_SHARE:
        low, high = (np.percentile(finite, [1, 99]) if finite.size else (math.nan, math.nan))
        raise NiftiError(path, f"does not look like CT in Hounsfield units: {share:.1%} of its voxels are near -1000 "
                               f"(air), at least {MIN_AIR_SHARE:.0%} expected; its values run from {low:g} to {high:g}")
