"""What a slice is read from, named by one string: a slice reference.

    read_windowed("scans/IM0001")                   # a DICOM file: the slice it holds
    read_windowed("scans/ct.dcm::frame=12")         # frame 12 of an Enhanced CT file
    read_windowed("vols/head.nii.gz::slice=40")     # slice 40 of a NIfTI volume, inferior first

A reference travels where a path did (the dataset's rows, their neighbours, slices.csv's
``path`` column), so the model, the refiner and the heatmaps read frames and volumes as
they read files. A file whose own name ends like a reference is still read as that file.
"""
from __future__ import annotations

import os
import re

import numpy as np

from utils import dicom, multiframe, nifti
from utils.dicom import DEFAULT_WINDOWS

FRAME, SLICE = "frame", "slice"  # a frame of a multi-frame DICOM file, a slice of a NIfTI volume
_REF = re.compile(r"(.+)::(frame|slice)=(\d+)", re.DOTALL)
_WINDOWED = {FRAME: multiframe.read_frame_windowed, SLICE: nifti.read_slice_windowed}


def slice_ref(path, part: str | None = None, index: int | None = None) -> str:
    """The reference of a file (``part`` None) or of its frame or slice ``index``."""
    return str(path) if part is None else f"{path}::{part}={int(index)}"


def split_ref(ref) -> tuple[str, str | None, int | None]:
    """(file, part, index) of a reference; part and index are None for a whole file."""
    ref = str(ref)
    if "::" in ref:  # the hot path's usual case skips the pattern
        match = _REF.fullmatch(ref)
        if match and not os.path.exists(ref):
            return match[1], match[2], int(match[3])
    return ref, None, None


def read_windowed(ref, windows=DEFAULT_WINDOWS, size: int | None = None, crop=None) -> np.ndarray:
    """utils.dicom.read_windowed of whatever ``ref`` names."""
    return read_windowed_box(ref, windows, size, crop)[0]


def read_windowed_box(ref, windows=DEFAULT_WINDOWS, size: int | None = None, crop=None):
    """utils.dicom.read_windowed_box of whatever ``ref`` names: the image and its box."""
    path, part, index = split_ref(ref)
    if part is None:
        return dicom.read_windowed_box(path, windows, size, crop)
    return _WINDOWED[part](path, index, windows, size, crop)
