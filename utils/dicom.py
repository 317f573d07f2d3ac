"""Read one CT slice to Hounsfield units, window it into uint8 channels, read its header.

The hot path (``read_windowed``) never builds a float image: the stored values of a slice
index a look-up table that maps every possible stored value straight to its windowed
bytes, all channels packed in one machine word, so one gather does all the work.
Uncompressed files are parsed by a small reader of our own (pydicom's generic
machinery costs more than the rest of the path together); anything it does not
recognise goes to pydicom, which stays the reference. ``read_slice_info`` reads, on the
same path, what places a file among a folder's scans (utils.scans); utils.headers scans
many files' headers.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import struct
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom

from utils.crop import HEAD_HU, Box, crop_square, head_box, sampled

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
MAX_WINDOWS = 8  # the packed look-up table holds up to 8 channels in one 64-bit word
MAX_SIDE = 4096  # rows or columns; CT slices are 512, the largest detectors 2048 or so


def wraps_12bit(bits_stored: int, pixel_representation: int, intercept: float) -> bool:
    """The RSNA 12-bit wrap: the one place this rule of the data is written."""
    return bits_stored == 12 and pixel_representation == 0 and intercept > WRAP_INTERCEPT_THRESHOLD

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


class NotPart10(DicomError):
    """A file without b"DICM" at byte 128: no DICOM Part-10 file (read_slice_info)."""


class MultiFrame(DicomError):
    """A file of several frames, or an Enhanced CT file of any number: no single slice
    (utils.multiframe reads Enhanced CT ones)."""


# Enhanced CT files (and Legacy Converted ones) keep each frame's rescale and position in
# functional groups, even a file of one frame: utils.multiframe reads them.
ENHANCED_CT = {"1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT", "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT"}


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
    # the rest of the geometry that orders a series along its normal (utils.slices); NaN when
    # ImagePositionPatient or ImageOrientationPatient is absent
    x: float = math.nan
    y: float = math.nan
    normal_x: float = math.nan
    normal_y: float = math.nan
    normal_z: float = math.nan

    @property
    def wrapped_12bit(self) -> bool:
        return wraps_12bit(self.bits_stored, self.pixel_representation, self.rescale_intercept)


@dataclass(frozen=True)
class SliceInfo:
    """What places a file among a folder's scans, beyond its Header (read_slice_info)."""

    sop_uid: str  # SOPInstanceUID; "" when absent
    modality: str  # Modality, upper case; "" when absent
    image_type: tuple[str, ...]  # ImageType's values, upper case ("ORIGINAL", "LOCALIZER"...)
    series_description: str
    position: tuple[float, float, float] | None  # ImagePositionPatient in mm
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row, then column cosines


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
            center, width = map(float, part.split("/", 1))
            if not (math.isfinite(center) and math.isfinite(width) and width >= 0):
                raise ValueError(f"window {part!r}: the center must be finite and the width >= 0")
            out.append((center, width))
        else:
            raise ValueError(f"unknown window {part!r}: use {sorted(NAMED_WINDOWS)} or CENTER/WIDTH")
    if not out or len(out) > MAX_WINDOWS:
        raise ValueError(f"give 1 to {MAX_WINDOWS} windows, got {len(out)}")
    return tuple(out)


# ---------------------------------------------------------------------------------------
# A minimal reader for uncompressed little-endian files, the layout of every RSNA file.

_TEXT = {(0x0010, 0x0020): "PatientID", (0x0020, 0x000D): "StudyInstanceUID",
         (0x0020, 0x000E): "SeriesInstanceUID", (0x0008, 0x0018): "SOPInstanceUID",
         (0x0020, 0x0032): "ImagePositionPatient", (0x0028, 0x0004): "PhotometricInterpretation",
         (0x0028, 0x0030): "PixelSpacing", (0x0028, 0x1050): "WindowCenter",
         (0x0028, 0x1051): "WindowWidth", (0x0028, 0x1052): "RescaleIntercept",
         (0x0028, 0x1053): "RescaleSlope", (0x0028, 0x0008): "NumberOfFrames",
         (0x0020, 0x0037): "ImageOrientationPatient", (0x0008, 0x0016): "SOPClassUID"}
# Read for read_slice_info: identity and kind. No patient text (name, birth date...) is in
# any table here, so none can reach a scan's outputs.
_SLICE_TEXT = {(0x0008, 0x0008): "ImageType", (0x0008, 0x0060): "Modality",
               (0x0008, 0x103E): "SeriesDescription"}
