"""Balance and speed of the patient-grouped split against two baselines, at full RSNA size.

    .venv/bin/python benchmarks/bench_split.py              # 752,803 images, 5 folds
    .venv/bin/python benchmarks/bench_split.py --seed 1

Data: synthetic, shaped like stage_2_train (752,803 images, ~19,000 patients of 20-60
slices, image-level rates near the real ones). Each lesion is a contiguous run of slices,
so positives cluster within patients: that clustering is what makes a random patient
split unbalanced and an image-level split leak.

Compared, each with 5 folds and the same seed:
  (a) utils.split.kfold_by_patient
  (b) a random patient split: patients shuffled into 5 equal-count folds
  (c) iterstrat's MultilabelStratifiedKFold on images, ignoring patients (balanced by
      leaking: most patients end up in several folds)
The figure of merit is the largest relative deviation of any fold's positive rate from the
overall rate, over all six labels. Targets: (a) < 1.5 %, >= 10x smaller than (b), < 5 s.
split_by_patient (val_frac 0.1) is reported alongside. Exits 1 if a target is missed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.split import (  # noqa: E402
    LABELS,
    count_shared_groups,
    fold_table,
    format_fold_table,
    kfold_by_patient,
    split_by_patient,
)

N_IMAGES = 752_803  # images in stage_2_train once its duplicate rows are dropped
N_FOLDS = 5
VAL_FRAC = 0.1  # reported alongside, for split_by_patient
SLICES = (20, 60)  # slices per patient, inclusive
# Real image-level rates (stage_2_train), in LABELS order.
TARGET_RATES = (0.004, 0.048, 0.035, 0.047, 0.063, 0.144)
# A patient is drawn "sick" with P_ANY_PATIENT; a sick patient then has each subtype with
# its own chance (drawing none leaves it negative), one lesion per subtype spanning a
# LESION_SPAN share of its slices, centred within JITTER (of the scan) of a common focus.
# Tuned by hand so the image rates land within ~0.1 point of TARGET_RATES at seed 0; the
# overlap of the runs is what keeps 'any' below the sum of the subtypes, as in real scans.
P_ANY_PATIENT = 0.46
P_SUBTYPE_GIVEN_ANY = (0.032, 0.37, 0.265, 0.38, 0.47)
LESION_SPAN = (0.12, 0.45)
JITTER = 0.11


def synthetic_rsna(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N_IMAGES x 6) int8, patient of each image), rows in shuffled order."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(SLICES[0], SLICES[1] + 1, size=N_IMAGES // SLICES[0])
    ends = np.cumsum(sizes)
    n_patients = int(np.searchsorted(ends, N_IMAGES)) + 1
    sizes = sizes[:n_patients]
    sizes[-1] -= ends[n_patients - 1] - N_IMAGES
    if sizes[-1] < SLICES[0]:  # fold a too-short last patient into the one before
        sizes[-2] += sizes[-1]
        sizes = sizes[:-1]
    n_patients = len(sizes)

    patient = np.repeat(np.arange(n_patients), sizes)
    position = np.arange(N_IMAGES) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    sick = rng.random(n_patients) < P_ANY_PATIENT
    focus = rng.uniform(0.25, 0.75, n_patients)
    labels = np.zeros((N_IMAGES, len(LABELS)), dtype=np.int8)
    for column, chance in enumerate(P_SUBTYPE_GIVEN_ANY):
        has = sick & (rng.random(n_patients) < chance)
        span = np.maximum(1, np.round(rng.uniform(*LESION_SPAN, n_patients) * sizes)).astype(int)
        centre = (focus + rng.normal(0.0, JITTER, n_patients)) * sizes
        start = np.clip(np.round(centre - span / 2).astype(int), 0, sizes - span)
        inside = (position >= start[patient]) & (position < (start + span)[patient])
        labels[:, column] = has[patient] & inside
    labels[:, -1] = labels[:, :-1].max(axis=1)

    names = np.array([f"ID_{value:08x}" for value in rng.choice(2**32, n_patients, replace=False)])
    shuffle = rng.permutation(N_IMAGES)
    return labels[shuffle], names[patient][shuffle]


def random_patient_folds(groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    patients, codes = np.unique(groups, return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(patients))
    fold_of_patient = np.empty(len(patients), dtype=np.int64)
    fold_of_patient[order] = np.arange(len(patients)) % n_folds
    return fold_of_patient[codes]


def iterstrat_folds(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    splitter = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = np.empty(len(labels), dtype=np.int64)
    for fold, (_, val) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        folds[val] = fold
    return folds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-iterstrat", action="store_true", help="skip baseline (c), 10-20 s")
    args = parser.parse_args()

    labels, groups = synthetic_rsna(args.seed)
    rates = " ".join(f"{name} {100 * rate:.2f}%" for name, rate in zip(LABELS, labels.mean(axis=0)))
    print(f"data: {len(labels):,} images, {len(np.unique(groups)):,} patients; {rates}")

    methods = {
        "(a) kfold_by_patient": lambda: kfold_by_patient(labels, groups, N_FOLDS, args.seed),
        "(b) random patient split": lambda: random_patient_folds(groups, N_FOLDS, args.seed),
    }
    if not args.skip_iterstrat:
        methods["(c) iterstrat, images (leaks)"] = lambda: iterstrat_folds(labels, N_FOLDS, args.seed)

    results = {}
    for name, run in methods.items():
        start = time.perf_counter()
        folds = run()
        seconds = time.perf_counter() - start
        table = fold_table(labels, groups, folds, LABELS)
        results[name] = (table["max_rel_dev"].max(), seconds, count_shared_groups(groups, folds))
        if name.startswith("(a)"):
            print(f"\n{name}, per fold:\n{format_fold_table(table)}")

    print(f"\n{'method':32s} {'max rel dev':>11s} {'time':>8s} {'patients in >1 fold':>20s}")
    for name, (deviation, seconds, shared) in results.items():
        print(f"{name:32s} {100 * deviation:10.2f}% {seconds:7.2f}s {shared:20,d}")

    start = time.perf_counter()
    val = split_by_patient(labels, groups, VAL_FRAC, args.seed)
    seconds = time.perf_counter() - start
    table = fold_table(labels, groups, val, LABELS)
    print(f"\nalso split_by_patient(val_frac={VAL_FRAC}): {100 * val.mean():.2f} % of images, "
          f"{100 * table.loc['val', 'patients'] / table.loc['all', 'patients']:.2f} % of patients, "
          f"max rel dev {100 * table['max_rel_dev'].max():.2f} %, {seconds:.2f}s, "
          f"{count_shared_groups(groups, val)} patients on both sides")

    ours, ours_s, ours_shared = results["(a) kfold_by_patient"]
    random_dev = results["(b) random patient split"][0]
    print(f"\n(b)/(a) deviation ratio: {random_dev / ours:.1f}x")
    checks = {
        "(a) max rel dev < 1.5%": ours < 0.015,
        "(a) >= 10x smaller than (b)": random_dev >= 10 * ours,
        "(a) under 5 s": ours_s < 5.0,
        "(a) no patient in two folds": ours_shared == 0,
    }
    for check, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}  {check}")
    if not all(checks.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
