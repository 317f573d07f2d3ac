"""utils.dicom against closed-form values, pydicom's own modality LUT and the real sample."""
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut
from pydicom.uid import JPEGLosslessSV1, RLELossless

from factories import ESCAPED_BEFORE, GDCM_SYNTAXES, compress_with_gdcm, make_ct
from utils.dicom import (BONE, BRAIN, DEFAULT_WINDOWS, HEADER, SOFT_TISSUE, SUBDURAL, DicomError,
                         parse_windows, read_header, read_hu, read_windowed, window)
from utils import headers as headers_module
from utils.headers import scan_headers
from utils.scans import scan_folder


def pydicom_hu(path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Invalid value for VR UI")
        ds = pydicom.dcmread(path)
        return apply_modality_lut(ds.pixel_array, ds)


# --- window: closed form ------------------------------------------------------------------

def test_window_closed_form():
    c, w = 40.0, 80.0
    hu = np.array([-1000, 0, 20, 40, 60, 80, 3000], dtype=np.float32)
    # 0 at c - w/2 = 0 and below, 255 at c + w/2 = 80 and above, (hu - 0) / 80 * 255 between
    assert window(hu, c, w).tolist() == [0, 0, 64, 128, 191, 255, 255]
    assert window(hu, c, w).dtype == np.uint8


def test_window_does_not_modify_input_and_handles_zero_width():
    hu = np.array([39.0, 40.0, 41.0])
    before = hu.copy()
    assert window(hu, 40, 0).tolist() == [0, 0, 255]
    np.testing.assert_array_equal(hu, before)
    with pytest.raises(ValueError):
        window(hu, 40, -1)


def test_parse_windows():
    assert parse_windows("brain,subdural,soft_tissue") == DEFAULT_WINDOWS
    assert parse_windows("bone, 30/60 ,header") == (BONE, (30.0, 60.0), HEADER)
    with pytest.raises(ValueError, match="unknown window"):
        parse_windows("lung")
    for bad in ("40/-80", "nan/80", "40/inf"):
        with pytest.raises(ValueError, match="width >= 0"):
            parse_windows(bad)
    with pytest.raises(ValueError, match="1 to 8 windows, got 9"):
        parse_windows(",".join(["brain"] * 9))


# --- Hounsfield units on every header variant ---------------------------------------------

@pytest.mark.parametrize("bits_stored,signed,intercept,slope,implicit", [
    (12, False, "-1024", "1", False),
    (16, True, "-1024.000000", "1.000000", True),
    (16, True, "-1000", "1.0", False),
    (12, True, "-1024", "1", False),
    (16, False, "-1024", "2", True),
    (12, False, "-1024.5", "0.5", False),
])
def test_read_hu_matches_pydicom(tmp_path, bits_stored, signed, intercept, slope, implicit):
    rng = np.random.default_rng(0)
    lo, hi = (-(1 << (bits_stored - 1)), 1 << (bits_stored - 1)) if signed else (0, 1 << bits_stored)
    stored = rng.integers(lo, hi, size=(20, 24))
    path = make_ct(tmp_path / "a.dcm", stored, bits_stored=bits_stored, signed=signed,
                   intercept=intercept, slope=slope, implicit=implicit)
    hu = read_hu(path)
    assert hu.dtype == np.float32 and hu.shape == (20, 24)
    np.testing.assert_allclose(hu, pydicom_hu(path), rtol=0, atol=1e-3)
    np.testing.assert_allclose(hu, stored * float(slope) + float(intercept), atol=1e-3)


def test_bits_above_bits_stored_are_masked_like_pydicom(tmp_path):
    stored = np.array([[0, 4095, 4096, 5000]], dtype=np.uint16)  # 4096 and 5000 overflow 12 bits
    path = make_ct(tmp_path / "a.dcm", stored, bits_stored=12, signed=False)
    np.testing.assert_array_equal(read_hu(path), pydicom_hu(path))
    assert read_hu(path).tolist() == [[-1024, 3071, -1024, 904 - 1024]]


def test_rsna_12bit_wrap_is_undone(tmp_path):
    # Known HU, stored the way the broken RSNA files store them: HU modulo 4096, intercept 0.
    hu = np.array([[-1000, -500, -1, 0, 40, 80, 1500, 3000]], dtype=np.int32)
    stored = hu % 4096
    path = make_ct(tmp_path / "wrap.dcm", stored, bits_stored=12, signed=False, intercept="0")
    assert read_header(path).wrapped_12bit
    np.testing.assert_array_equal(read_hu(path), hu.astype(np.float32))
    # pydicom knows nothing of the wrap: it reads -500 HU as +3596
    assert pydicom_hu(path)[0, 1] == 3596


def test_monochrome1_is_inverted(tmp_path):
    stored = np.array([[1024, 1064, 1104]])  # 0, 40, 80 HU
    m2 = read_windowed(make_ct(tmp_path / "m2.dcm", stored), (BRAIN,))
    m1 = read_windowed(make_ct(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1"), (BRAIN,))
    assert m2[..., 0].tolist() == [[0, 128, 255]]
    assert m1[..., 0].tolist() == [[255, 127, 0]]


def test_header_window_takes_first_of_multi_valued(tmp_path):
    stored = np.array([[1024, 1054, 1084]])  # 0, 30, 60 HU
    path = make_ct(tmp_path / "w.dcm", stored, center="30\\40", width="60\\80")
    h = read_header(path)
    assert (h.window_center, h.window_width, h.multi_window) == (30.0, 60.0, True)
    assert read_windowed(path, (HEADER,))[..., 0].tolist() == [[0, 128, 255]]
    no_window = make_ct(tmp_path / "n.dcm", stored)
    with pytest.raises(DicomError, match="header window"):
        read_windowed(no_window, (HEADER,))


def test_read_windowed_channels_equal_window_of_hu(tmp_path):
    rng = np.random.default_rng(1)
    path = make_ct(tmp_path / "a.dcm", rng.integers(0, 4096, size=(32, 32)), bits_stored=12,
                   signed=False)
    hu = read_hu(path)
    for windows in (DEFAULT_WINDOWS, (BRAIN,), (BONE, SUBDURAL), (BRAIN, SUBDURAL, SOFT_TISSUE, BONE),
                    (BRAIN, SUBDURAL, SOFT_TISSUE, BONE, (0, 100))):
        img = read_windowed(path, windows)
        assert img.shape == (32, 32, len(windows)) and img.dtype == np.uint8
        assert img.flags.c_contiguous
        expected = np.stack([window(hu, c, w) for c, w in windows], axis=-1)
        np.testing.assert_array_equal(img, expected)


def test_non_square_is_padded_not_stretched(tmp_path):
    stored = np.full((40, 80), 1024 + 80)  # a 2:1 bright rectangle (80 HU: 255 in brain)
    img = read_windowed(make_ct(tmp_path / "r.dcm", stored), (BRAIN,), size=40)
    assert img.shape == (40, 40, 1)
    # the 80x40 image fits as 40x20 in the middle; the rows above and below are padding
    assert (img[:8, :, 0] == 0).all() and (img[-8:, :, 0] == 0).all()
    assert (img[12:28, :, 0] == 255).all()


def test_resize_keeps_dtype_and_size(tmp_path):
    path = make_ct(tmp_path / "a.dcm", np.full((64, 64), 1064))
    for size in (32, 64, 96):
        img = read_windowed(path, size=size)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        assert (img[..., 0] == 128).all()  # a flat image stays flat through any resize


def test_rle_compressed_decodes_with_pydicom_alone(tmp_path):
    stored = np.random.default_rng(2).integers(0, 4096, size=(16, 16))
    plain = make_ct(tmp_path / "plain.dcm", stored, bits_stored=12, signed=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Invalid value for VR UI")
        ds = pydicom.dcmread(plain)
        ds.compress(RLELossless)
        ds.save_as(tmp_path / "rle.dcm")
    np.testing.assert_array_equal(read_hu(tmp_path / "rle.dcm"), read_hu(plain))
    assert read_header(tmp_path / "rle.dcm").transfer_syntax == RLELossless


def test_a_syntax_whose_decoder_is_missing_names_what_to_install(tmp_path, monkeypatch):
    """As in an environment without python-gdcm: the file is named with the reason, at
    header-scan time, and a folder scan skips it rather than stopping."""
    path = compress_with_gdcm(make_ct(tmp_path / "plain.dcm", np.full((8, 8), 1064), Modality="CT"),
                              tmp_path / "scans" / "j.dcm", "JPEG Lossless SV1")
    decoder = pydicom.pixels.get_decoder(JPEGLosslessSV1)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"gdcm": ("python-gdcm",)})
    with pytest.raises(DicomError, match="needs a decoder that is not installed: gdcm - requires python-gdcm") as err:
        read_windowed(path)
    assert str(path) in str(err.value)
    with pytest.raises(DicomError, match="needs a decoder that is not installed"):
        read_header(path)  # so the header scan lists it, before any epoch
    scan = scan_folder(tmp_path / "scans")
    assert scan.slices.empty and "python-gdcm" in scan.skipped.set_index("path").at["j.dcm", "reason"]


@pytest.mark.parametrize("syntax", list(GDCM_SYNTAXES))
def test_real_slices_written_losslessly_in_each_syntax_read_as_the_uncompressed_files(tmp_path, rsna_sample, syntax):
    """Real sample slices of each header variant (12-bit wrapped, 16-bit signed with padding,
    implicit VR...) through the decoders of requirements.txt: the same HU and windowed
    images (all 70, and --predict on them: test_formats.py)."""
    train = sorted(rsna_sample.glob("stage_2_train/*.dcm"))
    sources = sorted(rsna_sample.glob("stage_2_test/*.dcm")) + [train[0], train[-1]]  # each header variant
    assert len({read_header(s).bits_stored for s in sources}) == 2 and len(sources) == 7
    for source in sources:
        copy = compress_with_gdcm(source, tmp_path / "copy.dcm", syntax)
        assert read_header(copy).transfer_syntax != read_header(source).transfer_syntax
        np.testing.assert_array_equal(read_hu(copy), read_hu(source), err_msg=str(source))
        np.testing.assert_array_equal(read_windowed(copy, size=64), read_windowed(source, size=64), err_msg=str(source))


# --- bad files ----------------------------------------------------------------------------

@pytest.fixture
def good_file(tmp_path) -> Path:
    return make_ct(tmp_path / "good.dcm", np.full((64, 64), 1064))


@pytest.mark.parametrize("damage,reason", [
    (lambda b: b"", "empty"),
    (lambda b: b[:200], "truncated"),
    (lambda b: b"not a dicom file at all" * 20, "not a DICOM"),
    (lambda b: b[:-100], "pixel data is short"),
])
def test_bad_files_raise_dicom_error_naming_path(tmp_path, good_file, damage, reason):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(damage(good_file.read_bytes()))
    for reader in (read_hu, read_windowed, read_header):
        with pytest.raises(DicomError, match=reason) as err:
            reader(bad)
        assert err.value.path == str(bad) and str(bad) in str(err.value)


@pytest.mark.parametrize("kind", sorted(ESCAPED_BEFORE))
def test_damage_that_escaped_before_is_a_dicom_error_with_its_reason(tmp_path, kind):
    damage, reason = ESCAPED_BEFORE[kind]
    good = make_ct(tmp_path / "good.dcm", np.full((16, 16), 1064))
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(damage(good.read_bytes()))
    for reader in (read_header, read_hu, read_windowed):  # the scan finds it, not an epoch
        with pytest.raises(DicomError, match=re.escape(reason)) as err:
            reader(bad)
        assert err.value.path == str(bad)


@pytest.mark.parametrize("tags,reason", [
    (dict(slope="0"), "RescaleSlope is 0"),
    (dict(slope="nan"), "RescaleSlope 'nan' is not a finite number"),
    (dict(intercept="-inf"), "RescaleIntercept '-inf' is not a finite number"),
    (dict(center="nan", width="80"), "WindowCenter 'nan' is not a finite number"),
    (dict(center="40", width="inf"), "WindowWidth 'inf' is not a finite number"),
    (dict(SamplesPerPixel=3), "3 samples per pixel (colour data): not a CT slice"),
    (dict(bits_stored=17), "BitsStored 17 does not fit in BitsAllocated 16"),
    (dict(PixelRepresentation=2), "PixelRepresentation 2 is not 0 or 1"),
    (dict(ImagePositionPatient=[0, 0, float("nan")]), "(0020,0032) ImagePositionPatient"),
])
def test_header_values_must_mean_something(tmp_path, tags, reason):
    path = make_ct(tmp_path / "a.dcm", np.full((8, 8), 1064), **tags)
    for reader in (read_header, read_windowed):
        with pytest.raises(DicomError, match=re.escape(reason)):
            reader(path)


def test_a_number_that_does_not_parse_is_named(tmp_path):
    path = make_ct(tmp_path / "a.dcm", np.full((8, 8), 1064), intercept="-1024")
    path.write_bytes(path.read_bytes().replace(b"-1024", b"-10x4"))
    for reader in (read_header, read_windowed):
        with pytest.raises(DicomError, match="RescaleIntercept '-10x4' is not a number"):
            reader(path)


def _patched(path: Path, tag: bytes, value: bytes) -> Path:
    """Overwrite a 2-byte US value in place (pydicom refuses to write such values)."""
    data = bytearray(path.read_bytes())
    i = data.index(tag + b"US\x02\x00") + 8
    data[i:i + 2] = value
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("tag,value,reason", [
    (b"\x28\x00\x10\x00", 0, "image size 0x8 is outside 1..4096"),
    (b"\x28\x00\x11\x00", 5000, "image size 8x5000 is outside 1..4096"),
    (b"\x28\x00\x00\x01", 12, "BitsAllocated 12 is not 8, 16 or 32"),
])
def test_sizes_and_bit_depths_are_checked(tmp_path, tag, value, reason):
    path = _patched(make_ct(tmp_path / "a.dcm", np.full((8, 8), 1064)), tag, value.to_bytes(2, "little"))
    for reader in (read_header, read_windowed):
        with pytest.raises(DicomError, match=re.escape(reason)):
            reader(path)


def test_pixel_data_of_odd_length_is_named(tmp_path):
    path = make_ct(tmp_path / "a.dcm", np.full((8, 8), 1064))
    data = bytearray(path.read_bytes())
    i = data.index(b"\xe0\x7f\x10\x00OW") + 8
    data[i:i + 4] = (129).to_bytes(4, "little")  # 64 16-bit values + 1 byte
    path.write_bytes(bytes(data) + b"\x00")
    with pytest.raises(DicomError, match="pixel data length 129 is not a whole number of 16-bit values"):
        read_windowed(path)


def test_header_window_must_have_a_positive_width(tmp_path):
    path = make_ct(tmp_path / "a.dcm", np.full((8, 8), 1064), center="40", width="-80")
    assert read_windowed(path).shape == (8, 8, 3)  # the named windows need no header window
    with pytest.raises(DicomError, match="width -80 is negative"):
        read_windowed(path, (HEADER,))


@pytest.mark.parametrize("signed", [True, False])
def test_32_bit_slices_match_pydicom(tmp_path, signed):
    rng = np.random.default_rng(3)
    stored = rng.integers(-3000 if signed else 0, 70000, size=(12, 10))
    path = make_ct(tmp_path / "a.dcm", stored, bits_allocated=32, bits_stored=32, signed=signed,
                   intercept="-1024", slope="0.5")
    hu = read_hu(path)
    np.testing.assert_allclose(hu, pydicom_hu(path), atol=1e-3)
    np.testing.assert_allclose(hu, stored * 0.5 - 1024, atol=1e-3)
    img = read_windowed(path, DEFAULT_WINDOWS)
    expected = np.stack([window(stored * 0.5 - 1024, c, w) for c, w in DEFAULT_WINDOWS], axis=2)
    np.testing.assert_array_equal(img, expected)
    assert read_windowed(path, DEFAULT_WINDOWS, size=16).shape == (16, 16, 3)
    assert read_header(path).bits_allocated == 32


def test_missing_file_raises_dicom_error(tmp_path):
    with pytest.raises(DicomError, match="cannot read"):
        read_hu(tmp_path / "nope.dcm")


def test_wrong_size_header_is_an_error(tmp_path):
    path = make_ct(tmp_path / "a.dcm", np.zeros((8, 8)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Invalid value for VR UI")
        ds = pydicom.dcmread(path)
    ds.Rows = 16  # the header claims twice the pixels the file holds
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DicomError, match="pixel data is short"):
        read_windowed(path)


# --- header scan --------------------------------------------------------------------------

def test_a_cache_of_other_columns_is_read_again(tmp_path):
    # a cache written before the header kept the slice geometry lacks its columns
    axial = make_ct(tmp_path / "axial.dcm", np.full((64, 64), 1064), ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
    cache = tmp_path / "cache.parquet"
    headers, _ = scan_headers([axial], cache=cache)
    pd.read_parquet(cache).drop(columns=["normal_z"]).to_parquet(cache)
    again, _ = scan_headers([axial], cache=cache)
    pd.testing.assert_frame_equal(headers, again)
    assert again.loc[0, ["x", "y", "z", "normal_x", "normal_y", "normal_z"]].tolist() == [-125, -125, 42.5, 0, 0, 1]
    assert list(pd.read_parquet(cache).columns)[-1] == "normal_z"


def test_scan_headers_lists_bad_files_and_uses_cache(tmp_path, good_file, monkeypatch):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"")
    cache = tmp_path / "cache.parquet"
    headers, bad_files = scan_headers([good_file, bad], cache=cache)
    assert headers["image_id"].tolist() == ["good"]
    assert headers.loc[0, "z"] == 42.5 and headers.loc[0, "patient_id"] == "ID_12345678"
    assert bad_files["path"].tolist() == [str(bad)] and "empty" in bad_files.loc[0, "reason"]
    assert cache.is_file()
    cached = pd.read_parquet(cache)
    assert set(cached["path"]) == {str(good_file), str(bad)}
    # a second scan of unchanged files reads none of them
    read = []
    monkeypatch.setattr(headers_module, "_scan_chunk", lambda paths: read.extend(paths) or [])
    headers2, bad2 = scan_headers([good_file, bad], cache=cache)
    assert read == []
    pd.testing.assert_frame_equal(headers, headers2, check_dtype=False)
    assert bad2["path"].tolist() == [str(bad)]
    # a changed file is read again
    bad.write_bytes(good_file.read_bytes())
    monkeypatch.undo()
    headers3, bad3 = scan_headers([good_file, bad], cache=cache)
    assert len(headers3) == 2 and bad3.empty


def test_parallel_scan_equals_serial(tmp_path):
    paths = [make_ct(tmp_path / f"{i}.dcm", np.full((8, 8), 1000 + i), ImagePositionPatient=[0, 0, i])
             for i in range(12)]
    (tmp_path / "bad.dcm").write_bytes(b"DICM")
    paths.append(tmp_path / "bad.dcm")
    serial = scan_headers(paths)
    parallel = scan_headers(paths, workers=2, parallel_min=1)
    pd.testing.assert_frame_equal(serial[0], parallel[0])
    pd.testing.assert_frame_equal(serial[1], parallel[1])
    assert serial[0]["z"].tolist() == list(range(12))


# --- references: pydicom's CT_small.dcm and the real RSNA sample --------------------------

def test_ct_small_matches_pydicom():
    path = pydicom.data.get_testdata_file("CT_small.dcm")
    np.testing.assert_array_equal(read_hu(path), pydicom_hu(path))
    h = read_header(path)
    assert (h.rows, h.columns, h.bits_stored, h.pixel_representation) == (128, 128, 16, 1)


def test_real_sample_decodes_and_matches_pydicom(rsna_sample):
    files = sorted((rsna_sample / "stage_2_train").glob("*.dcm")) + \
        sorted((rsna_sample / "stage_2_test").glob("*.dcm"))
    assert len(files) == 70
    variants = set()
    for path in files:
        hu = read_hu(path)
        np.testing.assert_array_equal(hu, pydicom_hu(path).astype(np.float32), err_msg=str(path))
        img = read_windowed(path, size=256)
        assert img.shape == (256, 256, 3) and img.std() > 0
        h = read_header(path)
        variants.add((h.bits_stored, h.pixel_representation, h.rescale_intercept, h.transfer_syntax))
    assert len(variants) >= 4  # both train series and the test set's header variants


def test_real_sample_headers(rsna_sample):
    headers, bad = scan_headers(sorted((rsna_sample / "stage_2_train").glob("*.dcm")))
    assert bad.empty and len(headers) == 65
    assert headers["patient_id"].value_counts().to_dict() == {"ID_cd5a85fd": 33, "ID_ee4d05e4": 32}
    assert headers["z"].notna().all()
    twelve = headers[headers["patient_id"] == "ID_cd5a85fd"]
    assert (twelve["bits_stored"] == 12).all() and twelve["multi_window"].all()


# pydicom's own compressed files: the decoders' edge cases (a sign bit the J2K stream and
# the header disagree on, 13 and 14 stored bits, near-lossless JPEG-LS, 32-bit RLE).
PYDICOM_DECODED = ["JPEG2000.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm",
                   "J2K_pixelrep_mismatch.dcm", "JPEGLSNearLossless_16.dcm", "693_J2KI.dcm", "rtdose_rle_1frame.dcm"]


@pytest.mark.parametrize("name", PYDICOM_DECODED)
def test_pydicoms_compressed_files_give_the_hu_of_its_own_modality_lut(name):
    path = pydicom.data.get_testdata_file(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        expected = apply_modality_lut(ds.pixel_array, ds)
    assert read_header(path).transfer_syntax == ds.file_meta.TransferSyntaxUID
    np.testing.assert_array_equal(read_hu(path), expected.astype(np.float32))


@pytest.mark.parametrize("name, reason", [
    ("JPGExtended.dcm", "12-bit precision"),  # 12-bit JPEG Extended: python-gdcm through pydicom declines it
    ("JPEG2000-embedded-sequence-delimiter.dcm", "cannot decode pixel data"),
    ("MR_truncated.dcm", "pixel data is short"),
])
def test_pydicoms_files_that_cannot_be_decoded_here_give_the_reason(name, reason):
    path = pydicom.data.get_testdata_file(name)
    with pytest.raises(DicomError, match=reason) as err:
        read_windowed(path)
    assert err.value.path == path
