"""Slice reading speed: the project's path against the naive one, in one process.

    python benchmarks/bench_dicom.py [--repeat 20] [--size 512] [--files DIR]
                                     [--compressed-repeat 7] [--compressed-size 256]
                                     [--crop-repeat 30]
    python benchmarks/bench_dicom.py --crop-only [--crop-repeat 30] [--files DIR]

Naive: pydicom ``pixel_array`` -> float32 HU -> three clipped windows -> resize.
Project: ``utils.dicom.read_windowed(path, size=...)`` (look-up table over the stored
values, own parser for uncompressed files, one resize). Both run on the same files, the
real RSNA sample when it is present (else 512x512 synthetic slices of each variant);
the outputs are compared so the speed-up is not bought with a different answer. Also
times the header scan (headers/second), serial and across processes.

Compressed files: the same slices are written with gdcm as JPEG Lossless SV1, JPEG 2000
Lossless, RLE Lossless and JPEG-LS Lossless, and ``read_windowed`` (pydicom and its
decoder plugins) is timed on each against the uncompressed fast path at the training's
size, after a check that every copy gives exactly its source's image.

Crop (``--crop head``): ``read_windowed(path, size=256)`` against the same with
``crop="head"`` on the same files, the extra steps timed one by one (the mask's gather, the
head's box, the crop's copy, the resize of a square that is no longer 512); then the share
of the 256x256 output that is head (above HEAD_HU), without and with the crop, from each
slice's HU, after a check that the box measured there is the one the reader cuts to.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.crop import HEAD_HU, crop_square, head_box, sampled  # noqa: E402
from utils.demo import write_plain_slices  # noqa: E402
from utils.dicom import (DEFAULT_WINDOWS, UNCOMPRESSED, read_header, read_hu, read_windowed,  # noqa: E402
                         read_windowed_box)
# The reader's own steps, to time the crop's parts one by one as the hot path runs them.
from utils.dicom import _head_lut, _lut_key, _packed_lut, _read_raw, _resize, _resize_cut, _resolve_windows, _square  # noqa: E402
from utils.headers import scan_headers  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "rsna_sample"
TRAIN_SIZE = 256  # what training reads, so what the compressed paths and the crop are timed at
# Options of the sections that --crop-only skips, and their defaults.
OTHER_SECTIONS = {"repeat": 20, "size": 512, "compressed_repeat": 7, "compressed_size": TRAIN_SIZE}
# Lossless syntaxes of CT archives: our name -> (gdcm.TransferSyntax's name, the UID).
COMPRESSED = {
    "JPEG Lossless SV1": ("JPEGLosslessProcess14_1", pydicom.uid.JPEGLosslessSV1),
    "JPEG 2000 Lossless": ("JPEG2000Lossless", pydicom.uid.JPEG2000Lossless),
    "RLE Lossless": ("RLELossless", pydicom.uid.RLELossless),
    "JPEG-LS Lossless": ("JPEGLSLossless", pydicom.uid.JPEGLSLossless),
}


def naive_read(path, size: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Invalid value for VR UI")
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    channels = []
    for center, width in DEFAULT_WINDOWS:
        lo = center - width / 2
        channels.append(np.clip((hu - lo) / width, 0, 1) * 255)
    img = np.stack(channels, axis=-1).astype(np.uint8)
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def rates(fns, paths, repeat: int) -> list[float]:
    """Images/second of each function: passes interleaved, the median pass counts, so a
    burst of load elsewhere on the machine hits both paths alike."""
    for fn in fns:
        for p in paths:
            fn(p)  # warm the page cache and look-up tables alike for both paths
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            for p in paths:
                fn(p)
            t.append(time.perf_counter() - t0)
    return [len(paths) / float(np.median(t)) for t in times]


def source_files(files: Path | None, tmp: str) -> tuple[list[Path], str]:
    if files:
        return sorted(files.glob("*.dcm")), str(files)
    if (SAMPLE / "stage_2_train").is_dir():
        paths = sorted((SAMPLE / "stage_2_train").glob("*.dcm")) + sorted((SAMPLE / "stage_2_test").glob("*.dcm"))
        return paths, "real RSNA sample"
    return write_plain_slices(tmp, 30), f"synthetic 512x512 slices: no RSNA sample at {SAMPLE}"


def bench_naive(paths: list[Path], source: str, args) -> None:
    # Same answer, except where the naive path is wrong: it knows nothing of the 12-bit wrap.
    wrapped = [p for p in paths if read_header(p).wrapped_12bit]
    worst = max([int(np.abs(read_windowed(p, size=args.size).astype(int)
                            - naive_read(p, args.size).astype(int)).max())
                 for p in paths if p not in wrapped] or [0])
    naive, ours = rates([lambda p: naive_read(p, args.size), lambda p: read_windowed(p, size=args.size)],
                        paths, args.repeat)
    print(f"files: {len(paths)} ({source}), median of {args.repeat} interleaved passes, "
          f"size {args.size}, one core")
    print(f"naive   (pixel_array -> float HU -> 3 windows -> resize): {naive:8.1f} images/s "
          f"({1000 / naive:.2f} ms/slice)")
    print(f"project (read_windowed):                                  {ours:8.1f} images/s "
          f"({1000 / ours:.2f} ms/slice)")
    print(f"ratio: {ours / naive:.1f}x   (largest difference between the two: {worst} grey level"
          f"{f'; the naive path misreads the {len(wrapped)} wrapped 12-bit files' if wrapped else ''})")


def bench_header_scan(paths: list[Path]) -> None:
    many = [str(p) for p in paths] * max(1, 4000 // len(paths))
    t0 = time.perf_counter()
    scan_headers(many)
    serial = len(many) / (time.perf_counter() - t0)
    workers = os.cpu_count() or 1
    t0 = time.perf_counter()
    scan_headers(many, workers=workers, parallel_min=1)
    parallel = len(many) / (time.perf_counter() - t0)
    print(f"header scan of {len(many)} files: {serial:,.0f} headers/s serial, "
          f"{parallel:,.0f} headers/s with {workers} processes (page cache warm)")


def write_compressed(gdcm, src: Path, dst: Path, syntax: str) -> None:
    """A copy of ``src`` with its pixels in ``syntax`` (a gdcm.TransferSyntax name)."""
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    if not reader.Read():
        sys.exit(f"gdcm cannot read {src}")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    if not change.Change():
        sys.exit(f"gdcm cannot compress {src} as {syntax}")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        sys.exit(f"gdcm cannot write {dst}")


def check_copies(paths: list[Path], copies: dict[str, list[Path]]) -> int:
    """Every copy is in its syntax and gives exactly its source's windowed image, so no
    speed below comes from a wrong or skipped decode. Returns the number checked."""
    checked = 0
    for name, files in copies.items():
        uid = COMPRESSED[name][1]
        for src, dst in zip(paths, files):
            if read_header(dst).transfer_syntax != uid:
                sys.exit(f"{dst}: gdcm wrote {read_header(dst).transfer_syntax}, not {name} ({uid})")
            if not np.array_equal(read_windowed(dst), read_windowed(src)):
                sys.exit(f"{dst} ({name}) decodes to another image than {src}")
            checked += 1
    return checked


def decoding_plugin(path: Path, uid: str) -> str:
    """The pydicom plugin that decodes ``path``: pixel_array tries the available ones in
    pydicom's order and keeps the first that succeeds; so does this."""
    decoder = pydicom.pixels.get_decoder(uid)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Invalid value for VR UI")
        ds = pydicom.dcmread(path)
    for name in decoder.available_plugins:
        with contextlib.suppress(Exception):
            decoder.as_array(ds, raw=True, decoding_plugin=name)
            return name
    return "none"


