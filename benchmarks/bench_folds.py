"""Do K folds, their average and the refiner beat one run? Scored on the demo's test truth.

    python benchmarks/bench_folds.py [--seeds 42 43 44] [--patients 80] [--folds 5]
                                     [--val-frac 0.2] [--epochs 3] [--threads 1] [--workdir DIR]
    python benchmarks/bench_folds.py --compare-crop   # --crop head against none, one run each
    python benchmarks/bench_folds.py --compare-refiners   # the logit refiner against the embedding refiner

For each seed one synthetic demo dataset (utils/demo.py, the kernel's own demo: `--patients`
training patients, a quarter as many test patients, with `test_truth.csv`, the answers Kaggle
keeps) is written once, and every variant is trained on it with the same settings and epochs
per model, so the variants differ only in the recipe:

  (a) one run, `--val-frac F` held out (per-slice predictions);
  (b) `--folds K --fold all`: the average of the K fold models' test predictions;
  (c) `--folds K --fold all --refine`: (b) refined by the refiner fitted on all of the
      out-of-fold predictions (where its out-of-fold loss wins: `refiner_used`);
  (d) (a) with `--refine`: the refiner fitted on that run's validation split only.

Two kernel.py trainings per seed give all four: `--fold all --refine` writes (c) as its
test_predictions.csv and (b) is the mean of its fold_<i>/test_predictions.csv; the single
`--refine` run writes (d) and `--predict-only` from its best.pt re-makes (a). Every variant is
scored with the competition's weighted log loss on the test images, after the submission's
clip to [1e-6, 1 - 1e-6] (the one unreadable test slice gets the training prior in all).
--compare-refiners: one `--folds K --fold all --refine` run per seed (it keeps every image's
pooled features); both refiners are fitted on its out-of-fold predictions as kernel.py fits
them (same folds, seed and settings) and applied to the test set as kernel.py applies them
(utils.inference.refine_test: the logit refiner on the folds' average, the embedding refiner
on each fold model's probabilities and features, then averaged); test losses and the run's own
out-of-fold losses and choice.
Use `--workdir` to keep the runs (a second call with the same folder reuses finished runs).
Each kernel.py run gets OMP_NUM_THREADS=--threads (1): see kernel() below.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from utils.demo import make_demo_dataset  # noqa: E402
from utils import embeddings  # noqa: E402
from utils.ensemble import average  # noqa: E402
from utils.headers import scan_headers  # noqa: E402
from utils.inference import TestPredictions, refine_test  # noqa: E402
from utils.labels import LABELS, read_labels  # noqa: E402
from utils.metrics import logit, weighted_log_loss  # noqa: E402
from utils.refiner import fit_refiners  # noqa: E402
from utils.slices import order_slices  # noqa: E402
from utils.split import resolve_groups  # noqa: E402
from utils.submission import PROB_MAX, PROB_MIN  # noqa: E402

VARIANTS = {  # key: row name
    "a": "(a) one run, --val-frac",
    "b": "(b) --fold all: average of the fold models",
    "c": "(c) --fold all --refine (refiner on all OOF)",
    "d": "(d) one run --refine (refiner on its validation)",
}


def kernel(args, *options: str) -> float:
    """Run kernel.py with the benchmark's settings; seconds it took. A failure ends the script."""
    settings = [f"--arch={args.arch}", "--weights=none", f"--image-size={args.image_size}",
                f"--epochs={args.epochs}", f"--batch-size={args.batch_size}", f"--lr={args.lr}",
                f"--workers={args.workers}"]
    cmd = [sys.executable, str(ROOT / "kernel.py"), *options]
    # --predict-only takes the model's settings from its checkpoint, but not the batch size,
    # and on the CPU another batch size changes the last bit of some predictions: pass it.
    cmd += settings if "--predict-only" not in options else [f"--batch-size={args.batch_size}"]
    # One intra-op thread per run: on a shared 2-core machine, two threads per process wait
    # on each other at every barrier and a training step took 7x longer (1.0 s -> 7.1 s).
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, env=env)
    if run.returncode != 0:
        sys.exit(f"failed ({run.returncode}): {' '.join(cmd)}\n{run.stderr[-3000:]}")
    return time.perf_counter() - t0


def once(out: Path, args, *options: str) -> float:
    """kernel.py into ``out`` unless a finished run is already there (--workdir reuse)."""
    if (out / ("test_predictions.csv" if "--predict-only" in options else "metrics.json")).is_file():
        print(f"  reusing {out}", flush=True)
        return 0.0
    if out.exists():
        shutil.rmtree(out)  # an unfinished run from an interrupted call
    return kernel(args, *options, "--out-dir", str(out))