_ALL_TEXT = {**_TEXT, **_SLICE_TEXT}
_US_NAMES = {(0x0028, 0x0002): "SamplesPerPixel", (0x0028, 0x0010): "Rows",
             (0x0028, 0x0011): "Columns", (0x0028, 0x0100): "BitsAllocated",
             (0x0028, 0x0101): "BitsStored", (0x0028, 0x0103): "PixelRepresentation"}
_LONG_VR = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT",
            b"SV", b"UV"}
_SHORT_VR = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO",
             b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
_VR_NAMES = {vr.decode() for vr in _LONG_VR | _SHORT_VR}
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
            elif vr in _SHORT_VR:
                pos += 8
            else:
                raise _NotSimple  # not a VR of the standard: pydicom decides what it is
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
        elif tag in _ALL_TEXT:
            values[_ALL_TEXT[tag]] = bytes(buf[pos:pos + length]).decode("latin-1").strip("\x00 ")
        pos += length
    raise ValueError("file ends before the pixel data")


class _DamagedElement(Exception):
    """An element pydicom read whose bytes cannot be what the standard allows."""


def _pydicom_text(ds, tag: tuple[int, int]):
    """A tag's value as DICOM text, as our own reader gives it. Text is taken from the raw
    bytes: the values we read are ASCII by definition, and a damaged character set would
    send pydicom's decoder through thousands of escape sequences."""
    if tag not in ds:
        return None
    raw = ds.get_item(tag)
    if raw.VR is not None and raw.VR not in _VR_NAMES:  # None: implicit VR
        raise _DamagedElement(f"its VR {raw.VR!r} is not a DICOM VR")
    if isinstance(raw.value, bytes) and tag in _ALL_TEXT:
        return raw.value.decode("latin-1").strip("\x00 ")
    value = ds[tag].value
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(x) for x in value)
    return str(value)


def _number(path: Path, v: dict, name: str, default: float = float("nan")) -> float:
    """The first value of a numeric tag given as DICOM text; ``default`` when absent."""
    text = v.get(name)
    if text is None or str(text).strip() == "":
        return default
    first = str(text).split("\\")[0].strip()
    try:
        value = float(first)
    except ValueError:
        raise DicomError(path, f"{name} {first[:40]!r} is not a number") from None
    if not math.isfinite(value):
        raise DicomError(path, f"{name} {first[:40]!r} is not a finite number")
    return value


def _whole(path: Path, v: dict, name: str, default: int | None = None) -> int:
    text = v.get(name)
    if text is None or str(text).strip() == "":
        if default is None:
            raise DicomError(path, f"missing required tag {name}")
        return default
    try:
        return int(str(text).strip())
    except ValueError:
        raise DicomError(path, f"{name} {str(text)[:40]!r} is not a whole number") from None


def _header_from_values(path: Path, v: dict, syntax: str, frames_ok: bool = False) -> Header:
    """Build and check a Header from tag values given as DICOM text (ours or pydicom's);
    a file of several frames raises MultiFrame unless ``frames_ok``."""
    window_center = v.get("WindowCenter") or ""
    x, y, z = _numbers(path, v, "ImagePositionPatient", "(0020,0032)", 3) or (math.nan,) * 3
    orientation = _orientation(path, v)
    normal = _cross(orientation[:3], orientation[3:]) if orientation else (math.nan,) * 3
    h = Header(
        image_id=path.stem,
        patient_id=v.get("PatientID") or "",
        study_uid=v.get("StudyInstanceUID") or "",
        series_uid=v.get("SeriesInstanceUID") or "",
        z=z,
        rows=_whole(path, v, "Rows"), columns=_whole(path, v, "Columns"),
        samples_per_pixel=_whole(path, v, "SamplesPerPixel", 1),
        photometric=v.get("PhotometricInterpretation") or "MONOCHROME2",
        bits_allocated=_whole(path, v, "BitsAllocated"), bits_stored=_whole(path, v, "BitsStored"),
        pixel_representation=_whole(path, v, "PixelRepresentation"),
        rescale_intercept=_number(path, v, "RescaleIntercept", 0.0),
        rescale_slope=_number(path, v, "RescaleSlope", 1.0),
        window_center=_number(path, v, "WindowCenter"),
        window_width=_number(path, v, "WindowWidth"),
        multi_window="\\" in window_center,
        pixel_spacing=_number(path, v, "PixelSpacing"),
        transfer_syntax=syntax,
        x=x, y=y, normal_x=normal[0], normal_y=normal[1], normal_z=normal[2],
    )
    _check_meaning(path, h)
    frames = _whole(path, v, "NumberOfFrames", 1)
    if frames < 1:
        raise DicomError(path, f"NumberOfFrames {frames} is not a positive number")
    if frames > 1 and not frames_ok:  # read_hu would otherwise give the first frame as if it were the file
        raise MultiFrame(path, f"{frames} frames (a multi-frame object): not one slice")
    if v.get("SOPClassUID") in ENHANCED_CT and not frames_ok:  # its top-level rescale is no frame's
        raise MultiFrame(path, f"an {ENHANCED_CT[v['SOPClassUID']]} file: each frame has its own rescale and position")
    return h