@contextlib.contextmanager
def one_core():
    """Pin this process to one CPU: gdcm's OpenJPEG decodes with a thread per CPU, while
    the loader scales by processes, one per core."""
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def bench_compressed(paths: list[Path], source: str, folder: Path, args) -> None:
    try:
        import gdcm
    except ImportError:
        print("compressed files: not measured, python-gdcm is not installed")
        return
    not_plain = [p for p in paths if read_header(p).transfer_syntax not in UNCOMPRESSED]
    if not_plain:
        sys.exit(f"{not_plain[0]}: the sources must be uncompressed, the baseline is the fast path")
    copies = {}
    for name, (syntax, _) in COMPRESSED.items():
        (folder / syntax).mkdir()
        copies[name] = [folder / syntax / p.name for p in paths]
        for src, dst in zip(paths, copies[name]):
            write_compressed(gdcm, src, dst, syntax)
    checked = check_copies(paths, copies)

    size = args.compressed_size
    fns = [lambda p: read_windowed(p, size=size)]
    for files in copies.values():
        copy_of = dict(zip(paths, files))
        fns.append(lambda p, copy_of=copy_of: read_windowed(copy_of[p], size=size))
    with one_core():
        measured = rates(fns, paths, args.compressed_repeat)

    megabytes = [sum(p.stat().st_size for p in files) / 1e6 for files in [paths, *copies.values()]]
    print(f"compressed files: the same {len(paths)} files ({source}) written by gdcm {gdcm.Version.GetVersion()}; "
          f"{checked} copies decode to exactly their source's image")
    print(f"read_windowed, {len(DEFAULT_WINDOWS)} windows, size {size}, pinned to one core, "
          f"median of {args.compressed_repeat} interleaved passes:")
    print(f"  {'syntax':<44} {'decoded by':<11} {'MB':>6} {'slices/s':>9} {'ms/slice':>9} {'vs uncompressed':>16}")
    rows = [("uncompressed (fast path)", "own parser")]
    for name, (_, uid) in COMPRESSED.items():
        rows.append((f"{name} ({uid})", decoding_plugin(copies[name][0], uid)))
    for (label, plugin), mb, rate in zip(rows, megabytes, measured):
        print(f"  {label:<44} {plugin:<11} {mb:6.1f} {rate:9.1f} {1000 / rate:9.2f} "
              f"{rate / measured[0]:15.3f}x")
    for name, (_, uid) in COMPRESSED.items():
        decoder = pydicom.pixels.get_decoder(uid)
        print(f"  {name}: pydicom's plugins in order of trial {list(decoder.available_plugins)}; "
              f"missing: {'; '.join(decoder.missing_dependencies) or 'none'}")


