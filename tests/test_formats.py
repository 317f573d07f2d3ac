"""The formats hospitals export, read as the competition's files are: the frames of an
Enhanced CT file and the slices of a NIfTI volume, on the real sample's pixels (the
compressed transfer syntaxes: test_dicom.py; --predict on all of them: test_predict_folder.py)."""
import gzip

import numpy as np
import pytest

from factories import make_enhanced_ct, make_nifti, read_dicom
from utils import nifti
from utils.dicom import DicomError, read_header, read_windowed
from utils.multiframe import read_frame_windowed, read_frames
from utils.scans import scan_folder
from utils.sources import read_windowed as read_ref
from utils.sources import slice_ref, split_ref

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")


def _series(sample, n=None) -> list:
    """The slices of the sample's gantry-tilted series, inferior first (the first ``n``)."""
    files = sorted(sample.glob("stage_2_train/*.dcm"))
    tilted = [f for f in files if read_dicom(f).ImageOrientationPatient[4] < 0.99]
    tilted.sort(key=lambda f: float(read_dicom(f).ImagePositionPatient[2]))
    return tilted[:n] if n else tilted


@pytest.mark.parametrize("syntax", [None, "JPEG Lossless SV1"])
def test_each_frame_of_an_enhanced_ct_file_reads_as_the_file_it_was(tmp_path, rsna_sample, syntax):
    sources = _series(rsna_sample, 6)
    shuffled = [sources[i] for i in (3, 0, 5, 1, 4, 2)]
    path = make_enhanced_ct(tmp_path / "enhanced.dcm", shuffled, syntax)
    frames = read_frames(path)
    assert len(frames) == 6 and frames.kind == "Enhanced CT"
    for i, source in enumerate(shuffled):
        np.testing.assert_array_equal(read_frame_windowed(path, i, size=64)[0], read_windowed(source, size=64))
        assert frames.frame_header(i).z == read_header(source).z
    with pytest.raises(DicomError, match="no frame 6: the file has 6"):
        read_frame_windowed(path, 6)


def test_a_folder_scan_orders_the_frames_along_the_normal_and_names_file_and_frame(tmp_path, rsna_sample):
    sources = _series(rsna_sample, 6)
    make_enhanced_ct(tmp_path / "scans" / "ct.dcm", [sources[i] for i in (3, 0, 5, 1, 4, 2)], per_frame_orientation=True)
    scan = scan_folder(tmp_path / "scans")
    assert scan.skipped.empty and len(scan.slices) == 6
    assert scan.slices["frame"].tolist() == [1, 3, 5, 0, 4, 2]  # frame of the i-th slice along the series
    assert (scan.slices["file"] == "ct.dcm").all() and scan.slices["format"].str.startswith("Enhanced CT").all()
    assert scan.slices["path"].tolist() == [f"ct.dcm::frame={f}" for f in [1, 3, 5, 0, 4, 2]]
    rows = scan.model_rows()
    assert rows["below"].iloc[1] == rows["path"].iloc[0] and rows["above"].iloc[1] == rows["path"].iloc[2]
    np.testing.assert_array_equal(read_ref(rows["path"].iloc[0], size=32), read_windowed(sources[0], size=32))


def test_an_enhanced_ct_file_of_one_frame_takes_its_rescale_from_the_functional_groups(tmp_path, rsna_sample):
    """Its top level has no RescaleIntercept: read as a plain slice, its HU would be 1024 off."""
    source = _series(rsna_sample, 1)[0]
    path = make_enhanced_ct(tmp_path / "scans" / "one.dcm", [source])
    with pytest.raises(DicomError, match="an Enhanced CT file: each frame has its own rescale"):
        read_windowed(path)  # the single-slice readers refuse it rather than give wrong HU
    scan = scan_folder(tmp_path / "scans")
    assert scan.slices["path"].tolist() == ["one.dcm::frame=0"] and not np.isnan(scan.slices["position_mm"].iloc[0])
    np.testing.assert_array_equal(read_ref(scan.model_rows()["path"].iloc[0], size=32), read_windowed(source, size=32))


