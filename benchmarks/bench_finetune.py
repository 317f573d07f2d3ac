"""Does fine-tuning on a site's own labelled scans beat the competition checkpoint alone?

    python benchmarks/bench_finetune.py [--seeds 0 1 2] [--patients 36] [--site-patients 24]
                                        [--site-test-patients 24] [--epochs 3] [--threads 1] [--workdir DIR]

Per seed, on the demo (utils/demo.py), as a site would meet it:
  checkpoint  one kernel.py run on a demo draw (`--patients` training patients, heads 0.6-1.0
              of the largest): the "competition" model;
  site        another draw (seed + 100, heads 0.35-0.6: another scanner's framing, small heads
              in a wide field of view), its training share a labelled folder of the site's
              (`--site-patients` patients, labels.csv by path) and its test share the site's
              held-out scans (`--site-test-patients`; test_labels.csv, by path, from the draw's
              test truth).
Arms, each scored by `kernel.py --evaluate` on the site's held-out scans:
  (a) the checkpoint alone;
  (b) fine-tuned from it on the site's folder (--scans --labels --weights RUN/best.pt);
  (c) fine-tuned from it on series-level labels only (one row per series: the series-level loss);
  (d) trained on the site's folder alone from random initialisation (same epochs): what the
      checkpoint brings.
Printed per arm: the slice-level weighted log loss (over known labels) and its patient
bootstrap interval, the series-level AUC of `any`, and sensitivity/specificity at 0.5; then
the mean over seeds. Settings: resnet18, 64 px, --crop head, 3 epochs, --lr 1e-3 (the
demo's, resnet18 for CPU time). Use --workdir to keep the runs (finished ones are reused).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.demo import make_demo_dataset  # noqa: E402
from utils.labels import LABELS, read_labels  # noqa: E402

SETTINGS = ["--arch", "resnet18", "--image-size", "64", "--crop", "head", "--lr", "1e-3", "--batch-size", "16"]
SITE_HEADS = (0.35, 0.6)


def kernel(*args, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, str(ROOT / "kernel.py"), *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"kernel.py {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")


def site_labels(data: Path, work: Path) -> tuple[Path, Path, Path]:
    """labels.csv (by path) of the site's training share, its series-level version, and
    test_labels.csv of its held-out share (from the draw's test truth); the demo's damaged
    files, which --scans and --evaluate would refuse to find labels for, have none."""
    from utils.dicom import read_header
    from utils.scans import scan_folder
    paths = {}
    for split, csv in (("train", "stage_2_train.csv"), ("test", "test_truth.csv")):
        labels = read_labels(data / csv)
        labels.index = [f"{i}.dcm" for i in labels.index]
        readable = set(scan_folder(data / f"stage_2_{split}").slices["path"])  # the damaged files: no label rows
        paths[split] = labels[labels.index.isin(readable)]
    train = paths["train"].rename_axis("path").reset_index()
    train.to_csv(work / "labels.csv", index=False)
    series = [read_header(data / "stage_2_train" / p).series_uid for p in train["path"]]
    by_series = train.assign(series_uid=series).groupby("series_uid")[list(LABELS)].max().reset_index()
    by_series.to_csv(work / "series_labels.csv", index=False)
    paths["test"].rename_axis("path").reset_index().to_csv(work / "test_labels.csv", index=False)
    return work / "labels.csv", work / "series_labels.csv", work / "test_labels.csv"


def figures(metrics: Path) -> dict:
    m = json.loads(metrics.read_text())
    loss = m["slice"]["weighted_log_loss"]
    at = m["series"]["at_threshold"]
    return {"loss": loss["value"], "low": loss["low"], "high": loss["high"],
            "series_auc_any": m["series"]["per_class"]["any"]["auc"]["value"],
            "sensitivity": at["sensitivity"]["value"], "specificity": at["specificity"]["value"]}


def one_seed(seed: int, args, work: Path) -> pd.DataFrame:
    work.mkdir(parents=True, exist_ok=True)
    ckpt, site = work / "checkpoint", work / "site"
    if not (ckpt / "metrics.json").is_file():
        kernel("--out-dir", ckpt, "--demo-patients", args.patients, "--epochs", args.epochs, "--seed", seed,
               "--weights", "none", "--overwrite", "--workers", "0", *SETTINGS, threads=args.threads)
    if not (site / "stage_2_train.csv").is_file():
        make_demo_dataset(site, n_train_patients=args.site_patients, n_test_patients=args.site_test_patients,
                          seed=seed + 100, head_sizes=SITE_HEADS)
    labels, series_labels, test_labels = site_labels(site, work)
    best = ckpt / "checkpoints" / "best.pt"
    arms = {"(a) checkpoint alone": ckpt}
    for name, extra in (("(b) fine-tuned, slice labels", ["--labels", labels, "--weights", best]),
                        ("(c) fine-tuned, series labels", ["--labels", series_labels, "--weights", best]),
                        ("(d) site alone, from scratch", ["--labels", labels, "--weights", "none", *SETTINGS])):
        out = work / name.split()[0].strip("()")
        if not (out / "metrics.json").is_file():
            kernel("--scans", site / "stage_2_train", *extra, "--out-dir", out, "--epochs", args.epochs,
                   "--seed", seed, "--overwrite", "--workers", "0", threads=args.threads)
        arms[name] = out
    rows = []
    for name, run in arms.items():
        ev = work / f"evaluate_{name.split()[0].strip('()')}"
        if not (ev / "metrics.json").is_file():
            kernel("--evaluate", site / "stage_2_test", "--labels", test_labels, "--checkpoint", run, "--out-dir", ev,
                   "--overwrite", "--workers", "0", threads=args.threads)
        rows.append({"seed": seed, "arm": name, **figures(ev / "metrics.json")})
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--patients", type=int, default=36)
    p.add_argument("--site-patients", type=int, default=24)
    p.add_argument("--site-test-patients", type=int, default=24)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_finetune_"))
    table = pd.concat([one_seed(s, args, work / f"seed_{s}") for s in args.seeds], ignore_index=True)
    pd.set_option("display.width", 200)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("\nMean over seeds:")
    print(table.drop(columns="seed").groupby("arm").mean().to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"\nruns in {work}")


if __name__ == "__main__":
    main()