def crop_parts(paths: list[Path], repeat: int) -> list[tuple[str, float]]:
    """µs per slice of each step that ``crop="head"`` adds or changes on the look-up-table
    path, in the reader's order, on each slice's own codes (read once, outside the timing)."""
    slices = []
    for p in paths:
        h, raw = _read_raw(p)
        raw = raw.copy()  # a view of the buffer that the next read overwrites
        key = _lut_key(h)
        packed = _packed_lut(key, _resolve_windows(DEFAULT_WINDOWS, h, p), h.photometric == "MONOCHROME1")
        img = np.take(packed, raw.ravel(), mode="wrap").view(np.uint8).reshape(h.rows, h.columns, -1)
        mask = np.take(_head_lut(key), sampled(raw), mode="wrap")
        box = head_box(mask, raw.shape)
        slices.append((raw, _head_lut(key), mask, img, box, crop_square(img, box)))
    steps = [
        ("mask gather (np.take of the cached uint8 table, every 4th pixel)",
         lambda s: np.take(s[1], sampled(s[0]), mode="wrap")),
        ("head_box (connected components of the 4x-sampled mask)", lambda s: head_box(s[2], s[0].shape)),
        ("crop copy (crop_square of the packed image)", lambda s: crop_square(s[3], s[4])),
        (f"resize of the cut square to {TRAIN_SIZE} (_resize_cut)", lambda s: _resize_cut(s[5], TRAIN_SIZE)),
        (f"resize of the whole slice to {TRAIN_SIZE} (no crop)", lambda s: _resize(_square(s[3]), TRAIN_SIZE)),
    ]
    measured = rates([fn for _, fn in steps], slices, repeat)
    return [(name, 1e6 / rate) for (name, _), rate in zip(steps, measured)]


def bench_crop(paths: list[Path], source: str, args) -> None:
    """read_windowed without and with crop="head", and with each slice's box given (the cut
    and the resize alone), interleaved; then the crop's steps timed one by one."""
    load = os.getloadavg()
    boxes = {p: read_windowed_box(p, size=TRAIN_SIZE, crop="head")[1] for p in paths}
    whole, given, cut = rates([lambda p: read_windowed(p, size=TRAIN_SIZE),
                               lambda p: read_windowed(p, size=TRAIN_SIZE, crop=boxes[p]),
                               lambda p: read_windowed(p, size=TRAIN_SIZE, crop="head")],
                              paths, args.crop_repeat)
    parts = crop_parts(paths, args.crop_repeat)
    print(f"crop: files: {len(paths)} ({source}), size {TRAIN_SIZE}, median of {args.crop_repeat} "
          f"interleaved passes, one thread; load average {load[0]:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    for label, rate in ((f"read_windowed(path, size={TRAIN_SIZE})", whole),
                        (f"read_windowed(path, size={TRAIN_SIZE}, crop=box)  (box given)", given),
                        (f"read_windowed(path, size={TRAIN_SIZE}, crop=\"head\")", cut)):
        print(f"  {label:<56} {rate:8.1f} slices/s ({1e6 / rate:7.1f} µs/slice)")
    print(f"  ratio with crop / without: {cut / whole:.3f}  (the crop adds {1e6 / cut - 1e6 / whole:.1f} µs/slice: "
          f"finding the box {1e6 / cut - 1e6 / given:.1f}, cutting and resizing {1e6 / given - 1e6 / whole:.1f})")
    print("  the crop's steps alone, µs/slice (median of the same number of interleaved passes):")
    for name, us in parts:
        print(f"    {name:<52} {us:7.1f}")
    added = sum(us for _, us in parts[:4]) - parts[4][1]
    print(f"    gather + box + copy + (cut resize - whole resize): {added:.1f} µs/slice")


