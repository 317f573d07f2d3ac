"""Damaged copies of real slices: every reader returns a correct-shaped result or DicomError.

Files from hospitals and mirrors are damaged in ways no one planned for; one exception of
another type would end a whole training run. The mutations are drawn with a fixed seed, so
a failure names a mutation that can be replayed.
"""
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
from factories import make_ct
from utils.dicom import DicomError, Header, read_header, read_hu, read_windowed
from utils.headers import scan_headers

# pydicom warns about much of what a damaged file holds; what matters here is what is raised
pytestmark = pytest.mark.filterwarnings("ignore")

N_FILES = 2400
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
