"""Small DICOM files built in tests, with exactly the tags a case needs."""
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLosslessSV1


def make_ct(path, stored: np.ndarray, *, bits_stored=16, signed=True, intercept="-1024",
            slope="1", implicit=False, photometric="MONOCHROME2", center=None, width=None,
            bits_allocated=16, **extra) -> Path:
    """Write a CT slice with exactly the tags given; stored values are written as is."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.3.4"
    ds.PatientID = "ID_12345678"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.5"
    ds.ImagePositionPatient = [-125, -125, 42.5]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.RescaleIntercept, ds.RescaleSlope = intercept, slope
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    for key, value in extra.items():
        setattr(ds, key, value)
    dtype = {(16, True): "<i2", (16, False): "<u2", (8, False): "u1", (32, True): "<i4",
             (32, False): "<u4"}[(bits_allocated, signed)]
    ds.PixelData = stored.astype(dtype).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def jpeg_decoder_installed() -> bool:
    return pydicom.pixels.get_decoder(JPEGLosslessSV1).is_available


def make_undecodable(path) -> Path:
    """Rewrite a DICOM file as JPEG Lossless with a dummy frame: its header reads, but
    its pixels need a decoder plugin that is not installed here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Invalid value for VR UI")
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)
    return Path(path)


# Damage of the kinds that escaped as other exceptions than DicomError before (issue 13),
# each one or a few flipped bits of an explicit-VR file's header.

def flip_position_vr(data: bytes) -> bytes:
    """ImagePositionPatient's VR 'DS' -> 'D\\x13': an unknown VR (one flipped bit)."""
    i = data.index(b"\x20\x00\x32\x00DS") + 5
    return data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1:]


def flip_transfer_syntax(data: bytes) -> bytes:
    """'1.2.840.10008.1.2...' -> '1.2.840.10008&1.2...': an unknown transfer syntax."""
    i = data.index(b"1.2.840.10008.1.2") + 13
    return data[:i] + bytes([data[i] ^ 0x08]) + data[i + 1:]


def odd_columns_length(data: bytes) -> bytes:
    """Columns (US) with a length of 3: not a whole number of 16-bit values."""
    i = data.index(b"\x28\x00\x11\x00US") + 6
    return data[:i] + b"\x03" + data[i + 1:]


ESCAPED_BEFORE = {
    "unknown VR": (flip_position_vr, "header element (0020,0032) ImagePositionPatient is damaged"),
    "damaged transfer syntax": (flip_transfer_syntax, "unknown transfer syntax '1.2.840.10008&1.2"),
    "odd element length": (odd_columns_length, "header element (0028,0011) Columns is damaged"),
}


def make_corrupt_rle(path) -> Path:
    """Rewrite a DICOM file as RLE Lossless (decodable with pydicom alone) whose compressed
    segments are garbage: its header and transfer syntax pass, its pixels fail to decode."""
    from pydicom.uid import RLELossless
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Invalid value for VR UI")
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        header = (1).to_bytes(4, "little") + (64).to_bytes(4, "little") + bytes(56)  # one segment
        ds.PixelData = encapsulate([header + b"\x7f" + b"\x00" * 7])  # far too short a segment
        ds.save_as(path, enforce_file_format=True)
    return Path(path)


