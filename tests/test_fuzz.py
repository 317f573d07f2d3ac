"""Damaged copies of real slices: every reader returns a correct-shaped result or DicomError.

Files from hospitals and mirrors are damaged in ways no one planned for; one exception of
another type would end a whole training run. The mutations are drawn with a fixed seed, so
a failure names a mutation that can be replayed.
"""
import gzip
import random
import signal
import struct
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from conftest import SAMPLE_DIR
from factories import GDCM_SYNTAXES, compress_with_gdcm, make_ct, make_enhanced_ct, rewrite_dicom
from utils.dicom import DicomError, Header, read_header, read_hu, read_windowed
from utils.headers import scan_headers
from utils.scans import _read_chunk
from utils.sources import read_windowed as read_ref
from utils.sources import slice_ref

# pydicom warns about much of what a damaged file holds; what matters here is what is raised
pytestmark = pytest.mark.filterwarnings("ignore")

N_FILES = 2400
N_FORMAT_FILES = 400
SIZE = 32
PER_FILE_LIMIT_S = 2  # a hang guard: a read takes about a millisecond
_LONG_VR = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}


def _seeds(tmp_path: Path) -> list[Path]:
    """Real slices of every header variant the sample has, pydicom's CT_small.dcm, and an
    implicit-VR file of our own (so the test has both syntaxes without the sample)."""
    seeds = [Path(get_testdata_file("CT_small.dcm")),
             make_ct(tmp_path / "implicit.dcm", np.full((64, 64), 1064), implicit=True)]
    if (SAMPLE_DIR / "stage_2_train.csv").is_file():
        seeds += sorted((SAMPLE_DIR / "stage_2_test").glob("*.dcm"))  # one per header variant
        seeds += sorted((SAMPLE_DIR / "stage_2_train").glob("*.dcm"))[::16]
    return seeds


def _length_fields(path: Path, data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of the length field of each element of the header, found by its tag."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, stop_before_pixels=False)
    implicit = ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    fields = []
    for elem in [*ds.file_meta, *ds]:
        tag = struct.pack("<HH", elem.tag.group, elem.tag.element)
        at = data.find(tag, 128)
        if at < 0:
            continue
        if implicit and elem.tag.group != 2:
            fields.append((at + 4, 4))
        elif elem.VR in _LONG_VR:
            fields.append((at + 8, 4))
        else:
            fields.append((at + 6, 2))
    return fields


def _mutate(rng: random.Random, data: bytes, lengths: list, header_end: int) -> tuple[bytes, str]:
    b = bytearray(data)
    kind = rng.choice(["flip", "truncate", "length", "splice", "zero"])
    if kind == "flip":
        at = [rng.randrange(header_end) for _ in range(rng.randint(1, 4))]
        for i in at:
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b), f"bits flipped at {at}"
    if kind == "truncate":
        n = rng.randrange(len(b))
        return bytes(b[:n]), f"truncated to {n} bytes"
    if kind == "length":
        offset, size = rng.choice(lengths)
        value = rng.choice([0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, rng.randrange(1, 1 << 16) | 1,
                            rng.randrange(1 << 32)])
        b[offset:offset + 4] = value.to_bytes(4, "little")
        return bytes(b), f"length at {offset} (size {size}) set to {value:#x}"
    if kind == "splice":
        at, extra = rng.randrange(header_end), rng.randbytes(rng.randint(1, 24))
        b[at:at] = extra
        return bytes(b), f"{len(extra)} random bytes spliced in at {at}"
    at, n = rng.randrange(header_end), rng.randint(2, 48)
    b[at:at + n] = bytes(len(b[at:at + n]))
    return bytes(b), f"{n} bytes zeroed at {at}"


class _Hung(Exception):
    pass


def _alarm(signum, frame):
    raise _Hung