def _check_meaning(path: Path, h: Header) -> None:
    """Values that parse but cannot describe a CT slice we can read."""
    if h.samples_per_pixel != 1:
        raise DicomError(path, f"{h.samples_per_pixel} samples per pixel (colour data): not a CT slice")
    if not (1 <= h.rows <= MAX_SIDE and 1 <= h.columns <= MAX_SIDE):
        raise DicomError(path, f"image size {h.rows}x{h.columns} is outside 1..{MAX_SIDE} pixels a side")
    if h.bits_allocated not in (8, 16, 32):
        raise DicomError(path, f"BitsAllocated {h.bits_allocated} is not 8, 16 or 32")
    if not 1 <= h.bits_stored <= h.bits_allocated:
        raise DicomError(path, f"BitsStored {h.bits_stored} does not fit in BitsAllocated {h.bits_allocated}")
    if h.pixel_representation not in (0, 1):
        raise DicomError(path, f"PixelRepresentation {h.pixel_representation} is not 0 or 1")
    if h.rescale_slope == 0:
        raise DicomError(path, "RescaleSlope is 0: every pixel would be the same value")


_TAGS = {**_TEXT, **_US_NAMES}
_UNIT_TOLERANCE = 1e-2  # direction cosines are written with 4 to 9 digits
_COUNT_WORDS = {3: "three", 6: "six"}


def _numbers(path: Path, v: dict, name: str, tag: str, count: int) -> tuple | None:
    """A tag of ``count`` finite numbers given as DICOM text; None when absent."""
    text = v.get(name) or ""
    if not text.strip():
        return None
    try:
        numbers = tuple(map(float, text.split("\\")))
    except ValueError:
        numbers = ()
    if len(numbers) != count or not all(map(math.isfinite, numbers)):
        raise DicomError(path, f"header element {tag} {name} {text[:60]!r} is damaged "
                               f"(expected {_COUNT_WORDS[count]} finite numbers)")
    return numbers


def _orientation(path: Path, v: dict) -> tuple | None:
    """ImageOrientationPatient's row and column cosines; None when absent."""
    orientation = _numbers(path, v, "ImageOrientationPatient", "(0020,0037)", 6)
    if orientation is not None:  # plain floats: numpy's overhead on 3-vectors is ~10x
        row, col = orientation[:3], orientation[3:]
        dot = lambda a, b: a[0] * b[0] + a[1] * b[1] + a[2] * b[2]  # noqa: E731
        if max(abs(dot(row, row) - 1), abs(dot(col, col) - 1), abs(dot(row, col))) > _UNIT_TOLERANCE:
            raise DicomError(path, f"header element (0020,0037) ImageOrientationPatient {orientation} "
                                   f"is damaged (not two perpendicular unit vectors)")
    return orientation


def _cross(a: tuple, b: tuple) -> tuple[float, float, float]:
    """The unit normal of two perpendicular unit vectors (to within _UNIT_TOLERANCE)."""
    n = (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])
    length = math.sqrt(n[0] * n[0] + n[1] * n[1] + n[2] * n[2])
    return n[0] / length, n[1] / length, n[2] / length


