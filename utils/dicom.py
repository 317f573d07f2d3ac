"""Read one CT slice to Hounsfield units, window it into uint8 channels, scan headers.

The hot path (``read_windowed``) never builds a float image: the stored values of a slice
index a look-up table that maps every possible stored value straight to its windowed
bytes, all channels packed in one machine word, so one gather does all the work.
Uncompressed files are parsed by a small reader of our own (pydicom's generic
machinery costs more than the rest of the path together); anything it does not
recognise goes to pydicom, which stays the reference.
"""
from __future__ import annotations

import functools
import os
import struct
import threading
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom

# Windows as (center, width) in Hounsfield units.
BRAIN = (40.0, 80.0)
SUBDURAL = (80.0, 200.0)
SOFT_TISSUE = (40.0, 380.0)
BONE = (600.0, 2800.0)
HEADER = "header"  # the file's own first WindowCenter/WindowWidth
DEFAULT_WINDOWS = (BRAIN, SUBDURAL, SOFT_TISSUE)
NAMED_WINDOWS = {"brain": BRAIN, "subdural": SUBDURAL, "soft_tissue": SOFT_TISSUE,
                 "bone": BONE, "header": HEADER}

# RSNA files with 12 stored bits, unsigned pixels and an intercept near 0 hold HU with
# negative values wrapped modulo 4096; -100 separates them from the usual -1024/-1000.
WRAP_INTERCEPT_THRESHOLD = -100.0

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
UNCOMPRESSED = {EXPLICIT_LE, IMPLICIT_LE}

_UI_WARNING = "Invalid value for VR UI"  # RSNA IDs such as ID_abc are not UIDs


class DicomError(Exception):
    """A DICOM file that cannot be used; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class Header:
    """What the pipeline needs of one file, without its pixels."""

    image_id: str
    patient_id: str
    study_uid: str
    series_uid: str
    z: float  # ImagePositionPatient[2]; NaN when absent
    rows: int
    columns: int
    samples_per_pixel: int
    photometric: str
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    rescale_intercept: float
    rescale_slope: float
    window_center: float  # first value; NaN when absent
    window_width: float
    multi_window: bool  # the file lists several windows
    pixel_spacing: float  # row spacing in mm; NaN when absent
    transfer_syntax: str

    @property
    def wrapped_12bit(self) -> bool:
        return (self.bits_stored == 12 and self.pixel_representation == 0
                and self.rescale_intercept > WRAP_INTERCEPT_THRESHOLD)


# ---------------------------------------------------------------------------------------
# Windowing: small pure functions, the reference for the look-up tables below.

def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map HU to uint8: 0 at center - width/2 and below, 255 at center + width/2 and above.

    Values in between are linear and rounded half up. A width of 0 (it occurs in broken
    headers) is a threshold at the center rather than a division by zero.
    """
    hu = np.asarray(hu, dtype=np.float64)
    if width < 0:
        raise ValueError(f"window width must be >= 0, got {width}")
    if width == 0:
        return np.where(hu > center, 255, 0).astype(np.uint8)
    scaled = (hu - (center - width / 2.0)) * (255.0 / width)
    return np.floor(np.clip(scaled, 0.0, 255.0) + 0.5).astype(np.uint8)


def parse_windows(spec: str) -> tuple:
    """'brain,subdural,soft_tissue' or '40/80,600/2800,header' -> a windows tuple."""
    out = []
    for part in spec.split(","):
        part = part.strip().lower()
        if part in NAMED_WINDOWS:
            out.append(NAMED_WINDOWS[part])
        elif "/" in part:
            center, width = part.split("/", 1)
            out.append((float(center), float(width)))
        else:
            raise ValueError(f"unknown window {part!r}: use {sorted(NAMED_WINDOWS)} or CENTER/WIDTH")
    if not out:
        raise ValueError("no window given")
    return tuple(out)


# ---------------------------------------------------------------------------------------
# A minimal reader for uncompressed little-endian files, the layout of every RSNA file.

