"""The frames of an Enhanced CT file: each one slice, read one at a time.

    frames = read_frames(path)                   # the frames' geometry; DicomError if no CT volume
    img, box = read_frame_windowed(path, 12, size=256)  # frame 12, as utils.dicom.read_windowed_box gives a file

Modern scanners write a whole series as one Enhanced CT Image Storage file (or a Legacy
Converted one): the frames share the image pixel module, and each frame's position,
orientation and rescale are in its per-frame functional group or in the shared one (the
per-frame one wins, the file's top level comes last). A frame is decoded alone (pydicom's
decoders read one frame of native or encapsulated pixel data from the open file), so memory
holds a frame, not the file; the header is parsed once per process and file (a cache keyed
by size and modification time). A frame then takes the rescale, 12-bit rule and windows of
any slice (utils.dicom.windowed_codes): one HU rule.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from utils.dicom import (_ALL_TEXT, DEFAULT_WINDOWS, ENHANCED_CT, DicomError, Header, SliceInfo, _check_decodable, _cross, _number,
                         _numbers, _orientation, _pydicom_values, _read_pydicom, _reading, _slice_info, decoded_codes,
                         decoder_failure, windowed_codes)

_PIXEL_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) Pixel Data, little endian
# (functional group sequence, attribute): where each frame's geometry and rescale live
_GROUPS = {"ImagePositionPatient": "PlanePositionSequence", "ImageOrientationPatient": "PlaneOrientationSequence",
           "RescaleIntercept": "PixelValueTransformationSequence", "RescaleSlope": "PixelValueTransformationSequence"}


@dataclass(frozen=True)
class Frames:
    """What read_frames finds in a multi-frame file, a row per frame."""

    header: Header  # the pixel module; rescale and geometry are the first frame's
    info: SliceInfo  # identity and kind (position and orientation: the first frame's)
    kind: str  # "Enhanced CT" or "Legacy Converted Enhanced CT"
    positions: tuple  # ImagePositionPatient of each frame, or None
    orientations: tuple  # ImageOrientationPatient of each frame, or None
    rescales: tuple  # (slope, intercept) of each frame
    pixel_offset: int  # where the Pixel Data element's value starts in the file

    def __len__(self) -> int:
        return len(self.rescales)

    def frame_header(self, index: int) -> Header:
        """The Header of one frame: its own rescale and geometry."""
        (slope, intercept), position, orientation = self.rescales[index], self.positions[index], self.orientations[index]
        x, y, z = position or (np.nan,) * 3
        normal = _cross(orientation[:3], orientation[3:]) if orientation else (np.nan,) * 3
        return dataclasses.replace(self.header, rescale_slope=slope, rescale_intercept=intercept, x=x, y=y, z=z,
                                   normal_x=normal[0], normal_y=normal[1], normal_z=normal[2])


def read_frames(path) -> Frames:
    """The frames of an Enhanced CT file; DicomError naming the file and the reason for any
    other file of several frames (a cine, a secondary capture) or a damaged one."""
    path = Path(path)
    with _reading(path):
        st = os.stat(path)
        return _frames(str(path), st.st_size, st.st_mtime_ns)


def read_frame_windowed(path, index: int, windows=DEFAULT_WINDOWS, size: int | None = None, crop=None):
    """Frame ``index`` of a multi-frame file as utils.dicom.read_windowed_box gives a slice:
    the image and the box it was cut to."""
    path = Path(path)
    with _reading(path):
        h, raw = _frame_codes(path, index)
        return windowed_codes(path, h, raw, windows, size, crop)


@functools.lru_cache(maxsize=16)
def _frames(path: str, size: int, mtime_ns: int) -> Frames:
    """read_frames' work, once per process and version of a file."""
    with open(path, "rb") as f:
        ds, header = _read_pydicom(Path(path), stop_before_pixels=True, source=f, frames_ok=True)
        at = f.tell()  # pydicom stops at the Pixel Data element's tag
        element = f.read(12)
    syntax = header.transfer_syntax
    values = _pydicom_values(Path(path), ds, _ALL_TEXT)
    n = int(values.get("NumberOfFrames", "1"))
    sop_class = values.get("SOPClassUID", "")
    if sop_class not in ENHANCED_CT:
        name = pydicom.uid.UID(sop_class).name if sop_class else "file without SOPClassUID"
        raise DicomError(path, f"{n} frames of a {name}: not a CT volume (only Enhanced CT files are read frame by frame)")
    _check_decodable(Path(path), syntax)
    if element[:4] != _PIXEL_TAG:
        raise DicomError(path, "no pixel data")
    implicit = pydicom.uid.UID(syntax).is_implicit_VR
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    shared = (ds.get("SharedFunctionalGroupsSequence") or [pydicom.Dataset()])[0]
    if len(per_frame) not in (0, n):
        raise DicomError(path, f"{len(per_frame)} per-frame functional groups for {n} frames")
    rows = [_frame_values(Path(path), ds, shared, per_frame[i] if per_frame else None) for i in range(n)]
    return Frames(header=header, info=_slice_info(Path(path), values), kind=ENHANCED_CT[sop_class],
                  positions=tuple(r[0] for r in rows), orientations=tuple(r[1] for r in rows),
                  rescales=tuple(r[2] for r in rows), pixel_offset=at + (8 if implicit else 12))