def _slice_info(path: Path, v: dict) -> SliceInfo:
    orientation = _orientation(path, v)
    description = v.get("SeriesDescription") or ""
    if not description.isascii():  # read as latin-1; most exports now write UTF-8
        with contextlib.suppress(UnicodeError):
            description = description.encode("latin-1").decode("utf-8")
    return SliceInfo(
        sop_uid=v.get("SOPInstanceUID") or "",
        modality=(v.get("Modality") or "").strip().upper(),
        image_type=tuple(p.strip().upper() for p in (v.get("ImageType") or "").split("\\") if p.strip()),
        series_description=description.strip(),
        position=_numbers(path, v, "ImagePositionPatient", "(0020,0032)", 3),
        orientation=orientation,
    )


def _read_pydicom(path: Path, stop_before_pixels: bool, source=None, frames_ok: bool = False):
    """pydicom's reading of a file our parser leaves to it, with its failures named; from
    ``source`` (the file opened, left where pydicom stopped) when given; ``frames_ok`` as
    _header_from_values takes it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_UI_WARNING)
        try:
            ds = pydicom.dcmread(path if source is None else source, stop_before_pixels=stop_before_pixels)
        except pydicom.errors.InvalidDicomError as err:
            raise DicomError(path, f"not a DICOM file ({err})") from None
        syntax = ds.file_meta.get("TransferSyntaxUID")
        if not syntax:
            raise DicomError(path, "the file meta group names no transfer syntax")
    return ds, _header_from_values(path, _pydicom_values(path, ds, _TAGS), str(syntax), frames_ok)


def _pydicom_values(path: Path, ds, tags: dict) -> dict:
    """The values of ``tags`` that ``ds`` holds, as DICOM text by name, as _parse_simple gives them."""
    values = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_UI_WARNING)
        for (group, elem), name in tags.items():
            try:  # pydicom converts an element's bytes only now, when it is asked for
                values[name] = _pydicom_text(ds, (group, elem))
            except Exception as err:  # noqa: BLE001 - any failure means this element is damaged
                detail = str(err) if isinstance(err, _DamagedElement) else _first_line(err)
                raise DicomError(path, f"header element ({group:04X},{elem:04X}) {name} is damaged "
                                       f"({detail})") from None
    return {k: v for k, v in values.items() if v is not None}


def _first_line(err: BaseException) -> str:
    if isinstance(err, pydicom.errors.BytesLengthException):
        return "its length is not a whole number of values of its type"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160] if text else ''}"


def decoder_failure(err: BaseException) -> str:
    """A decoder's failure in one line: pydicom lists each plugin's reason on lines of its
    own after a first line that says only that all failed, and the reasons are what a user
    needs ("GDCM does not support 'JPEG Extended' for samples with 12-bit precision")."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {'; '.join(lines)[:400]}"


def _check_decodable(path: Path, syntax: str) -> None:
    """The pixels of this transfer syntax can be decoded here (known, decoder installed)."""
    if syntax in UNCOMPRESSED:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_UI_WARNING)  # a damaged UID is named below
        try:
            decoder = pydicom.pixels.get_decoder(syntax)
        except NotImplementedError:
            raise DicomError(path, f"unknown transfer syntax {syntax[:64]!r}") from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise DicomError(path, f"transfer syntax {pydicom.uid.UID(syntax).name} needs a decoder "
                               f"that is not installed: {needs}")