_TEXT = {(0x0010, 0x0020): "PatientID", (0x0020, 0x000D): "StudyInstanceUID",
         (0x0020, 0x000E): "SeriesInstanceUID", (0x0008, 0x0018): "SOPInstanceUID",
         (0x0020, 0x0032): "ImagePositionPatient", (0x0028, 0x0004): "PhotometricInterpretation",
         (0x0028, 0x0030): "PixelSpacing", (0x0028, 0x1050): "WindowCenter",
         (0x0028, 0x1051): "WindowWidth", (0x0028, 0x1052): "RescaleIntercept",
         (0x0028, 0x1053): "RescaleSlope"}
_US_NAMES = {(0x0028, 0x0002): "SamplesPerPixel", (0x0028, 0x0010): "Rows",
             (0x0028, 0x0011): "Columns", (0x0028, 0x0100): "BitsAllocated",
             (0x0028, 0x0101): "BitsStored", (0x0028, 0x0103): "PixelRepresentation"}
_LONG_VR = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT",
            b"SV", b"UV"}
_PIXEL_DATA = (0x7FE0, 0x0010)
_UNDEFINED = 0xFFFFFFFF


class _NotSimple(Exception):
    """The file needs pydicom's general reader (compressed, sequences, big endian...)."""


_EXPLICIT_ELEMENT = struct.Struct("<HH2sH").unpack_from  # group, element, VR, short length
_IMPLICIT_ELEMENT = struct.Struct("<HHI").unpack_from  # group, element, length
_U32 = struct.Struct("<I").unpack_from
_U16 = struct.Struct("<H").unpack_from


def _parse_simple(buf) -> tuple[dict, str, int, int]:
    """Parse a Part-10 uncompressed LE file: (tag values, syntax, pixel offset, length).

    ``buf`` is bytes or a memoryview holding the file from its start. Raises _NotSimple
    for anything outside that layout and ValueError for a file that ends inside an
    element (a truncated file).
    """
    n = len(buf)
    if n < 132 or bytes(buf[128:132]) != b"DICM":
        raise _NotSimple
    pos, syntax, values = 132, None, {}
    explicit = True  # the file meta group always is; the dataset follows its syntax
    while pos + 8 <= n:
        if explicit:
            group, elem, vr, length = _EXPLICIT_ELEMENT(buf, pos)
            if group != 0x0002 and syntax == IMPLICIT_LE:
                explicit = False
                continue  # read this element again, as implicit VR
            if vr in _LONG_VR:
                if pos + 12 > n:
                    break
                length, = _U32(buf, pos + 8)
                pos += 12
            elif 65 <= vr[0] <= 90 and 65 <= vr[1] <= 90:
                pos += 8
            else:
                raise _NotSimple
        else:
            group, elem, length = _IMPLICIT_ELEMENT(buf, pos)
            pos += 8
        if group != 0x0002 and syntax is None:
            raise _NotSimple  # no transfer syntax in the meta group
        tag = (group, elem)
        if tag == _PIXEL_DATA:
            if length == _UNDEFINED:
                raise _NotSimple  # encapsulated (compressed) pixel data
            return values, syntax, pos, length
        if length == _UNDEFINED:
            raise _NotSimple  # sequence of undefined length
        if pos + length > n:
            raise ValueError(f"file ends inside element ({group:04X},{elem:04X})")
        if tag == (0x0002, 0x0010):
            syntax = bytes(buf[pos:pos + length]).rstrip(b"\x00 ").decode("ascii", "replace")
            if syntax not in UNCOMPRESSED:
                raise _NotSimple
        elif tag in _US_NAMES:
            if length != 2:
                raise _NotSimple
            values[_US_NAMES[tag]] = _U16(buf, pos)[0]
        elif tag in _TEXT:
            values[_TEXT[tag]] = bytes(buf[pos:pos + length]).decode("latin-1").strip("\x00 ")
        pos += length
    raise ValueError("file ends before the pixel data")


def _first_float(text, default=float("nan")) -> float:
    if text is None or text == "":
        return default
    return float(str(text).split("\\")[0])