def head_share(paths: list[Path], source: str) -> None:
    """Share of the TRAIN_SIZE² output that is head, without and with the crop: the mask
    (HU > HEAD_HU) goes through the reader's geometry (pad to square, or cut to the box, then
    INTER_AREA), and a pixel counts as head where more than half of it is."""
    def share(mask: np.ndarray) -> float:
        return float((cv2.resize(mask, (TRAIN_SIZE, TRAIN_SIZE), interpolation=cv2.INTER_AREA) > 0.5).mean())

    without, with_crop, sides, no_box = [], [], [], []
    for p in paths:
        mask = (read_hu(p) > HEAD_HU).astype(np.float32)
        box, cut_to = head_box(mask > 0), read_windowed_box(p, size=TRAIN_SIZE, crop="head")[1]
        if box != cut_to:
            sys.exit(f"{p}: the reader cut to {cut_to}, the mask from read_hu gives {box}: "
                     f"the shares below would not be the reader's")
        without.append(share(_square(mask)))
        with_crop.append(share(crop_square(mask, box)))
        if box is None:
            no_box.append(p.name)
        else:
            sides.append(box[2])
    worse = [(p.name, a, b) for p, a, b in zip(paths, without, with_crop) if b < a]
    if worse:
        sys.exit(f"the crop lowered the head's share on {len(worse)} slices, e.g. {worse[0]}")
    print(f"head share of the {TRAIN_SIZE}x{TRAIN_SIZE} output (above {HEAD_HU:g} HU), {len(paths)} files "
          f"({source}): median [min, max]")
    for name, values in (("without crop", without), ('crop="head"', with_crop)):
        print(f"  {name:<13} {np.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]")
    print(f"  {len(paths) - len(no_box)} slices cut to a box (side median {np.median(sides or [0]):.0f} px "
          f"[{min(sides or [0])}, {max(sides or [0])}]), each with a share >= its uncropped one; "
          f"{len(no_box)} without a box, kept whole{f': {no_box}' if no_box else ''}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=argparse.SUPPRESS,
                    help=f"passes over the files, naive against project (default {OTHER_SECTIONS['repeat']})")
    ap.add_argument("--size", type=int, default=argparse.SUPPRESS,
                    help=f"output side, naive against project (default {OTHER_SECTIONS['size']})")
    ap.add_argument("--files", type=Path, default=None,
                    help="a folder of uncompressed .dcm files (default: the RSNA sample, else synthetic)")
    ap.add_argument("--compressed-repeat", type=int, default=argparse.SUPPRESS,
                    help=f"passes over the compressed copies (each costs about 40x an uncompressed pass); "
                         f"0 skips them (default {OTHER_SECTIONS['compressed_repeat']})")
    ap.add_argument("--compressed-size", type=int, default=argparse.SUPPRESS,
                    help=f"output side for the compressed copies and their uncompressed baseline "
                         f"(default {OTHER_SECTIONS['compressed_size']})")
    ap.add_argument("--crop-repeat", type=int, default=30,
                    help=f"passes over the files, read_windowed at {TRAIN_SIZE} without against with "
                         f"crop=\"head\", and over each of the crop's steps; 0 skips the crop section")
    ap.add_argument("--crop-only", action="store_true",
                    help="run only the crop section (its speed and the head's share)")
    args = ap.parse_args()
    given = [name for name in OTHER_SECTIONS if name in vars(args)]
    if args.crop_only and given:
        ap.error(f"--{given[0].replace('_', '-')} belongs to the sections that --crop-only skips")
    args = argparse.Namespace(**{**OTHER_SECTIONS, **vars(args)})
    if args.repeat < 1 or args.compressed_repeat < 0 or args.size < 1 or args.compressed_size < 1:
        ap.error("--repeat and the sizes must be >= 1, --compressed-repeat >= 0")
    if args.crop_repeat < 0 or (args.crop_only and args.crop_repeat < 1):
        ap.error("--crop-repeat must be >= 0, and >= 1 with --crop-only")
    tmp = tempfile.TemporaryDirectory()
    paths, source = source_files(args.files, tmp.name)
    if not paths:
        sys.exit(f"no .dcm files in {source}")

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cv2.setNumThreads(1)  # one core for both paths: the loader scales by processes
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"numpy {np.__version__}, pydicom {pydicom.__version__}, OpenCV {cv2.__version__}")
    if not args.crop_only:
        bench_naive(paths, source, args)
        bench_header_scan(paths)
        if args.compressed_repeat:
            compressed = Path(tmp.name) / "compressed"
            compressed.mkdir()
            bench_compressed(paths, source, compressed, args)
    if args.crop_repeat:
        bench_crop(paths, source, args)
        head_share(paths, source)
    tmp.cleanup()


if __name__ == "__main__":
    main()