@contextlib.contextmanager
def _reading(path):
    """The readers' contract: a correct result or DicomError naming the file and the reason.

    A damaged file can make any parser raise anything; only running out of memory (and
    Ctrl-C, which is not an Exception) passes through.
    """
    try:
        yield
    except (DicomError, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - see above
        tag = _TAG_IN_MESSAGE.search(str(err))
        if tag:  # pydicom names the element it could not convert
            raise DicomError(path, f"header element ({tag[1].upper()},{tag[2].upper()}) is damaged "
                                   f"({_first_line(err)})") from None
        raise DicomError(path, f"unreadable DICOM ({_first_line(err)})") from None


_TAG_IN_MESSAGE = re.compile(r"\(([0-9A-Fa-f]{4}), ?([0-9A-Fa-f]{4})\)")


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


DICOMDIR_CLASS = b"1.2.840.10008.1.3.10"  # Media Storage Directory Storage: a DICOMDIR
_MEDIA_CLASS = b"\x02\x00\x02\x00UI"  # (0002,0002) MediaStorageSOPClassUID, explicit VR
_META_SEARCH = 512  # the meta group's first elements lie well within this


def _check_part10(path: Path, head: bytes) -> None:
    """A Part-10 file (b"DICM" at byte 128) that is no DICOMDIR, from its first bytes."""
    if len(head) < 132 or head[128:132] != b"DICM":
        raise NotPart10(path, "not a DICOM Part-10 file (no 'DICM' at byte 128)")
    at = head.find(_MEDIA_CLASS, 132, _META_SEARCH)
    if at >= 0 and at + 8 <= len(head):
        uid = head[at + 8:at + 8 + _U16(head, at + 6)[0]].rstrip(b"\x00 ")
        if uid == DICOMDIR_CLASS:
            raise DicomError(path, "a DICOMDIR (the index of a DICOM folder), not an image; "
                                   "the images it lists are read as files of their own")


def _read_head(path: Path, f, size: int, part10_only: bool = False) -> tuple[dict, str, int, int]:
    """Parse an open file up to its pixel data (see _parse_simple) reading little of it;
    with ``part10_only``, first check that it is a Part-10 file and no DICOMDIR."""
    buf = f.read(_HEAD_BYTES)
    if part10_only:
        _check_part10(path, buf)
    if not buf:
        raise DicomError(path, "file is empty")
    try:
        return _parse_simple(buf)
    except ValueError:
        if len(buf) == size:
            raise
        f.seek(0)
        return _parse_simple(f.read())


def _check_pixel_length(path: Path, h: Header, declared: int, available: int) -> int:
    """Check that the pixel data element holds the header's image; the image's byte size."""
    per_value = h.bits_allocated // 8
    if declared % per_value:
        raise DicomError(path, f"pixel data length {declared} is not a whole number of "
                               f"{h.bits_allocated}-bit values")
    need = h.rows * h.columns * per_value
    have = min(declared, available)
    if have < need:
        raise DicomError(path, f"pixel data is short: {have} bytes, the header's "
                               f"{h.rows}x{h.columns}x{h.bits_allocated}-bit image needs {need}")
    return need


_CODE_DTYPES = {8: np.dtype(np.uint8), 16: np.dtype("<u2"), 32: np.dtype("<u4")}


def _read_raw(path: Path) -> tuple[Header, np.ndarray]:
    """The header and the stored values as raw unsigned codes for the look-up tables.

    The whole file is read with one call into a scratch buffer that the next call on
    this thread overwrites; the codes returned are a view of it.
    """
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
    need = _check_pixel_length(path, h, length, got - offset)
    codes = buf[offset:offset + need]
    return h, codes.view(_CODE_DTYPES[h.bits_allocated]).reshape(h.rows, h.columns)


def _read_raw_pydicom(path: Path) -> tuple[Header, np.ndarray]:
    ds, h = _read_pydicom(path, stop_before_pixels=False)
    _check_decodable(path, h.transfer_syntax)
    if not ds.get("PixelData"):
        raise DicomError(path, "no pixel data")
    if not pydicom.uid.UID(h.transfer_syntax).is_compressed:
        n = len(ds.PixelData)
        _check_pixel_length(path, h, n, n)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_UI_WARNING)
            # raw=True: stored values without pydicom's sign/bit handling, which our LUT does
            arr = pydicom.pixels.pixel_array(ds, raw=True)
    except Exception as err:  # noqa: BLE001 - decoders raise many types; all mean "pixels unusable"
        raise DicomError(path, f"cannot decode pixel data ({decoder_failure(err)})") from None
    return h, decoded_codes(path, h, arr, "pixel data")


def decoded_codes(path, h: Header, arr: np.ndarray, what: str) -> np.ndarray:
    """A decoder's array of ``what`` (the pixel data, a frame) as the raw unsigned codes the
    look-up tables index, its shape checked against ``h``."""
    if arr.shape != (h.rows, h.columns):
        raise DicomError(path, f"{what} has shape {arr.shape}, header says {h.rows}x{h.columns}")
    code_dtype = _CODE_DTYPES[h.bits_allocated]
    return arr.view(code_dtype) if arr.dtype.itemsize == code_dtype.itemsize else arr.astype(code_dtype)


# ---------------------------------------------------------------------------------------
# Look-up tables from stored codes to HU and to windowed bytes.