def _header_from_values(path: Path, v: dict, syntax: str) -> Header:
    """Build a Header from tag values given as DICOM text (our reader or pydicom's)."""
    try:
        position = v.get("ImagePositionPatient") or ""
        parts = position.split("\\")
        window_center = v.get("WindowCenter") or ""
        return Header(
            image_id=path.stem,
            patient_id=v.get("PatientID") or "",
            study_uid=v.get("StudyInstanceUID") or "",
            series_uid=v.get("SeriesInstanceUID") or "",
            z=float(parts[2]) if len(parts) == 3 and parts[2] else float("nan"),
            rows=int(v["Rows"]), columns=int(v["Columns"]),
            samples_per_pixel=int(v.get("SamplesPerPixel", 1)),
            photometric=v.get("PhotometricInterpretation") or "MONOCHROME2",
            bits_allocated=int(v["BitsAllocated"]), bits_stored=int(v["BitsStored"]),
            pixel_representation=int(v["PixelRepresentation"]),
            rescale_intercept=_first_float(v.get("RescaleIntercept"), 0.0),
            rescale_slope=_first_float(v.get("RescaleSlope"), 1.0),
            window_center=_first_float(window_center),
            window_width=_first_float(v.get("WindowWidth")),
            multi_window="\\" in window_center,
            pixel_spacing=_first_float(v.get("PixelSpacing")),
            transfer_syntax=syntax,
        )
    except KeyError as missing:
        raise DicomError(path, f"missing required tag {missing.args[0]}") from None
    except ValueError as err:
        raise DicomError(path, f"unreadable header value ({err})") from None


def _pydicom_text(ds, name: str):
    if name not in ds:
        return None
    value = ds[name].value
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(x) for x in value)
    return str(value)


def _read_pydicom(path: Path, stop_before_pixels: bool):
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_UI_WARNING)
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
            syntax = str(ds.file_meta.TransferSyntaxUID)
            values = {name: _pydicom_text(ds, name) for name in (*_TEXT.values(), *_US_NAMES.values())}
    except (pydicom.errors.InvalidDicomError, EOFError) as err:
        raise DicomError(path, f"not a DICOM file ({err})") from None
    except (OSError, AttributeError, ValueError, KeyError, struct.error) as err:
        raise DicomError(path, f"unreadable DICOM ({type(err).__name__}: {err})") from None
    values = {k: v for k, v in values.items() if v is not None}
    return ds, _header_from_values(path, values, syntax)


def _check_geometry(path: Path, h: Header) -> None:
    if h.rows <= 0 or h.columns <= 0:
        raise DicomError(path, f"image size {h.rows}x{h.columns} is empty")
    if h.samples_per_pixel != 1:
        raise DicomError(path, f"{h.samples_per_pixel} samples per pixel; a CT slice has 1")
    if h.bits_allocated not in (8, 16) or not 1 <= h.bits_stored <= h.bits_allocated:
        raise DicomError(path, f"unsupported BitsAllocated {h.bits_allocated} / BitsStored {h.bits_stored}")


_HEAD_BYTES = 16384  # RSNA headers take about 1.2 kB; longer ones are read whole
_scratch = threading.local()  # per-thread buffers, reused from one slice to the next


def _scratch_array(name: str, nbytes: int) -> np.ndarray:
    """A reusable byte buffer. Fresh 0.5 MB arrays cost more in page faults than the
    whole look-up does, so the hot path reads into, and gathers into, these instead."""
    buf = getattr(_scratch, name, None)
    if buf is None or buf.size < nbytes:
        buf = np.empty(nbytes, np.uint8)
        setattr(_scratch, name, buf)
    return buf[:nbytes]


def _read_head(path: Path, f, size: int) -> tuple[dict, str, int, int]:
    """Parse an open file up to its pixel data (see _parse_simple) reading little of it."""
    buf = f.read(_HEAD_BYTES)
    if not buf:
        raise DicomError(path, "file is empty")
    try:
        return _parse_simple(buf)
    except ValueError:
        if len(buf) == size:
            raise
        f.seek(0)
        return _parse_simple(f.read())