def read_probs(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, index_col="image_id")[list(LABELS)]


def score(truth: pd.DataFrame, probs: pd.DataFrame) -> float:
    """The weighted log loss of a submission made of ``probs`` (clipped as submissions are)."""
    p = np.clip(probs.loc[truth.index].to_numpy(dtype=np.float64), PROB_MIN, PROB_MAX)
    return weighted_log_loss(truth.to_numpy(), p)


def val_patients(run: Path) -> int:
    split = pd.read_csv(run / "split.csv")
    return split.loc[split["is_val"].astype(bool), "patient_id"].nunique()


def one_seed(seed: int, root: Path, args) -> dict:
    """The four variants' test losses and what the runs measured on their own validation."""
    data = root / f"data_{seed}"
    if not (data / "test_truth.csv").is_file():
        make_demo_dataset(data, n_train_patients=args.patients,
                          n_test_patients=max(2, args.patients // 4), seed=seed)
    cache = ["--header-cache", str(root / "header_cache"), "--data-dir", str(data), f"--seed={seed}"]
    single, unrefined, folds = root / f"single_{seed}", root / f"single_{seed}_unrefined", root / f"folds_{seed}"
    t = {"single": once(single, args, *cache, f"--val-frac={args.val_frac}", "--refine")}
    t["predict"] = once(unrefined, args, *cache, "--predict-only", "--checkpoint",
                        str(single / "checkpoints" / "best.pt"))
    t["folds"] = once(folds, args, *cache, f"--folds={args.folds}", "--fold", "all", "--refine")

    truth = read_labels(data / "test_truth.csv")
    ms, mf = (json.loads((d / "metrics.json").read_text()) for d in (single, folds))
    members = [read_probs(folds / f"fold_{i}" / "test_predictions.csv") for i in range(args.folds)]
    probs = {"a": read_probs(unrefined / "test_predictions.csv"), "b": average(members),
             "c": read_probs(folds / "test_predictions.csv"), "d": read_probs(single / "test_predictions.csv")}
    # Where a refiner was not used, its run's predictions must be the unrefined ones.
    for refined, plain, used in (("d", "a", ms["refiner_used"]), ("c", "b", mf["refiner_used"])):
        gap = float(np.abs(probs[refined].to_numpy() - probs[plain].to_numpy()).max())
        if not used and gap > 1e-12:
            sys.exit(f"seed {seed}: refiner not used, yet ({refined}) differs from ({plain}) by {gap:.3g}")
    prior = read_labels(data / "stage_2_train.csv").mean().to_numpy()
    return {
        "test": {k: score(truth, p) for k, p in probs.items()},
        "members": [score(truth, m) for m in members],
        "prior": score(truth, pd.DataFrame(np.tile(prior, (len(truth), 1)), index=truth.index,
                                           columns=list(LABELS))),
        "single_val": ms["weighted_log_loss_per_slice"], "single_refined_oof": ms["weighted_log_loss_refined"],
        "single_used": ms["refiner_used"], "single_rows": ms["n_validation"], "single_patients": val_patients(single),
        "single_train_rows": ms["n_train"],
        "oof": mf["weighted_log_loss_per_slice"], "oof_refined": mf["weighted_log_loss_refined"],
        "folds_used": mf["refiner_used"], "oof_rows": mf["n_validation"],
        "fold_val": [json.loads((folds / f"fold_{i}" / "metrics.json").read_text())["weighted_log_loss"]
                     for i in range(args.folds)],
        "fold_train_rows": [json.loads((folds / f"fold_{i}" / "metrics.json").read_text())["n_train"]
                            for i in range(args.folds)],
        "n_test": len(truth), "seconds": t,
    }


def crop_seed(seed: int, root: Path, args) -> dict:
    """--compare-crop: one run with --crop none and one with --crop head on the same data and
    split; their test losses and validation losses."""
    data = root / f"data_{seed}"
    if not (data / "test_truth.csv").is_file():
        make_demo_dataset(data, n_train_patients=args.patients,
                          n_test_patients=max(2, args.patients // 4), seed=seed)
    cache = ["--header-cache", str(root / "header_cache"), "--data-dir", str(data), f"--seed={seed}",
             f"--val-frac={args.val_frac}"]
    truth, out = read_labels(data / "test_truth.csv"), {}
    for crop in ("none", "head"):
        run = root / f"crop_{crop}_{seed}"
        seconds = once(run, args, *cache, f"--crop={crop}")
        metrics = json.loads((run / "metrics.json").read_text())
        out[crop] = {"test": score(truth, read_probs(run / "test_predictions.csv")),
                     "val": metrics["weighted_log_loss"], "seconds": seconds}
    return out


def ordered_headers(folder: Path) -> pd.DataFrame:
    """Series, position and patient of every readable slice in ``folder``, as kernel.py has them."""
    headers, _ = scan_headers(sorted(folder.glob("*.dcm")))
    order = order_slices(headers)
    h = headers.set_index("image_id")
    patients = resolve_groups(h["patient_id"].to_numpy(), h["study_uid"].to_numpy(), h.index.to_numpy())[0]
    return order[["series", "position"]].assign(patient=pd.Series(patients, index=h.index))


def refiners_seed(seed: int, root: Path, args) -> dict:
    """--compare-refiners: the per-slice, logit-refined and embedding-refined test losses of
    one --fold all --refine run, and what the run measured out of fold."""
    data = root / f"data_{seed}"
    if not (data / "test_truth.csv").is_file():
        make_demo_dataset(data, n_train_patients=args.patients,
                          n_test_patients=max(2, args.patients // 4), seed=seed)
    run = root / f"folds_{seed}"
    seconds = once(run, args, "--header-cache", str(root / "header_cache"), "--data-dir", str(data),
                   f"--seed={seed}", f"--folds={args.folds}", "--fold", "all", "--refine")
    metrics = json.loads((run / "metrics.json").read_text())
    oof = pd.read_csv(run / "oof_predictions.csv", index_col="image_id")
    train = ordered_headers(data / "stage_2_train").loc[oof.index]
    folders = [run / f"fold_{i}" for i in range(args.folds)]
    t0 = time.perf_counter()
    refiners = fit_refiners(logit(oof[[f"pred_{k}" for k in LABELS]].to_numpy()), oof[list(LABELS)].to_numpy(),
                            train["series"].to_numpy(), train["position"].to_numpy(), train["patient"].to_numpy(),
                            seed=seed, features=embeddings.load(folders, "val", oof.index))
    fit_seconds = time.perf_counter() - t0
    members = [read_probs(f / "test_predictions.csv") for f in folders]
    test = ordered_headers(data / "stage_2_test")
    scanned = [i for i in members[0].index if i in test.index]
    bad = set(pd.read_csv(run / "bad_files.csv")["path"].map(lambda p: Path(p).stem))
    failed = [i for i in scanned if i in bad]  # their pixels failed: they keep the prior, as in kernel.py
    pred = TestPredictions(average(members), scanned, failed, members=[
        TestPredictions(m, scanned, failed, embeddings.load([f], "test", scanned)) for m, f in zip(members, folders)])
    truth = read_labels(data / "test_truth.csv")
    out = {"test": {"per_slice": score(truth, pred.probs)}, "seconds": seconds, "fit_seconds": fit_seconds,
           "oof": {"per_slice": metrics["weighted_log_loss_per_slice"]}, "chosen": metrics["refiner"]}
    for kind, result in refiners.items():
        # the run fitted the same refiners: same rows, folds and seeds give the same losses
        if not np.isclose(result.loss_after, metrics[f"weighted_log_loss_refined_{kind}"], rtol=1e-9):
            sys.exit(f"seed {seed}: the {kind} refiner refitted here differs from the run's")
        out["oof"][kind] = result.loss_after
        out["test"][kind] = score(truth, refine_test(result, pred, test).probs)
    return out


def report_refiners(results: dict[int, dict]) -> None:
    print("\nThe logit refiner against the embedding refiner (one --fold all --refine run per seed; "
          "weighted log loss):\n")
    print("| seed | test, per slice | test, logit refiner | test, embedding refiner | OOF, per slice | "
          "OOF, logit refiner | OOF, embedding refiner | the run chose | seconds: run / both fits |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for seed, r in results.items():
        t, o = r["test"], r["oof"]
        print(f"| {seed} | {t['per_slice']:.4f} | {t['logits']:.4f} | {t['embeddings']:.4f} | {o['per_slice']:.4f} | "
              f"{o['logits']:.4f} | {o['embeddings']:.4f} | {r['chosen']} | {r['seconds']:.0f} / {r['fit_seconds']:.0f} |")
    mean = {k: np.mean([r["test"][k] for r in results.values()]) for k in ("per_slice", "logits", "embeddings")}
    wins = sum(r["test"]["embeddings"] < r["test"]["logits"] for r in results.values())
    print(f"| mean | {mean['per_slice']:.4f} | {mean['logits']:.4f} | {mean['embeddings']:.4f} | | | | "
          f"embeddings better on test on {wins} of {len(results)} | |")


def report_crop(results: dict[int, dict]) -> None:
    print("\n--crop head against none (one run each, the same split; weighted log loss):\n")
    print("| seed | test, none | test, head | head - none | validation, none | validation, head |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for seed, r in results.items():
        print(f"| {seed} | {r['none']['test']:.4f} | {r['head']['test']:.4f} | "
              f"{r['head']['test'] - r['none']['test']:+.4f} | {r['none']['val']:.4f} | {r['head']['val']:.4f} |")
    diffs = [r["head"]["test"] - r["none"]["test"] for r in results.values()]
    print(f"| mean | | | {np.mean(diffs):+.4f} (head better on {sum(d < 0 for d in diffs)} of {len(diffs)}) | | |")


def report(results: dict[int, dict], args) -> None:
    seeds = list(results)
    head = " | ".join(f"seed {s}" for s in seeds)
    print(f"\nTest weighted log loss ({results[seeds[0]]['n_test']} test images of "
          f"{max(2, args.patients // 4)} patients; lower is better):\n")
    print(f"| variant | {head} | mean | vs (a) (mean) | beats (a) on | refiner used |")
    print("| --- |" + " ---: |" * (len(seeds) + 3) + " --- |")
    base = [results[s]["test"]["a"] for s in seeds]
    used = {"c": [results[s]["folds_used"] for s in seeds], "d": [results[s]["single_used"] for s in seeds]}
    for key, name in VARIANTS.items():
        values = [results[s]["test"][key] for s in seeds]
        diff = "" if key == "a" else f"{np.mean(values) - np.mean(base):+.4f}"
        wins = "" if key == "a" else f"{sum(v < b for v, b in zip(values, base))} of {len(seeds)} seeds"
        flags = ", ".join("yes" if u else "no" for u in used[key]) if key in used else ""
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values)
              + f" | {np.mean(values):.4f} | {diff} | {wins} | {flags} |")
    members = [float(np.mean(results[s]["members"])) for s in seeds]
    print("| one fold model alone (mean of the K) | " + " | ".join(f"{v:.4f}" for v in members)
          + f" | {np.mean(members):.4f} | {np.mean(members) - np.mean(base):+.4f} | | |")
    priors = [results[s]["prior"] for s in seeds]
    print("| constant prior (all training labels) | " + " | ".join(f"{v:.4f}" for v in priors)
          + f" | {np.mean(priors):.4f} | | | |")

    print("\nWhat each recipe measured on its own held-out images (weighted log loss), and what "
          "the refiner learnt from:\n")
    print("| seed | (a) validation | rows (patients) | (d) refined, out of fold | (b) OOF | rows | "
          "(c) refined OOF | fold validation losses | train rows per model: one run / fold |")
    print("| ---: |" + " ---: |" * 7 + " ---: |")
    for s in seeds:
        r = results[s]
        print(f"| {s} | {r['single_val']:.4f} | {r['single_rows']} ({r['single_patients']}) | "
              f"{r['single_refined_oof']:.4f} | {r['oof']:.4f} | {r['oof_rows']} ({args.patients}) | "
              f"{r['oof_refined']:.4f} | {', '.join(f'{v:.3f}' for v in r['fold_val'])} | "
              f"{r['single_train_rows']} / {min(r['fold_train_rows'])}-{max(r['fold_train_rows'])} |")
    print("\nSeconds per seed (one --refine run, its --predict-only, --fold all --refine):")
    for s in seeds:
        t = results[s]["seconds"]
        print(f"  seed {s}: {t['single']:.0f} + {t['predict']:.0f} + {t['folds']:.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--patients", type=int, default=80)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--val-frac", type=float, default=0.2,
                    help="the single run's held-out share (default 0.2: each model trains on as many patients "
                         "as a fold model)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per kernel.py run (OMP_NUM_THREADS)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the data and runs here (reused when finished)")
    ap.add_argument("--compare-crop", action="store_true",
                    help="instead of the recipes: one run with --crop none against one with --crop head, per seed")
    ap.add_argument("--compare-refiners", action="store_true",
                    help="instead of the recipes: the logit refiner against the embedding refiner on one "
                         "--fold all --refine run per seed")
    args = ap.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        results = {}
        if args.compare_refiners:
            report_refiners({seed: refiners_seed(seed, root, args) for seed in args.seeds})
            print(f"\nTotal {time.perf_counter() - started:.0f}s")
            return
        if args.compare_crop:
            report_crop({seed: crop_seed(seed, root, args) for seed in args.seeds})
            print(f"\nTotal {time.perf_counter() - started:.0f}s")
            return
        for seed in args.seeds:
            results[seed] = r = one_seed(seed, root, args)
            print(f"seed {seed}: " + ", ".join(f"({k}) {v:.4f}" for k, v in r["test"].items())
                  + f"; {sum(r['seconds'].values()):.0f}s", flush=True)
    report(results, args)
    print(f"\nTotal {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