def _check(path: Path, what: str) -> str:
    """Read one file with every reader; 'ok' or the DicomError reason; fail on anything else."""
    outcome = "ok"
    signal.setitimer(signal.ITIMER_REAL, PER_FILE_LIMIT_S)
    try:
        try:
            assert isinstance(read_header(path), Header)
        except DicomError as err:
            assert err.path == str(path) and err.reason, what
            outcome = err.reason
        for read, check in ((read_hu, lambda a: a.dtype == np.float32 and a.ndim == 2),
                            (lambda p: read_windowed(p, size=SIZE),
                             lambda a: a.dtype == np.uint8 and a.shape == (SIZE, SIZE, 3))):
            try:
                assert check(read(path)), what
            except DicomError as err:
                assert err.path == str(path) and err.reason, what
    except _Hung:
        pytest.fail(f"reading took over {PER_FILE_LIMIT_S} s: {what}")
    except DicomError:
        raise
    except Exception as err:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{type(err).__name__} escaped ({err}): {what}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return outcome


def test_damaged_copies_of_real_slices_give_an_image_or_a_dicom_error(tmp_path):
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        seeds = _seeds(tmp_path)
        originals = [(p, p.read_bytes()) for p in seeds]
        lengths = {p: _length_fields(p, data) for p, data in originals}
        rng = random.Random(13)
        outcomes, path = {}, tmp_path / "damaged.dcm"
        for n in range(N_FILES):
            source, data = originals[n % len(originals)]
            header_end = min(len(data), data.find(b"\xe0\x7f\x10\x00") + 12)
            damaged, what = _mutate(rng, data, lengths[source], header_end)
            path.write_bytes(damaged)
            reason = _check(path, f"file {n}: {source.name}, {what}")
            outcomes[reason.split(" (")[0][:40]] = outcomes.get(reason.split(" (")[0][:40], 0) + 1
    finally:
        signal.signal(signal.SIGALRM, old)
    # The mutations reach the parsers' many paths, not one early exit.
    assert 1000 < sum(v for k, v in outcomes.items() if k != "ok") < N_FILES, outcomes
    assert len(outcomes) >= 15, outcomes


def test_header_scan_of_damaged_files_lists_each_one_once(tmp_path):
    """The scan's cache (parquet) takes whatever text a damaged header holds."""
    source = Path(get_testdata_file("CT_small.dcm"))
    data = source.read_bytes()
    lengths = _length_fields(source, data)
    rng = random.Random(7)
    paths = []
    for n in range(150):
        paths.append(tmp_path / f"{n}.dcm")
        paths[-1].write_bytes(_mutate(rng, data, lengths, data.find(b"\xe0\x7f\x10\x00"))[0])
    headers, bad = scan_headers(paths, cache=tmp_path / "cache.parquet")
    assert len(headers) + len(bad) == len(paths) and len(bad) > 0
    assert set(headers["image_id"]).isdisjoint(Path(p).stem for p in bad["path"])
    again, bad_again = scan_headers(paths, cache=tmp_path / "cache.parquet")
    assert again["image_id"].tolist() == headers["image_id"].tolist()
    assert bad_again["reason"].tolist() == bad["reason"].tolist()


def _format_seeds(tmp_path: Path) -> list[Path]:
    """pydicom's CT_small.dcm in each compressed syntax and as two Enhanced CT files (native
    and compressed frames), and two NIfTI volumes (gzip and plain): small, so many fit."""
    import nibabel
    small = Path(get_testdata_file("CT_small.dcm"))
    seeds = [compress_with_gdcm(small, tmp_path / f"seed_{i}.dcm", s) for i, s in enumerate(GDCM_SYNTAXES)]
    frames = [rewrite_dicom(small, tmp_path / f"frame_{z}.dcm", ImagePositionPatient=[0, 0, z]) for z in (0, 5, 10)]
    seeds += [make_enhanced_ct(tmp_path / "seed_enhanced.dcm", frames),
              make_enhanced_ct(tmp_path / "seed_enhanced_jls.dcm", frames, "JPEG-LS Lossless")]
    volume = np.random.default_rng(0).integers(-1000, 100, (24, 24, 4)).astype(np.int16)
    for name in ("seed.nii", "seed.nii.gz"):
        nibabel.save(nibabel.Nifti1Image(volume, np.diag([0.5, 0.5, 5, 1])), tmp_path / name)
        seeds.append(tmp_path / name)
    return seeds