def _check_pixel_length(path: Path, h: Header, have: int) -> int:
    """Check the geometry and that ``have`` bytes of pixel data hold the image; its size."""
    _check_geometry(path, h)
    need = h.rows * h.columns * (h.bits_allocated // 8)
    if have < need:
        raise DicomError(path, f"pixel data is short: {have} bytes, the header's "
                               f"{h.rows}x{h.columns}x{h.bits_allocated}-bit image needs {need}")
    return need


def _read_raw(path) -> tuple[Header, np.ndarray]:
    """The header and the stored values as raw unsigned codes for the look-up tables.

    The whole file is read with one call into a scratch buffer that the next call on
    this thread overwrites; the codes returned are a view of it.
    """
    path = Path(path)
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            buf = _scratch_array("file", size)
            got = f.readinto(buf)
    except OSError as err:
        raise DicomError(path, f"cannot read file ({err.strerror or err})") from None
    if got == 0:
        raise DicomError(path, "file is empty")
    try:
        values, syntax, offset, length = _parse_simple(memoryview(buf)[:got])
    except ValueError as err:
        raise DicomError(path, f"truncated file: {err}") from None
    except _NotSimple:
        return _read_raw_pydicom(path)
    h = _header_from_values(path, values, syntax)
    need = _check_pixel_length(path, h, min(length, got - offset))
    codes = buf[offset:offset + need]
    return h, codes.view(np.uint8 if h.bits_allocated == 8 else "<u2").reshape(h.rows, h.columns)


def _read_raw_pydicom(path: Path) -> tuple[Header, np.ndarray]:
    ds, h = _read_pydicom(path, stop_before_pixels=False)
    _check_geometry(path, h)
    if "PixelData" not in ds:
        raise DicomError(path, "no pixel data")
    if h.transfer_syntax not in UNCOMPRESSED and h.transfer_syntax != RLE_LOSSLESS:
        decoder = pydicom.pixels.get_decoder(h.transfer_syntax)
        if not decoder.is_available:
            needs = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
            raise DicomError(path, f"transfer syntax {ds.file_meta.TransferSyntaxUID.name} needs a "
                                   f"decoder that is not installed: {needs}")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_UI_WARNING)
            # raw=True: stored values without pydicom's sign/bit handling, which our LUT does
            arr = pydicom.pixels.pixel_array(ds, raw=True)
    except Exception as err:  # decoders raise many types; all mean "pixels unusable"
        raise DicomError(path, f"cannot decode pixel data ({type(err).__name__}: {err})") from None
    if arr.shape != (h.rows, h.columns):
        raise DicomError(path, f"pixel data has shape {arr.shape}, header says {h.rows}x{h.columns}")
    code_dtype = np.uint8 if h.bits_allocated == 8 else np.uint16
    return h, arr.view(code_dtype) if arr.dtype.itemsize == np.dtype(code_dtype).itemsize \
        else arr.astype(code_dtype)


# ---------------------------------------------------------------------------------------
# Look-up tables from stored codes to HU and to windowed bytes.

@functools.lru_cache(maxsize=256)
def _hu_lut(bits_allocated: int, bits_stored: int, signed: bool, slope: float,
            intercept: float) -> np.ndarray:
    """HU for every possible stored code, masked and sign-extended as pydicom does."""
    codes = np.arange(1 << bits_allocated, dtype=np.int64)
    values = codes & ((1 << bits_stored) - 1)
    if signed:
        values = np.where(values >= 1 << (bits_stored - 1), values - (1 << bits_stored), values)
    if bits_stored == 12 and not signed and intercept > WRAP_INTERCEPT_THRESHOLD:
        values = values + 1000
        values = np.where(values >= 4096, values - 4096, values)
        intercept = -1000.0
    hu = values.astype(np.float64) * slope + intercept
    hu.flags.writeable = False
    return hu