def test_a_multiframe_file_that_is_not_a_ct_volume_is_skipped_with_its_reason(tmp_path, rsna_sample):
    sources = _series(rsna_sample, 3)
    make_enhanced_ct(tmp_path / "scans" / "mr.dcm", sources, Modality="MR")
    make_enhanced_ct(tmp_path / "scans" / "scout.dcm", sources, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    make_enhanced_ct(tmp_path / "scans" / "cine.dcm", sources, SOPClassUID="1.2.840.10008.5.1.4.1.1.7.3")
    reasons = scan_folder(tmp_path / "scans").skipped.set_index("path")["reason"]
    assert "modality MR" in reasons["mr.dcm"] and "localizer" in reasons["scout.dcm"]
    assert "not a CT volume" in reasons["cine.dcm"] and len(reasons) == 3


@pytest.mark.parametrize("layout", ["as_dicom", "transposed", "mirrored"])
def test_a_nifti_volume_gives_the_dicom_slices_whatever_its_storage_order(tmp_path, rsna_sample, layout):
    sources = _series(rsna_sample, 4)
    path = make_nifti(tmp_path / "head.nii.gz", sources, layout)
    volume = nifti.read_volume(path)
    assert volume.kind == "NIfTI-1 (gzip)" and volume.shape == (512, 512, 4)
    np.testing.assert_allclose(volume.positions, [read_dicom(s).ImagePositionPatient for s in sources], atol=1e-3)
    for k, source in enumerate(sources):
        np.testing.assert_array_equal(nifti.read_slice_windowed(path, k, size=64)[0], read_windowed(source, size=64))


def test_a_nifti_volume_in_a_folder_is_found_by_content_and_ordered_inferior_first(tmp_path, rsna_sample):
    sources = _series(rsna_sample, 4)
    make_nifti(tmp_path / "scans" / "v.nii", sources, "mirrored").rename(tmp_path / "scans" / "volume_without_extension")
    scan = scan_folder(tmp_path / "scans")
    assert scan.skipped.empty and scan.slices["frame"].tolist() == [0, 1, 2, 3]
    assert scan.slices["series_uid"].unique().tolist() == ["volume_without_extension"]
    np.testing.assert_allclose(scan.slices["position_mm"].diff().dropna(), 5.0, atol=0.1)
    np.testing.assert_array_equal(read_ref(scan.model_rows()["path"].iloc[3], size=32), read_windowed(sources[3], size=32))


def test_volumes_that_are_not_ct_in_hu_or_not_axial_are_skipped_with_the_reason(tmp_path, rsna_sample):
    import nibabel
    root = tmp_path / "scans"
    root.mkdir()
    affine = np.diag([0.5, 0.5, 5.0, 1.0])
    nibabel.save(nibabel.Nifti1Image(np.full((16, 16, 4), 300, np.int16), affine), root / "mr.nii")
    nibabel.save(nibabel.Nifti1Image(np.full((16, 16, 4, 2), -1000, np.int16), affine), root / "fmri.nii")
    oblique = np.eye(4)  # every axis 54.7 degrees from superior: no slice of it is near axial
    oblique[:3, :3] = np.array([[2 ** -0.5, -(2 ** -0.5), 0], [6 ** -0.5, 6 ** -0.5, -2 * 6 ** -0.5], [3 ** -0.5] * 3])
    nibabel.save(nibabel.Nifti1Image(np.full((16, 16, 16), -1000, np.int16), oblique), root / "oblique.nii")
    swapped = affine[:, [0, 2, 1, 3]]  # stored coronal-first, yet its axial slices are there to take
    nibabel.save(nibabel.Nifti1Image(np.full((16, 4, 16), -1000, np.int16), swapped), root / "swapped.nii")
    air = np.random.default_rng(0).integers(-1000, 80, (16, 16, 4)).astype(np.int16)
    whole = gzip.compress(nibabel.Nifti1Image(air, affine).to_bytes())
    (root / "damaged.nii.gz").write_bytes(whole[:len(whole) // 2])  # the stream ends halfway
    header = bytearray((root / "mr.nii").read_bytes()[:352])
    header[344:348] = b"ni1\x00"
    (root / "pair.hdr").write_bytes(bytes(header))
    reasons = scan_folder(root).skipped.set_index("path")["reason"]
    assert "does not look like CT in Hounsfield units" in reasons["mr.nii"]
    assert "not one 3-D volume" in reasons["fmri.nii"]
    assert "55 degrees from axial" in reasons["oblique.nii"] and "swapped.nii" not in reasons
    assert "separate .img" in reasons["pair.hdr"]
    assert "unreadable NIfTI" in reasons["damaged.nii.gz"]


def test_slice_references_name_a_file_or_a_part_of_one(tmp_path):
    assert split_ref(slice_ref("a/b.dcm")) == ("a/b.dcm", None, None)
    assert split_ref(slice_ref("a/b::c.dcm", "frame", 12)) == ("a/b::c.dcm", "frame", 12)
    assert split_ref("v.nii::slice=3") == ("v.nii", "slice", 3)
    odd = tmp_path / "x::frame=3"  # a real file named like a reference is that file
    odd.write_bytes(b"")
    assert split_ref(str(odd)) == (str(odd), None, None)


def test_a_frame_is_decoded_alone_so_a_damaged_frame_spoils_only_itself(tmp_path, rsna_sample):
    from pydicom.encaps import encapsulate, generate_frames
    sources = _series(rsna_sample, 3)
    path = make_enhanced_ct(tmp_path / "enhanced.dcm", sources, "JPEG-LS Lossless")
    ds = read_dicom(path)
    frames = list(generate_frames(ds.PixelData, number_of_frames=3))
    frames[1] = frames[1][:40] + bytes(len(frames[1]) - 40)  # the stream zeroed after its header
    ds.PixelData = encapsulate(frames, has_bot=True)
    ds.save_as(path)
    with pytest.raises(DicomError, match="cannot decode frame 1"):
        read_frame_windowed(path, 1)
    for i in (0, 2):
        np.testing.assert_array_equal(read_frame_windowed(path, i, size=64)[0], read_windowed(sources[i], size=64))


@pytest.mark.parametrize("syntax", [None, "RLE Lossless"])
def test_reading_a_frame_holds_that_frame_not_the_file(tmp_path, rsna_sample, syntax):
    """Memory stays bounded: a 48-frame file (24 MB of pixels) is read a frame at a time."""
    import tracemalloc
    path = make_enhanced_ct(tmp_path / "long.dcm", _series(rsna_sample, 3) * 16, syntax)
    read_frames(path)  # the header, parsed once per process
    tracemalloc.start()
    try:
        image = read_frame_windowed(path, 40, size=64)[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert image.shape == (64, 64, 3)
    whole = min(48 * 512 * 512 * 2, path.stat().st_size)  # the pixels, or the file when compressed
    assert peak < whole / 2, f"{peak / 2**20:.1f} MiB to read one frame of {whole / 2**20:.1f} MiB"