def make_multiframe_ct(path, frames: np.ndarray, **tags) -> Path:
    """A CT object of several frames in one file, as Enhanced CT exports are written."""
    make_ct(path, frames[0], NumberOfFrames=len(frames), **tags)
    ds = pydicom.dcmread(path)
    ds.PixelData = frames.astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def make_series(folder, positions, orientation, names=None, series_uid="1.2.3.5", start=0,
                **tags) -> list[Path]:
    """One small CT file per ImagePositionPatient in ``positions``, all of ``orientation``
    (six direction cosines), named ``names`` (default IM0000... from ``start``); each its
    own SOP UID (the series UID, then start + 1, start + 2...)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"IM{start + i:04d}" for i in range(len(positions))]
    return [make_ct(folder / name, np.full((8, 8), 1024 + i), Modality="CT", SeriesInstanceUID=series_uid,
                    SOPInstanceUID=f"{series_uid}.{start + i + 1}",
                    ImagePositionPatient=[float(x) for x in pos],
                    ImageOrientationPatient=[float(x) for x in orientation], **tags)
            for i, (pos, name) in enumerate(zip(positions, names))]


# ---------------------------------------------------------------------------------------
# A folder of scans as a PACS export or a CD gives it (utils.scans, kernel.py --predict).

def read_dicom(path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Invalid value for VR UI")
        return pydicom.dcmread(path)


def rewrite_dicom(source, target, **tags) -> Path:
    """A copy of ``source`` at ``target`` with ``tags`` set."""
    ds = read_dicom(source)
    for key, value in tags.items():
        setattr(ds, key, value)
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Invalid value for VR UI")
        ds.save_as(target, enforce_file_format=True)
    return Path(target)


def place_file(source, target, data: bytes | None = None) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        shutil.copyfile(source, target)
    else:
        target.write_bytes(data)
    return target.as_posix()


def build_export(root: Path, sample: Path) -> tuple[dict, dict]:
    """The real sample as a PACS export (study/series folders, no extensions), mixed with
    what is no CT slice. Returns {path: SOP UID} of the CT slices and {path: reason part}
    of the files to skip."""
    ct, skip = {}, {}
    for i, source in enumerate(sorted(sample.glob("stage_2_*/*.dcm"))):
        ds = read_dicom(source)
        rel = f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/IM{i:04d}"
        place_file(source, root / rel)
        ct[rel] = ds.SOPInstanceUID
    kept = sorted(ct)[0]
    study, series = kept.split("/")[:2]
    place_file(get_testdata_file("CT_small.dcm"), root / "cd/CT/CT_small")
    ct["cd/CT/CT_small"] = read_dicom(get_testdata_file("CT_small.dcm")).SOPInstanceUID
    place_file(get_testdata_file("MR_small.dcm"), root / "cd/MR/IM0001")
    skip["cd/MR/IM0001"] = "modality MR, not CT"
    rewrite_dicom(root / kept, root / study / "scout/IM0001", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
             SOPInstanceUID="ID_scout", SeriesInstanceUID="ID_scout_series")
    skip[f"{study}/scout/IM0001"] = "a localizer (scout) image"
    for folder in ("cd/enhanced", "cd/colour"):
        (root / folder).mkdir(parents=True)
    make_multiframe_ct(root / "cd/enhanced/IM0001", np.full((3, 8, 8), 1024), Modality="CT")
    skip["cd/enhanced/IM0001"] = "3 frames (a multi-frame object)"
    make_ct(root / "cd/colour/IM0001", np.zeros((8, 8)), SamplesPerPixel=3, Modality="CT")
    skip["cd/colour/IM0001"] = "(colour data)"
    place_file(get_testdata_file("DICOMDIR"), root / "DICOMDIR")
    skip["DICOMDIR"] = "a DICOMDIR (the index of a DICOM folder)"
    data = (root / kept).read_bytes()
    place_file(None, root / study / series / "IM_damaged", data[:len(data) // 2])
    skip[f"{study}/{series}/IM_damaged"] = "pixel data is short"
    rewrite_dicom(root / kept, root / study / series / "zz_copy", SOPInstanceUID="ID_copy")
    skip[f"{study}/{series}/zz_copy"] = f"the file kept is {kept}"
    place_file(root / kept, root / "again/IM0001")
    skip["again/IM0001"] = f"duplicate SOPInstanceUID: the file kept is {min(kept, 'again/IM0001')}"
    place_file(None, root / "README.TXT", b"Open viewer.exe to see the images.\n")
    place_file(None, root / "cd/viewer.exe", random.Random(0).randbytes(4000))
    place_file(None, root / "cd/empty", b"")
    (root / "cd/loop").symlink_to(root, target_is_directory=True)  # a link back up the tree
    return ct, skip


# ---------------------------------------------------------------------------------------
# A page as a browser draws it (report.html, predict.html).

CHROMIUM_SECONDS = 90
REQUIRE_CHROMIUM = "RSNA_REQUIRE_CHROMIUM"  # CI sets it: a missing browser fails, never skips


def screenshot(page: Path, shot: Path, profile: Path, height: int = 3000) -> Path:
    """``page`` drawn by headless Chromium into the PNG ``shot``; skips where there is no
    Chromium, except under RSNA_REQUIRE_CHROMIUM, where that is a failure."""
    import os
    import shutil
    import subprocess

    import pytest
    if shutil.which("chromium") is None:
        if os.environ.get(REQUIRE_CHROMIUM):
            pytest.fail(f"chromium is not installed and {REQUIRE_CHROMIUM} is set")
        pytest.skip("chromium is not installed")
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         f"--screenshot={shot}", f"--window-size=1200,{height}", Path(page).as_uri()],
        check=True, timeout=CHROMIUM_SECONDS, capture_output=True)
    return shot
