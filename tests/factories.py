"""Small DICOM files built in tests, with exactly the tags a case needs."""
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian


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
    """A CT Image Storage object of several frames: no Enhanced CT file (no functional
    groups), so no CT volume to read frame by frame."""
    make_ct(path, frames[0], NumberOfFrames=len(frames), **tags)
    ds = pydicom.dcmread(path)
    ds.PixelData = frames.astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


# Lossless syntaxes as hospitals' exports write them, each written with python-gdcm's
# encoders (the decoder package of requirements.txt): name -> gdcm.TransferSyntax member.
GDCM_SYNTAXES = {"RLE Lossless": "RLELossless", "JPEG-LS Lossless": "JPEGLSLossless",
                 "JPEG 2000 Lossless": "JPEG2000Lossless", "JPEG Lossless SV1": "JPEGLosslessProcess14_1"}


def compress_with_gdcm(source, target, syntax: str) -> Path:
    """A copy of ``source`` at ``target`` with its pixels written in ``syntax`` (a key of
    GDCM_SYNTAXES), every other element as it was."""
    import gdcm
    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read(), source
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, GDCM_SYNTAXES[syntax])))
    change.SetInput(reader.GetImage())
    assert change.Change(), (source, syntax)
    writer = gdcm.ImageWriter()
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write(), target
    return Path(target)


_PIXEL_MODULE = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesDescription", "Rows",
                 "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
                 "PixelRepresentation")


def make_enhanced_ct(target, sources: list, syntax: str | None = None, per_frame_orientation: bool = False,
                     **tags) -> Path:
    """One Enhanced CT file whose frames are the slices ``sources``, in that order: each
    frame's position and rescale in its per-frame functional group, the orientation in the
    shared one (or per frame), the pixels as stored (or compressed in ``syntax``, frame by
    frame, with compress_with_gdcm)."""
    from pydicom.encaps import generate_frames
    from pydicom.uid import UID
    slices = [read_dicom(s) for s in sources]
    first = slices[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = f"1.2.826.0.1.{abs(hash(str(target))) % 10**12}"
    for name in _PIXEL_MODULE:
        if name in first:
            setattr(ds, name, first[name].value)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.NumberOfFrames = len(slices)
    orientation = Dataset()
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    shared = Dataset()
    if not per_frame_orientation:
        shared.PlaneOrientationSequence = [orientation]
    ds.SharedFunctionalGroupsSequence = [shared]
    groups = []
    for s in slices:
        group, position, rescale = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = s.ImagePositionPatient
        rescale.RescaleIntercept, rescale.RescaleSlope, rescale.RescaleType = s.RescaleIntercept, s.RescaleSlope, "HU"
        group.PlanePositionSequence, group.PixelValueTransformationSequence = [position], [rescale]
        if per_frame_orientation:
            own = Dataset()
            own.ImageOrientationPatient = s.ImageOrientationPatient
            group.PlaneOrientationSequence = [own]
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = groups
    for key, value in tags.items():
        setattr(ds, key, value)
    if syntax is None:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = b"".join(s.PixelData for s in slices)
    else:
        frames = []
        for i, source in enumerate(sources):
            one = read_dicom(compress_with_gdcm(source, Path(str(target) + f".{i}.tmp"), syntax))
            Path(str(target) + f".{i}.tmp").unlink()
            frames.extend(generate_frames(one.PixelData, number_of_frames=1))
            ds.file_meta.TransferSyntaxUID = UID(one.file_meta.TransferSyntaxUID)
        ds.PixelData = encapsulate(frames, has_bot=True)
        ds["PixelData"].VR = "OB"
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Invalid value for VR UI")
        ds.save_as(target, enforce_file_format=True)
    return Path(target)


def make_nifti(target, sources: list, layout: str = "as_dicom") -> Path:
    """One NIfTI-1 volume (gzip when ``target`` ends in .gz) of the DICOM slices ``sources``
    (one series), in HU as int16, its affine from their geometry. ``layout`` stores the
    array as DICOM does (x along a row, y down a column, z up the series), "transposed"
    (x and y swapped), or "mirrored" (z from the top, x from the patient's left): the affine
    says so each time, and a reader must give the same slices."""
    import nibabel
    from utils.dicom import read_hu
    slices = sorted((read_dicom(s) for s in sources), key=lambda ds: float(ds.ImagePositionPatient[2]))
    hu = np.stack([read_hu(ds.filename) for ds in slices], axis=-1).transpose(1, 0, 2)  # x, y, z
    first, last = (np.array(ds.ImagePositionPatient, float) for ds in (slices[0], slices[-1]))
    row_spacing, column_spacing = map(float, slices[0].PixelSpacing)
    affine = np.eye(4)
    affine[:3, 0] = np.array(slices[0].ImageOrientationPatient[:3], float) * column_spacing
    affine[:3, 1] = np.array(slices[0].ImageOrientationPatient[3:], float) * row_spacing
    affine[:3, 2] = (last - first) / max(1, len(slices) - 1)
    affine[:3, 3] = first
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # DICOM's LPS -> NIfTI's RAS
    if layout == "transposed":
        hu, affine = hu.transpose(1, 0, 2), affine[:, [1, 0, 2, 3]]
    elif layout == "mirrored":
        flip = np.eye(4)
        flip[[0, 2], [0, 2]] = -1
        flip[0, 3], flip[2, 3] = hu.shape[0] - 1, hu.shape[2] - 1
        hu, affine = hu[::-1, :, ::-1], affine @ flip
    elif layout != "as_dicom":
        raise ValueError(layout)
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(np.ascontiguousarray(hu).astype(np.int16), affine), str(target))
    return Path(target)


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
    skip["cd/enhanced/IM0001"] = "3 frames of a CT Image Storage: not a CT volume"
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


def build_labelled_export(root: Path, sample: Path) -> pd.DataFrame:
    """The real sample's training slices as a site's export (patient/study/series folders,
    files without extensions), with their Kaggle labels: a row per slice, indexed by its path
    relative to ``root``, with sop_uid, series_uid and the LABELS columns."""
    from utils.labels import read_labels
    labels = read_labels(sample / "stage_2_train.csv")
    rows = []
    for i, source in enumerate(sorted((sample / "stage_2_train").glob("*.dcm"))):
        ds = read_dicom(source)
        rel = f"{ds.PatientID}/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/IM{i:04d}"
        place_file(source, root / rel)
        rows.append({"path": rel, "sop_uid": ds.SOPInstanceUID, "series_uid": ds.SeriesInstanceUID,
                     **labels.loc[source.stem].to_dict()})
    return pd.DataFrame(rows).set_index("path")


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