def _lut_key(h: Header) -> tuple:
    return (h.bits_allocated, h.bits_stored, h.pixel_representation == 1,
            h.rescale_slope, h.rescale_intercept)


def _resolve_windows(windows, h: Header, path) -> tuple:
    out = []
    for w in windows:
        if w == HEADER:
            if not (np.isfinite(h.window_center) and np.isfinite(h.window_width)):
                raise DicomError(path, "the header window was asked for but the file has none")
            out.append((h.window_center, h.window_width))
        else:
            out.append((float(w[0]), float(w[1])))
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _packed_lut(lut_key: tuple, windows: tuple, invert: bool) -> np.ndarray:
    """Windowed bytes of every channel for every stored code, packed into one word.

    One gather of a uint32 (or uint64) table is several times faster than one gather
    per channel, and the packed words view as an (H, W, 4 or 8) uint8 image for free.
    """
    hu = _hu_lut(*lut_key)
    width = 4 if len(windows) <= 4 else 8
    table = np.zeros((hu.size, width), dtype=np.uint8)
    for c, (center, win_width) in enumerate(windows):
        table[:, c] = window(hu, center, win_width)
        if invert:
            table[:, c] = 255 - table[:, c]
    packed = table.view(np.uint32 if width == 4 else np.uint64).ravel()
    packed.flags.writeable = False
    return packed


# ---------------------------------------------------------------------------------------
# Public readers.