def _stored_to_hu(codes: np.ndarray, bits_stored: int, signed: bool, slope: float,
                  intercept: float) -> np.ndarray:
    """HU of raw stored codes (int64), masked and sign-extended as pydicom does, with the
    RSNA 12-bit wrap undone."""
    values = codes & ((1 << bits_stored) - 1)
    if signed:
        values = np.where(values >= 1 << (bits_stored - 1), values - (1 << bits_stored), values)
    if wraps_12bit(bits_stored, int(signed), intercept):
        values = values + 1000
        values = np.where(values >= 4096, values - 4096, values)
        intercept = -1000.0
    return values.astype(np.float64) * slope + intercept


@functools.lru_cache(maxsize=256)
def _hu_lut(bits_allocated: int, bits_stored: int, signed: bool, slope: float,
            intercept: float) -> np.ndarray:
    """HU for every possible stored code of 8 or 16 bits."""
    hu = _stored_to_hu(np.arange(1 << bits_allocated, dtype=np.int64), bits_stored, signed,
                       slope, intercept)
    hu.flags.writeable = False
    return hu


def _hu(h: Header, raw: np.ndarray) -> np.ndarray:
    """HU (float64) of a slice's raw codes. 32-bit codes are too many for a table."""
    if h.bits_allocated == 32:
        return _stored_to_hu(raw.astype(np.int64), h.bits_stored, h.pixel_representation == 1,
                             h.rescale_slope, h.rescale_intercept)
    return _hu_lut(*_lut_key(h))[raw]


def _lut_key(h: Header) -> tuple:
    return (h.bits_allocated, h.bits_stored, h.pixel_representation == 1,
            h.rescale_slope, h.rescale_intercept)


def _resolve_windows(windows, h: Header, path) -> tuple:
    out = []
    for w in windows:
        if w == HEADER:
            if not (np.isfinite(h.window_center) and np.isfinite(h.window_width)):
                raise DicomError(path, "the header window was asked for but the file has none")
            if h.window_width < 0:
                raise DicomError(path, f"the header window's width {h.window_width:g} is negative")
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
# Public readers: each returns a correct result or raises DicomError (see _reading).

def read_header(path) -> Header:
    """The header of one file, reading only as far as the pixel data where it can, and
    checking that its pixels can be read (so a bad file is found at scan time)."""
    path = Path(path)
    with _reading(path):
        return _read_header_values(path, slice_info=False)[0]


def read_slice_info(path) -> tuple[Header, SliceInfo]:
    """read_header's Header and checks, and what places the file among a folder's scans.

    One read of the file's head, as read_header does. Raises NotPart10 (a DicomError) for
    a file without b"DICM" at byte 128, and DicomError for a DICOMDIR (an index, not an
    image) or a damaged ImageOrientationPatient, besides read_header's reasons.
    """
    path = Path(path)
    with _reading(path):
        h, values = _read_header_values(path, slice_info=True)
        return h, _slice_info(path, values)


