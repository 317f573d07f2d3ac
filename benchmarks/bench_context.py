"""Does slice context help? The demo trained with and without each option, same budget.

    python benchmarks/bench_context.py [--seed 42] [--epochs 3]

The demo's lesions span runs of neighbouring slices, as real ones do. Each variant runs
kernel.py on the same synthetic dataset with the demo's preset (resnext50_32x4d from
scratch at 64 px, 3 epochs), the same seed and the same number of steps, and reports the
validation weighted log loss (for --refine: out of fold, patient-grouped, so honest).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kernel import DEMO_PRESET  # noqa: E402
from utils.demo import make_demo_dataset  # noqa: E402

VARIANTS = {"baseline (one slice)": [], "--context 1": ["--context", "1"],
            "--context 1 --context-windows": ["--context", "1", "--context-windows"],
            "--refine": ["--refine"], "--context 1 --refine": ["--context", "1", "--refine"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--patients", type=int, default=36)
    args = ap.parse_args()
    preset = [f"--{k.replace('_', '-')}={v}" for k, v in DEMO_PRESET.items()]
    with tempfile.TemporaryDirectory() as tmp:
        data = make_demo_dataset(Path(tmp) / "data", n_train_patients=args.patients,
                                 n_test_patients=max(2, args.patients // 4), seed=args.seed)
        rows = []
        for name, extra in VARIANTS.items():
            out = Path(tmp) / name.replace(" ", "_").replace("-", "")
            t0 = time.perf_counter()
            run = subprocess.run([sys.executable, str(ROOT / "kernel.py"), "--data-dir", str(data),
                                  "--out-dir", str(out), *preset, f"--epochs={args.epochs}",
                                  f"--seed={args.seed}", "--header-cache", str(Path(tmp) / "cache"),
                                  *extra], capture_output=True, text=True, cwd=ROOT)
            if run.returncode != 0:
                sys.exit(f"{name} failed:\n{run.stderr[-3000:]}")
            m = json.loads((out / "metrics.json").read_text())
            # for --refine: the out-of-fold refined loss, whether or not the run then used it
            loss = m.get("val_weighted_log_loss_refined_oof", m["val_weighted_log_loss"])
            rows.append((name, loss, m["prior_weighted_log_loss"], time.perf_counter() - t0))
            print(f"{name:32s} validation weighted log loss {rows[-1][1]:.4f} "
                  f"(prior {rows[-1][2]:.4f}), {rows[-1][3]:.0f}s", flush=True)
    base = rows[0][1]
    print("\n| variant | validation weighted log loss | vs baseline | seconds |")
    print("| --- | ---: | ---: | ---: |")
    for name, loss, _, seconds in rows:
        print(f"| {name} | {loss:.4f} | {loss - base:+.4f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
