"""The pointing game: does the demo model's Grad-CAM point at the lesions the demo drew?

    python benchmarks/bench_gradcam.py [--seeds 42 43 44] [--epochs 3] [--patients 36]

For each seed, the demo as ``python kernel.py --seed S`` runs it: the synthetic dataset
(utils.demo.make_demo_dataset with that seed, 36 training and 9 test patients) and
kernel.py trained on it with the demo's preset (DEMO_PRESET: resnext50_32x4d from scratch
at 64 px) for the default 3 epochs. Its best.pt is then loaded, and for each readable test
slice with a lesion (test_truth.csv) the Grad-CAM (utils.gradcam) of the subtype the run's
test_predictions.csv rates highest ("any" is left out: it names no kind of lesion) is
taken at the model's input size and upsampled to the slice's. A hit: the heatmap's
maximum lies inside the slice's lesion mask (test_masks.npz) dilated by 2 px; a flat top
counts by its centre, and an all-zero map (no positive evidence for the class anywhere:
its logit is below the head's bias at every place) points nowhere and misses. Chance: a
point drawn uniformly in the head (HU > -500) hits with probability dilated area / head
area, averaged over the same slices.

The default layer is layer4, the last block, whose map at 64 px is only 2x2 (stride 32);
the maps of layer3 (4x4) and layer2 (8x8) are reported beside it. The series AUC is that
of "any": each test series' largest predicted "any" against whether any of its slices has
a lesion.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import torch
import torch.nn.functional as F
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from utils import data as data_utils  # noqa: E402
from utils.demo import DEMO_PRESET, TEST_MASKS, make_demo_dataset  # noqa: E402
from utils.crop import HEAD_HU, crop_square  # noqa: E402
from utils.dicom import DicomError, parse_windows, read_hu, read_windowed_box  # noqa: E402
from utils.engine import Dist, roc_auc  # noqa: E402
from utils.gradcam import grad_cam  # noqa: E402
from utils.inference import load_model  # noqa: E402
from utils.labels import LABELS, SUBTYPES  # noqa: E402
from utils.rundir import read_predictions  # noqa: E402
from utils.runtime import setup_runtime  # noqa: E402

DILATE_PX = 2
LAYERS = ("layer4", "layer3", "layer2")


def train(data: Path, out: Path, seed: int, epochs: int) -> None:
    preset = [f"--{k.replace('_', '-')}={v}" for k, v in DEMO_PRESET.items()]
    run = subprocess.run([sys.executable, str(ROOT / "kernel.py"), "--data-dir", str(data),
                          "--out-dir", str(out), *preset, f"--epochs={epochs}", f"--seed={seed}"],
                         check=False, capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        sys.exit(f"kernel.py (seed {seed}) failed:\n{run.stderr[-3000:]}")


def truth_table(data: Path) -> pd.DataFrame:
    """test_truth.csv as one row per image, a column per label."""
    truth = pd.read_csv(data / "test_truth.csv")
    truth["image_id"], truth["label"] = truth["ID"].str[:12], truth["ID"].str[13:]
    return truth.pivot(index="image_id", columns="label", values="Label")[list(LABELS)]


def series_auc(data: Path, predictions: pd.DataFrame, truth: pd.DataFrame) -> float:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Invalid value for VR UI")  # RSNA IDs in UID tags
        series = {p.stem: pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID
                  for p in sorted((data / "stage_2_test").glob("*.dcm"))}
    table = pd.DataFrame({"series": pd.Series(series), "pred": predictions["any"], "true": truth["any"]})
    per_series = table.groupby("series")[["pred", "true"]].max()
    return roc_auc(per_series["true"].to_numpy(), per_series["pred"].to_numpy())


def hit(cam: torch.Tensor, mask: np.ndarray) -> bool:
    """Whether the heatmap's maximum, at the mask's size, lies in the mask; the centre of a
    flat top (upsampling leaves them at the edges); an all-zero map misses."""
    if not cam.any():
        return False
    full = F.interpolate(cam[None, None], size=mask.shape, mode="bilinear", align_corners=False)[0, 0]
    rows, cols = np.nonzero(full.numpy() >= float(full.max()) - 1e-6)
    return bool(mask[int(round(rows.mean())), int(round(cols.mean()))])


def lesion_slices(data: Path, truth: pd.DataFrame, windows, size: int, crop: str):
    """(image IDs, uint8 NCHW inputs, HU slices, boxes) of the readable test slices with a
    lesion, read as the model was trained (``crop``: each slice's box, None when whole)."""
    ids, images, hus, boxes = [], [], [], []
    for image_id in truth.index[truth["any"] == 1]:
        path = data / "stage_2_test" / f"{image_id}.dcm"
        try:
            image, box = read_windowed_box(path, windows, size=size, crop=crop)
            images.append(image.transpose(2, 0, 1))
            hus.append(crop_square(read_hu(path), box))
        except DicomError:  # the demo's one damaged test file
            continue
        ids.append(image_id)
        boxes.append(box)
    return ids, torch.from_numpy(np.stack(images)), hus, boxes


def pointing(run: Path, data: Path, truth: pd.DataFrame, predictions: pd.DataFrame) -> dict:
    """Hit rates of each layer's heatmap and of the random point, the number of slices, and
    how many of the last block's maps are all zero."""
    rt = setup_runtime(Dist(), "fp32")
    model, cfg, _ = load_model(run / "checkpoints" / "best.pt", rt)
    if cfg.get("context"):
        sys.exit("the pointing game reads one slice per input; train without --context")
    ids, images, hus, boxes = lesion_slices(data, truth, parse_windows(cfg["windows"]), cfg["image_size"],
                                            cfg.get("crop", "none"))
    x = data_utils.to_device_normalized(images, rt.device)
    classes = [LABELS.index(c) for c in predictions.loc[ids, list(SUBTYPES)].idxmax(axis=1)]
    cams = {name: torch.from_numpy(grad_cam(model, x, classes, layer=getattr(model, name)))
            for name in LAYERS}
    with np.load(data / TEST_MASKS) as z:
        masks = [crop_square(ndimage.binary_dilation(z[i], iterations=DILATE_PX), box) for i, box in zip(ids, boxes)]
    heads = [hu > HEAD_HU for hu in hus]
    chance = [(mask & head).sum() / head.sum() for mask, head in zip(masks, heads)]
    shares = {name: np.mean([hit(cam[k], mask) for k, mask in enumerate(masks)]) for name, cam in cams.items()}
    return {"n": len(ids), "empty": int((cams[LAYERS[0]].amax(dim=(1, 2)) == 0).sum()),
            "chance": float(np.mean(chance)), **{name: float(v) for name, v in shares.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--patients", type=int, default=36)
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            data = make_demo_dataset(Path(tmp) / "data", n_train_patients=args.patients,
                                     n_test_patients=max(2, args.patients // 4), seed=seed)
            train(data, Path(tmp) / "run", seed, args.epochs)
            truth = truth_table(data)
            predictions = read_predictions(Path(tmp) / "run" / "test_predictions.csv")
            row = pointing(Path(tmp) / "run", data, truth, predictions)
            row.update(seed=seed, auc=series_auc(data, predictions, truth))
        rows.append(row)
        print(f"seed {seed}: {row}, {time.perf_counter() - t0:.0f}s", flush=True)
    columns = ["n", "empty", *LAYERS, "chance", "auc"]
    print(f"\n| seed | lesion slices | all-zero maps, {LAYERS[0]} | "
          + " | ".join(f"pointing, {name}" for name in LAYERS) + " | random point in the head | series AUC (any) |")
    print("| ---: " * (len(columns) + 1) + "|")
    for r in rows + [{"seed": "mean", **{k: np.mean([r[k] for r in rows]) for k in columns}}]:
        print(f"| {r['seed']} | {r['n']:.4g} | {r['empty']:.4g} | " + " | ".join(f"{r[name]:.2f}" for name in LAYERS)
              + f" | {r['chance']:.2f} | {r['auc']:.3f} |")


if __name__ == "__main__":
    main()