def _read_header_values(path: Path, slice_info: bool) -> tuple[Header, dict]:
    """read_header's work, and the tag values read as DICOM text by name (with
    ``slice_info``, _SLICE_TEXT's too, also from a file that pydicom reads)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            try:
                values, syntax, offset, length = _read_head(path, f, size, part10_only=slice_info)
            except ValueError as err:
                raise DicomError(path, f"truncated file: {err}") from None
            except _NotSimple:
                values = None
    except OSError as err:
        raise DicomError(path, f"cannot read file ({err.strerror or err})") from None
    if values is None:
        ds, h = _read_pydicom(path, stop_before_pixels=True)
        _check_decodable(path, h.transfer_syntax)
        return h, (_pydicom_values(path, ds, _ALL_TEXT) if slice_info else {})
    h = _header_from_values(path, values, syntax)
    _check_pixel_length(path, h, length, size - offset)
    return h, values


def read_hu(path) -> np.ndarray:
    """Hounsfield units (float32, H x W) after the rescale and the RSNA 12-bit fix."""
    path = Path(path)
    with _reading(path):
        h, raw = _read_raw(path)
        return _hu(h, raw).astype(np.float32)


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


def _resize_cut(img: np.ndarray, size: int) -> np.ndarray:
    """_resize of a square cut to the head (utils.crop), whose side is rarely a multiple of
    ``size``: OpenCV's area average takes a path 20x slower for a fractional factor (411 ->
    256: 1.5 ms) than for a whole one. Up to the next multiple linearly, then an area
    average by a whole factor: 0.6 ms, within 4/255 of the direct average at an edge
    (BENCHMARKS.md)."""
    factor = -(-img.shape[0] // size)  # ceil
    if factor < 2 or img.shape[0] == factor * size:
        return _resize(img, size)
    return _resize(_resize(img, factor * size), size)


def read_windowed(path, windows=DEFAULT_WINDOWS, size: int | None = None, crop=None) -> np.ndarray:
    """One slice as a uint8 (H, W, C) image, a channel per (center, width) window.

    With ``size`` the image is padded to a square and resized to size x size. MONOCHROME1
    is inverted so that bright always means dense. ``crop``: None (or "none") keeps the
    whole slice, "head" cuts it to its head first (utils.crop), a box (top, left, side) to
    that square (read_windowed_box gives a slice's box, for its neighbours).
    """
    return read_windowed_box(path, windows, size, crop)[0]


def read_windowed_box(path, windows=DEFAULT_WINDOWS, size: int | None = None, crop=None):
    """read_windowed's image and the box it was cut to (None: the whole slice)."""
    path = Path(path)
    with _reading(path):
        h, raw = _read_raw(path)
        return windowed_codes(path, h, raw, windows, size, crop)


def _crop_box(crop, mask) -> Box | None:
    """The box ``crop`` asks for; ``mask`` () -> (the slice's head mask where head_box looks,
    the slice's shape), made only for "head"."""
    if crop is None or crop == "none":
        return None
    if crop == "head":
        return head_box(*mask())
    return crop


@functools.lru_cache(maxsize=256)
def _head_lut(lut_key: tuple) -> np.ndarray:
    """1 for every stored code above HEAD_HU, 0 below: the head mask is one gather."""
    table = (_hu_lut(*lut_key) > HEAD_HU).astype(np.uint8)
    table.flags.writeable = False
    return table


def windowed_codes(path, h: Header, raw: np.ndarray, windows=DEFAULT_WINDOWS, size: int | None = None,
                   crop=None) -> tuple[np.ndarray, Box | None]:
    """read_windowed_box of stored codes ``raw`` described by ``h`` (a frame of a
    multi-frame file has its own Header: utils.multiframe)."""
    windows = _resolve_windows(windows, h, path)
    invert = h.photometric == "MONOCHROME1"
    if h.bits_allocated == 32:
        hu = _hu(h, raw)
        box = _crop_box(crop, lambda: (sampled(hu) > HEAD_HU, hu.shape))
        return _windowed_slow(hu, windows, invert, size, box), box
    box = _crop_box(crop, lambda: (np.take(_head_lut(_lut_key(h)), sampled(raw), mode="wrap"), raw.shape))
    packed = _packed_lut(_lut_key(h), windows, invert)
    words = _scratch_array("words", raw.size * packed.itemsize).view(packed.dtype)
    # Codes always index inside the table; "wrap" skips the clamp "clip" does (~18% faster).
    np.take(packed, raw.ravel(), out=words, mode="wrap")
    img = words.view(np.uint8).reshape(h.rows, h.columns, packed.itemsize)
    if size is not None:
        img = _resize(_square(img), int(size)) if box is None else _resize_cut(crop_square(img, box), int(size))
    elif box is not None:
        img = crop_square(img, box)
    img = _first_channels(img, len(windows))
    return (img.copy() if np.shares_memory(img, words) else img), box  # never hand out scratch


def windowed_hu(path, hu: np.ndarray, windows=DEFAULT_WINDOWS, size: int | None = None,
                crop=None) -> tuple[np.ndarray, Box | None]:
    """read_windowed_box of a slice given in HU (a NIfTI volume's: utils.nifti), which has
    no header window of its own."""
    if HEADER in windows:
        raise DicomError(path, "the header window was asked for but the file has none")
    box = _crop_box(crop, lambda: (sampled(hu) > HEAD_HU, hu.shape))
    return _windowed_slow(hu, _resolve_windows(windows, None, path), False, size, box), box


def _windowed_slow(hu: np.ndarray, windows: tuple, invert: bool, size: int | None, box: Box | None) -> np.ndarray:
    """read_windowed for codes too wide for a look-up table: window() channel by channel."""
    img = np.stack([window(hu, center, width) for center, width in windows], axis=2)
    if invert:
        img = 255 - img
    if box is not None:
        img = crop_square(img, box)
        return img if size is None else _resize_cut(img, int(size))
    return img if size is None else _resize(_square(img), int(size))


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
