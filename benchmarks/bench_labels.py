"""Speed and peak memory of utils.labels.read_labels against the naive pandas way.

    .venv/bin/python benchmarks/bench_labels.py                  # real size, ~1 minute
    .venv/bin/python benchmarks/bench_labels.py --images 50000   # quick look

Writes a file shaped like Kaggle's stage_2_train.csv (752,807 images x 6 rows, random
image IDs, realistic class prevalence) into a temporary directory, times read_labels and
the naive `read_csv` + `str.rsplit('_', n=1)` + `pivot` in this process, checks that
both give the same table, then measures read_labels' peak memory in a fresh process.
Targets: at least 5x faster than naive, peak under 800 MB.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere

from utils.labels import LABELS, read_labels  # noqa: E402

REAL_IMAGES = 752_807  # stage_2_train.csv: 4,516,842 rows
# Roughly the share of stage 2 training images with each label (any = some subtype).
PREVALENCE = {"epidural": 0.0042, "intraparenchymal": 0.048, "intraventricular": 0.035,
              "subarachnoid": 0.047, "subdural": 0.063, "any": 0.144}
TARGET_SPEEDUP = 5
TARGET_PEAK_MB = 800

# Runs in a fresh interpreter, so the peak includes nothing the benchmark itself
# allocated. VmHWM is the high-water resident set of this process since exec; on Linux
# ru_maxrss can instead inherit the parent's peak across fork + exec.
CHILD = """
import resource, sys
from utils.labels import read_labels
if sys.argv[1] != "-":
    read_labels(sys.argv[1])
try:
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    print(int(status.split()[0]) / 1024, "VmHWM")
except (OSError, IndexError):
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ru_maxrss")
"""


def write_train_csv(path: Path, n_images: int, seed: int = 0) -> None:
    """Kaggle's layout: header, then six rows per image in LABELS order."""
    rng = np.random.default_rng(seed)
    values = rng.choice(16**9, size=n_images, replace=False)  # distinct 9-hex-digit image IDs
    ids = np.array([f"ID_{value:09x}" for value in values.tolist()])
    positive = rng.random(n_images) < PREVALENCE["any"]
    given_any = np.array([PREVALENCE[name] for name in LABELS[:5]]) / PREVALENCE["any"]
    subtypes = rng.random((n_images, 5)) < given_any
    subtypes &= positive[:, None]
    lonely = positive & ~subtypes.any(axis=1)  # a positive image needs some subtype
    subtypes[lonely, rng.integers(0, 5, size=int(lonely.sum()))] = True
    labels = np.column_stack([subtypes, subtypes.any(axis=1)]).astype(np.int8)
    row_ids = pc.binary_join_element_wise(
        pa.array(np.repeat(ids, len(LABELS))), pa.array(np.tile(np.array(LABELS), n_images)), "_"
    )
    table = pa.table({"ID": row_ids, "Label": pa.array(labels.ravel())})
    with open(path, "wb") as fh:
        fh.write(b"ID,Label\n")
        pacsv.write_csv(table, fh, pacsv.WriteOptions(include_header=False, quoting_style="none"))


def read_labels_naive(path: Path) -> pd.DataFrame:
    long = pd.read_csv(path)
    parts = long["ID"].str.rsplit("_", n=1, expand=True)
    long["image_id"], long["subtype"] = parts[0], parts[1]
    return long.pivot(index="image_id", columns="subtype", values="Label")


def best_time(function, path: Path, repeat: int) -> tuple[float, pd.DataFrame]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = function(path)
        times.append(time.perf_counter() - start)
    return min(times), result


def child_peak_mb(argument: str) -> tuple[float, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", CHILD, argument], env=env, cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0]), out[1]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=REAL_IMAGES, help="images in the generated file")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each reader; the fastest counts")
    args = parser.parse_args()
    if args.images < 1 or args.repeat < 1:
        parser.error("--images and --repeat must be at least 1")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stage_2_train.csv"
        start = time.perf_counter()
        write_train_csv(path, args.images)
        print(f"file: {args.images:,} images x {len(LABELS)} rows = {args.images * len(LABELS):,} rows, "
              f"{path.stat().st_size / 1e6:.0f} MB (generated in {time.perf_counter() - start:.1f} s)")

        naive_s, naive = best_time(read_labels_naive, path, args.repeat)
        project_s, project = best_time(read_labels, path, args.repeat)
        same = (
            len(naive) == len(project)
            and np.array_equal(naive.loc[project.index, list(LABELS)].to_numpy(), project.to_numpy())
        )
        print(f"naive pandas (read_csv + str.rsplit + pivot): {naive_s:6.2f} s  (best of {args.repeat})")
        print(f"utils.labels.read_labels:                     {project_s:6.2f} s  (best of {args.repeat})")
        print(f"speed-up: {naive_s / project_s:.1f}x   same table: {'yes' if same else 'NO'}")
        del naive, project

        baseline_mb, method = child_peak_mb("-")
        total_mb, _ = child_peak_mb(str(path))
        peak_mb = total_mb - baseline_mb
        print(f"peak memory of read_labels: {peak_mb:.0f} MB "
              f"(above the {baseline_mb:.0f} MB of interpreter + imports)")
        print(f"  measured as the peak RSS ({method}) of a fresh process running read_labels "
              f"minus that of one that only imports it")

    speed_ok = naive_s / project_s >= TARGET_SPEEDUP
    memory_ok = peak_mb < TARGET_PEAK_MB
    print(f"targets: >= {TARGET_SPEEDUP}x faster: {'met' if speed_ok else 'MISSED'};  "
          f"peak < {TARGET_PEAK_MB} MB: {'met' if memory_ok else 'MISSED'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