def read_header(path) -> Header:
    """The header of one file, reading only as far as the pixel data where it can."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            try:
                values, syntax, offset, length = _read_head(path, f, size)
            except ValueError as err:
                raise DicomError(path, f"truncated file: {err}") from None
            except _NotSimple:
                values = None
    except OSError as err:
        raise DicomError(path, f"cannot read file ({err.strerror or err})") from None
    if values is None:
        h = _read_pydicom(path, stop_before_pixels=True)[1]
        _check_geometry(path, h)
        return h
    h = _header_from_values(path, values, syntax)
    _check_pixel_length(path, h, min(length, size - offset))
    return h


def read_hu(path) -> np.ndarray:
    """Hounsfield units (float32, H x W) after the rescale and the RSNA 12-bit fix."""
    h, raw = _read_raw(path)
    return _hu_lut(*_lut_key(h)).astype(np.float32)[raw]


def _square(img: np.ndarray) -> np.ndarray:
    """Pad a non-square image to a square, centred, with 0 (air in every window).

    Padding keeps the anatomy's aspect ratio and all of it in view; cropping could cut
    off a peripheral bleed (an epidural or subdural sits at the skull's edge).
    """
    rows, cols = img.shape[:2]
    if rows == cols:
        return img
    side = max(rows, cols)
    out = np.zeros((side, side) + img.shape[2:], dtype=img.dtype)
    top, left = (side - rows) // 2, (side - cols) // 2
    out[top:top + rows, left:left + cols] = img
    return out


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] == size and img.shape[1] == size:
        return img
    # INTER_AREA averages when shrinking (no aliasing of thin bleeds); linear when growing.
    interp = cv2.INTER_AREA if size < img.shape[0] else cv2.INTER_LINEAR
    if img.shape[2] <= 4:
        out = cv2.resize(img, (size, size), interpolation=interp)
        return out if out.ndim == 3 else out[:, :, None]
    return np.stack([cv2.resize(np.ascontiguousarray(img[:, :, c]), (size, size),
                                interpolation=interp) for c in range(img.shape[2])], axis=2)


def read_windowed(path, windows=DEFAULT_WINDOWS, size: int | None = None) -> np.ndarray:
    """One slice as a uint8 (H, W, C) image, a channel per (center, width) window.

    With ``size`` the image is padded to a square and resized to size x size. MONOCHROME1
    is inverted so that bright always means dense.
    """
    h, raw = _read_raw(path)
    windows = _resolve_windows(windows, h, path)
    packed = _packed_lut(_lut_key(h), windows, h.photometric == "MONOCHROME1")
    words = _scratch_array("words", raw.size * packed.itemsize).view(packed.dtype)
    np.take(packed, raw.ravel(), out=words, mode="clip")  # codes are always in range
    img = words.view(np.uint8).reshape(h.rows, h.columns, packed.itemsize)
    if size is not None:
        img = _resize(_square(img), int(size))
    img = _first_channels(img, len(windows))
    return img.copy() if np.shares_memory(img, words) else img  # never hand out scratch


def _first_channels(img: np.ndarray, n: int) -> np.ndarray:
    # numpy's strided copy of 3 of 4 bytes is ~60x slower than OpenCV's BGRA->BGR.
    if n == img.shape[2]:
        return img
    if n == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    if n == 1:
        return cv2.extractChannel(img, 0)[:, :, None] if img.shape[2] <= 4 \
            else np.ascontiguousarray(img[:, :, :1])
    return np.ascontiguousarray(img[:, :, :n])


# ---------------------------------------------------------------------------------------
# Header scan of a whole folder, parallel and cached.

HEADER_COLUMNS = [f.name for f in fields(Header)]
_COLUMN_TYPES = {"str": "str", "int": "int64", "float": "float64", "bool": "bool"}


def _scan_chunk(paths: list[str]) -> list[tuple[str, dict | None, str]]:
    out = []
    for p in paths:
        try:
            out.append((p, asdict(read_header(p)), ""))
        except DicomError as err:
            out.append((p, None, err.reason))
    return out


def scan_headers(paths, workers: int = 0, cache: str | Path | None = None,
                 parallel_min: int = 2000):
    """Headers of many files -> (headers DataFrame, bad files DataFrame[path, reason]).

    Files are read in ``workers`` processes when there are at least ``parallel_min`` of
    them (below that, starting processes costs more than it saves). With ``cache`` (a parquet
    file) rows of files whose size and modification time are unchanged are reused.
    """
    paths = [str(p) for p in paths]
    stats = {}
    for p in paths:
        try:
            st = os.stat(p)
            stats[p] = (st.st_size, st.st_mtime_ns)
        except OSError:
            stats[p] = (-1, -1)
    cached = {}
    if cache is not None and Path(cache).is_file():
        old = pd.read_parquet(cache)
        for row in old.to_dict("records"):
            if stats.get(row["path"]) == (row["file_size"], row["mtime_ns"]):
                cached[row["path"]] = row
    todo = [p for p in paths if p not in cached]
    results = []
    if todo:
        if workers > 1 and len(todo) >= parallel_min:
            chunk = max(64, len(todo) // (workers * 16))
            chunks = [todo[i:i + chunk] for i in range(0, len(todo), chunk)]
            with ProcessPoolExecutor(workers) as pool:
                for part in pool.map(_scan_chunk, chunks):
                    results.extend(part)
        else:
            results = _scan_chunk(todo)
    rows = []
    for p, header, reason in results:
        row = {"path": p, "file_size": stats[p][0], "mtime_ns": stats[p][1], "error": reason}
        row.update(header or {c: None for c in HEADER_COLUMNS})
        if header is None:
            row["image_id"] = Path(p).stem
        rows.append(row)
    rows.extend(cached[p] for p in paths if p in cached)
    table = pd.DataFrame(rows, columns=["path", "file_size", "mtime_ns", "error", *HEADER_COLUMNS])
    order = {p: i for i, p in enumerate(paths)}
    table = table.sort_values("path", key=lambda s: s.map(order)).reset_index(drop=True)
    if cache is not None:
        tmp = Path(str(cache) + ".tmp")
        table.to_parquet(tmp, index=False)
        os.replace(tmp, cache)
    bad = table.loc[table["error"] != "", ["path", "error"]].rename(columns={"error": "reason"})
    good = table.loc[table["error"] == "", ["path", *HEADER_COLUMNS]].reset_index(drop=True)
    # Unreadable rows held None in every column; the readable ones get their real types back.
    good = good.astype({f.name: _COLUMN_TYPES[f.type] for f in fields(Header)})
    return good, bad.reset_index(drop=True)
