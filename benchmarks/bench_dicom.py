"""Slice reading speed: the project's path against the naive one, in one process.

    python benchmarks/bench_dicom.py [--repeat 20] [--size 512] [--files DIR]

Naive: pydicom ``pixel_array`` -> float32 HU -> three clipped windows -> resize.
Project: ``utils.dicom.read_windowed(path, size=...)`` (look-up table over the stored
values, own parser for uncompressed files, one resize). Both run on the same files, the
real RSNA sample when it is present (else 512x512 synthetic slices of each variant);
the outputs are compared so the speed-up is not bought with a different answer. Also
times the header scan (headers/second), serial and across processes.
"""
from __future__ import annotations

import argparse
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
from utils.demo import write_plain_slices  # noqa: E402
from utils.dicom import DEFAULT_WINDOWS, read_header, read_windowed  # noqa: E402
from utils.headers import scan_headers  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "rsna_sample"


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--files", type=Path, default=None)
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    if args.files:
        paths, source = sorted(args.files.glob("*.dcm")), str(args.files)
    elif (SAMPLE / "stage_2_train").is_dir():
        paths = sorted((SAMPLE / "stage_2_train").glob("*.dcm")) + sorted((SAMPLE / "stage_2_test").glob("*.dcm"))
        source = "real RSNA sample"
    else:
        paths, source = write_plain_slices(tmp.name, 30), "synthetic 512x512 slices"
    if not paths:
        sys.exit(f"no .dcm files in {source}")
    # Same answer, except where the naive path is wrong: it knows nothing of the 12-bit wrap.
    wrapped = [p for p in paths if read_header(p).wrapped_12bit]
    worst = max([int(np.abs(read_windowed(p, size=args.size).astype(int)
                            - naive_read(p, args.size).astype(int)).max())
                 for p in paths if p not in wrapped] or [0])

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cv2.setNumThreads(1)  # one core for both paths: the loader scales by processes
    naive, ours = rates([lambda p: naive_read(p, args.size), lambda p: read_windowed(p, size=args.size)],
                        paths, args.repeat)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"numpy {np.__version__}, pydicom {pydicom.__version__}, OpenCV {cv2.__version__}")
    print(f"files: {len(paths)} ({source}), median of {args.repeat} interleaved passes, "
          f"size {args.size}, one core")
    print(f"naive   (pixel_array -> float HU -> 3 windows -> resize): {naive:8.1f} images/s "
          f"({1000 / naive:.2f} ms/slice)")
    print(f"project (read_windowed):                                  {ours:8.1f} images/s "
          f"({1000 / ours:.2f} ms/slice)")
    print(f"ratio: {ours / naive:.1f}x   (largest difference between the two: {worst} grey level"
          f"{f'; the naive path misreads the {len(wrapped)} wrapped 12-bit files' if wrapped else ''})")

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
    tmp.cleanup()


if __name__ == "__main__":
    main()
