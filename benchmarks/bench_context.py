"""Does slice context help? The demo trained with and without each option, same budget.

    python benchmarks/bench_context.py [--seeds 42 43 44] [--epochs 8] [--patients 80]
                                       [--variants baseline context ...]

The demo's lesions span runs of neighbouring slices, as real ones do, and its clot-like
mimics appear on one slice alone (utils/demo.py). Each variant runs kernel.py on the same
synthetic dataset with the demo's preset (resnext50_32x4d from scratch at 64 px) for the
same number of epochs and steps, and reports the validation weighted log loss (for
--refine: out of fold, patient-grouped, so honest). The budget is larger than the demo's
(more epochs; more patients, half of them for validation) because the refiner learns from
validation predictions and needs ~40 patients of them, and because at three epochs from
scratch the noise between runs is larger than the differences being measured.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from utils.demo import DEMO_PRESET, make_demo_dataset  # noqa: E402
from utils.headers import scan_headers  # noqa: E402
from utils.labels import LABELS  # noqa: E402
from utils.metrics import logit  # noqa: E402
from utils.refiner import fit_refiner  # noqa: E402
from utils.slices import order_slices  # noqa: E402

VARIANTS = {  # key: (row name, kernel.py options)
    "baseline": ("baseline (one slice)", []),
    "context": ("--context 1", ["--context", "1"]),
    "context-windows": ("--context 1 --context-windows", ["--context", "1", "--context-windows"]),
    "refine": ("--refine", ["--refine"]),
    "context-refine": ("--context 1 --refine", ["--context", "1", "--refine"]),
}


def run_variant(data: Path, out: Path, cache: Path, args, seed: int, extra: list[str]) -> tuple[float, float]:
    """(validation loss, prior loss) of one kernel.py run."""
    preset = [f"--{k.replace('_', '-')}={v}" for k, v in DEMO_PRESET.items()]
    run = subprocess.run([sys.executable, str(ROOT / "kernel.py"), "--data-dir", str(data),
                          "--out-dir", str(out), *preset, f"--epochs={args.epochs}", f"--seed={seed}",
                          f"--val-frac={args.val_frac}", "--header-cache", str(cache), *extra],
                         check=False, capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        sys.exit(f"{' '.join(extra) or 'baseline'} (seed {seed}) failed:\n{run.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    # for --refine: the out-of-fold refined loss, whether or not the run then used it
    return m.get("weighted_log_loss_refined", m["weighted_log_loss"]), m["prior_weighted_log_loss"]


def refiner_by_patients(data: Path, run: Path, seed: int, sizes=(10, 20, 40)) -> list[tuple]:
    """The refiner fitted (out of fold) on the first n validation patients of a run's
    per-slice predictions: (n, slices, loss per slice, loss refined) for each n."""
    val = pd.read_csv(run / "val_predictions.csv").set_index("image_id")
    headers, _ = scan_headers(sorted((data / "stage_2_train").glob("*.dcm")))
    order = order_slices(headers)
    patients = headers.set_index("image_id")["patient_id"].loc[val.index].to_numpy()
    logits, labels = logit(val[[f"pred_{k}" for k in LABELS]].to_numpy()), val[list(LABELS)].to_numpy()
    rows = []
    for n in (n for n in sizes if n <= len(np.unique(patients))):
        keep = np.isin(patients, np.unique(patients)[:n])
        fit = fit_refiner(logits[keep], labels[keep], order.loc[val.index[keep], "series"],
                          order.loc[val.index[keep], "position"], patients[keep], seed=seed)
        rows.append((n, int(keep.sum()), fit.loss_before, fit.loss_after))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--patients", type=int, default=80)
    ap.add_argument("--val-frac", type=float, default=0.5)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = ap.parse_args()
    chosen = {VARIANTS[k][0]: VARIANTS[k][1] for k in VARIANTS if k in args.variants}
    losses = {name: [] for name in chosen}
    priors, curves = [], {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            data = make_demo_dataset(Path(tmp) / "data", n_train_patients=args.patients,
                                     n_test_patients=max(2, args.patients // 4), seed=seed)
            for i, (name, extra) in enumerate(chosen.items()):
                t0 = time.perf_counter()
                loss, prior = run_variant(data, Path(tmp) / f"run{i}", Path(tmp) / "cache", args, seed, extra)
                losses[name].append(loss)
                print(f"seed {seed} {name:32s} validation weighted log loss {loss:.4f} "
                      f"(prior {prior:.4f}), {time.perf_counter() - t0:.0f}s", flush=True)
                if not extra:  # the baseline's per-slice predictions (a used refiner's are refined)
                    curves[seed] = refiner_by_patients(data, Path(tmp) / f"run{i}", seed)
            priors.append(prior)
    base = losses.get(VARIANTS["baseline"][0], [])  # without it, no comparison columns
    seeds = " | ".join(f"seed {s}" for s in args.seeds)
    print(f"\n| variant | {seeds} | mean | vs baseline (mean) | better on |")
    print("| --- |" + " ---: |" * (len(args.seeds) + 3))
    for name, values in losses.items():
        wins = sum(v < b for v, b in zip(values, base))
        gain = "" if values is base or not base else f"{np.mean(values) - np.mean(base):+.4f}"
        better = "" if values is base or not base else f"{wins} of {len(values)} seeds"
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values)
              + f" | {np.mean(values):.4f} | {gain} | {better} |")
    print("| constant prior | " + " | ".join(f"{p:.4f}" for p in priors) + f" | {np.mean(priors):.4f} | | |")
    if not curves:
        return
    print("\nThe refiner against the number of validation patients it learns from (out of fold):")
    print("\n| seed | patients | slices | per slice | refined |\n| ---: | ---: | ---: | ---: | ---: |")
    for seed, rows in curves.items():
        for n, slices, before, after in rows:
            print(f"| {seed} | {n} | {slices} | {before:.4f} | {after:.4f} |")


if __name__ == "__main__":
    main()
