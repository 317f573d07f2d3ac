"""Prediction on a folder of scans (--predict) against kernel.py's test prediction
(--predict-only) on the same slices, and the folder scan against the header scan.

    python benchmarks/bench_predict.py [--test-patients 40] [--size 256] [--repeats 5]

One small model is trained on the demo (resnet18, 64 px, 1 epoch: the model's speed is not
what is measured, the two ways into it are). The demo's test slices are then copied into
a nested folder without extensions, and both commands predict them with that model:
`--predict-only` from the Kaggle layout (sample submission, header scan), `--predict` from
the folder (scan by content, grouping, order along the normal, series.csv, predict.html with
its Grad-CAM heatmaps). Each is timed as a whole process, best of --repeats, and as slices/s.
In the same process, scan_folder and scan_headers read the same files, interleaved, best of
--repeats: the folder scan should not cost more than the header scan.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from utils.demo import make_demo_dataset  # noqa: E402
from utils.headers import scan_headers  # noqa: E402
from utils.scans import scan_folder  # noqa: E402

MODEL = ["--arch", "resnet18", "--image-size", "64", "--weights", "none", "--workers", "0"]


def kernel(*args) -> float:
    """Seconds of one kernel.py process; it must succeed."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "kernel.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"kernel.py {' '.join(map(str, args))} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def best_of(repeats: int, run) -> float:
    return min(run() for _ in range(repeats))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--test-patients", type=int, default=40)
    p.add_argument("--size", type=int, default=256, help="pixels a side of the demo's slices")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    try:
        data = make_demo_dataset(work / "data", n_train_patients=8, n_test_patients=args.test_patients,
                                 size=args.size, seed=0)
        kernel("--data-dir", data, "--out-dir", work / "run", "--epochs", "1", "--val-frac", "0.25", *MODEL)
        files = sorted((data / "stage_2_test").glob("*.dcm"))
        scans = work / "scans"
        for i, source in enumerate(files):
            target = scans / f"study{i % 4}" / f"series{i % 3}" / f"IM{i:06d}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        n = len(files)
        only = best_of(args.repeats, lambda: kernel("--predict-only", "--checkpoint", work / "run", "--data-dir",
                                                    data, "--out-dir", work / "p", "--overwrite", "--workers", "0"))
        folder = best_of(args.repeats, lambda: kernel("--predict", scans, "--checkpoint", work / "run",
                                                      "--out-dir", work / "f", "--overwrite", "--workers", "0"))
        scan_times, header_times = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            scan_folder(scans)
            scan_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            scan_headers(files)
            header_times.append(time.perf_counter() - t0)
        print(f"{n} test slices of {args.size}x{args.size}, resnet18 at 64 px, best of {args.repeats}\n")
        print("| way in | seconds (whole process) | slices/s |")
        print("| --- | ---: | ---: |")
        print(f"| `--predict-only` (Kaggle layout) | {only:.1f} | {n / only:.0f} |")
        print(f"| `--predict DIR` (a nested folder, + series.csv, predict.html) | {folder:.1f} | {n / folder:.0f} |")
        print(f"\nscan_folder {min(scan_times) * 1e3:.0f} ms, scan_headers {min(header_times) * 1e3:.0f} ms "
              f"on the same files: ratio {min(scan_times) / min(header_times):.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