def _group_value(groups: list, attribute: str):
    """The first of ``groups`` (datasets holding functional group sequences, the file's top
    level last) that holds ``attribute``: its value as DICOM text, or None."""
    sequence = _GROUPS[attribute]
    for group in groups:
        if group is None:
            continue
        item = group.get(sequence)
        holder = item[0] if item else (group if sequence not in group and attribute in group else None)
        if holder is not None and attribute in holder:
            value = holder[attribute].value
            if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
                return "\\".join(str(x) for x in value)
            return None if value is None else str(value)
    return None


def _frame_values(path: Path, ds, shared, frame) -> tuple:
    """(position, orientation, (slope, intercept)) of one frame: its group, then the shared
    one, then the file's top level."""
    groups = [frame, shared, ds]
    v = {name: _group_value(groups, name) for name in _GROUPS}
    v = {k: x for k, x in v.items() if x is not None}
    position = _numbers(path, v, "ImagePositionPatient", "(0020,0032)", 3)
    return position, _orientation(path, v), (_number(path, v, "RescaleSlope", 1.0), _number(path, v, "RescaleIntercept", 0.0))


def _frame_codes(path: Path, index: int) -> tuple[Header, np.ndarray]:
    """The Header and raw stored codes of one frame, decoded alone from the open file."""
    st = os.stat(path)
    frames = _frames(str(path), st.st_size, st.st_mtime_ns)
    if not 0 <= index < len(frames):
        raise DicomError(path, f"no frame {index}: the file has {len(frames)}")
    h = frames.frame_header(index)
    if h.rescale_slope == 0:
        raise DicomError(path, f"frame {index}: RescaleSlope is 0")
    decoder = pydicom.pixels.get_decoder(h.transfer_syntax)
    with open(path, "rb") as f:
        f.seek(frames.pixel_offset)
        try:
            arr, _ = decoder.as_array(f, index=index, raw=True, rows=h.rows, columns=h.columns, samples_per_pixel=1,
                                   bits_allocated=h.bits_allocated, bits_stored=h.bits_stored,
                                   pixel_representation=h.pixel_representation, photometric_interpretation=h.photometric,
                                   number_of_frames=len(frames), pixel_keyword="PixelData")
        except Exception as err:  # noqa: BLE001 - decoders raise many types; all mean "frame unusable"
            raise DicomError(path, f"cannot decode frame {index} ({decoder_failure(err)})") from None
    return h, decoded_codes(path, h, arr, f"frame {index}")