def _check_any_format(path: Path, what: str) -> str:
    """A folder scan's reading of one file, then every slice it found read as the model
    reads it: 'ok', 'not dicom' or the reason; fail on any other exception or a hang."""
    signal.setitimer(signal.ITIMER_REAL, PER_FILE_LIMIT_S)
    try:
        (kind, value), = _read_chunk([str(path)])
        if kind != "slices":
            return kind if kind == "not_dicom" else value
        for part, index, *_ in value[3]:
            try:
                image = read_ref(slice_ref(path, part, index), size=SIZE)
                assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3), what
            except DicomError as err:
                assert err.path == str(path) and err.reason, what
                return err.reason
        return "ok"
    except _Hung:
        pytest.fail(f"reading took over {PER_FILE_LIMIT_S} s: {what}")
    except Exception as err:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{type(err).__name__} escaped ({err}): {what}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def test_damaged_compressed_multiframe_and_nifti_files_give_slices_or_a_reason(tmp_path):
    """The new readers' bytes: compressed streams, functional groups, NIfTI headers and
    gzip streams, damaged anywhere (also inside the pixel data): a slice or a reason."""
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        originals = [(p, p.read_bytes()) for p in _format_seeds(tmp_path)]
        rng = random.Random(23)
        outcomes, path = {}, tmp_path / "damaged"
        for n in range(N_FORMAT_FILES):
            source, data = originals[n % len(originals)]
            if source.name.endswith(".gz") and n % 2:  # the header inside the stream, then the stream itself
                damaged, what = _mutate(rng, gzip.decompress(data), [(0, 4), (40, 2)], 352)  # sizeof_hdr, dim[0]
                damaged = gzip.compress(damaged)
            else:
                damaged, what = _mutate(rng, data, [(rng.randrange(len(data) - 4), 4)], len(data))
            path.write_bytes(damaged)
            reason = _check_any_format(path, f"file {n}: {source.name}, {what}")
            outcomes[reason.split(" (")[0][:40]] = outcomes.get(reason.split(" (")[0][:40], 0) + 1
    finally:
        signal.signal(signal.SIGALRM, old)
    assert 0.2 * N_FORMAT_FILES < sum(v for k, v in outcomes.items() if k not in ("ok", "not_dicom")), outcomes
    assert outcomes.get("ok", 0) > 0.1 * N_FORMAT_FILES and len(outcomes) >= 10, outcomes


def test_damaged_label_files_of_a_folder_give_labels_or_a_label_error(tmp_path, rsna_sample):
    from factories import build_labelled_export
    from utils.dataset import labelled_folder, match_labels, read_folder_labels
    from utils.labels import LabelError
    from utils.scans import scan_folder
    truth = build_labelled_export(tmp_path / "site", rsna_sample)
    lines = [f"{p},,{int(a)},{int(s)}" for p, a, s in zip(truth.index[:6], truth["any"], truth["subdural"])]
    data = "\n".join(["path,series_uid,any,subdural", *lines, f",{truth['series_uid'].iloc[-1]},1,"]).encode()
    (tmp_path / "labels.csv").write_bytes(data)
    assert len(labelled_folder(tmp_path / "site", tmp_path / "labels.csv").series_labels) == 1
    scan, rng, outcomes = scan_folder(tmp_path / "site"), random.Random(5), {"labels": 0, "error": 0}
    for i in range(150):
        b = bytearray(data)
        for _ in range(rng.randint(1, 2)):
            at = rng.randrange(len(b))
            b[at:at + rng.randint(0, 2)] = bytes(rng.choice(b",\n\r\"01 x\x00\xff") for _ in range(rng.randint(0, 3)))
        (tmp_path / "labels.csv").write_bytes(bytes(b))
        try:
            result = match_labels(scan, read_folder_labels(tmp_path / "labels.csv"), tmp_path / "labels.csv")
            values = result.labels.to_numpy()
            assert np.isin(values[~np.isnan(values)], (0, 1)).all(), i
            outcomes["labels"] += 1
        except LabelError as err:
            assert "labels.csv" in str(err), (i, str(err))
            outcomes["error"] += 1
    assert outcomes["labels"] > 5 and outcomes["error"] > 5, outcomes  # both ways were exercised
