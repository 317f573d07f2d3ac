"""RSNA Intracranial Hemorrhage Detection: the whole pipeline, stage by stage.

    python kernel.py                                   # demo on a synthetic dataset it writes
    python kernel.py --data-dir DATA --weights ig_resnext101_32x8-c38310e5.pth
    python kernel.py --data-dir DATA --weights none    # random init, on purpose

Stages, in the order they run: settings -> labels -> headers -> split -> train ->
validate -> predict and submit. DATA is the folder holding stage_2_train.csv,
stage_2_sample_submission.csv, stage_2_train/ and stage_2_test/. On Kaggle the data is
found under /kaggle/input and outputs go to /kaggle/working.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from utils import data as data_utils
from utils.demo import make_demo_dataset
from utils.dicom import DEFAULT_WINDOWS, parse_windows, scan_headers
from utils.labels import LABELS, LabelError, check_image_id, format_label_report, label_report, read_labels
from utils.metrics import CLASS_WEIGHTS, per_class_log_loss, prior_probabilities, weighted_log_loss
from utils.model import WeightsError, build_model, find_weights
from utils.split import (fold_table, format_fold_table, kfold_by_patient, resolve_groups,
                         split_by_patient)
from utils.submission import (SubmissionError, build_submission, check_submission_file,
                              read_sample_submission, write_submission)

KAGGLE_INPUT, KAGGLE_WORKING = Path("/kaggle/input"), Path("/kaggle/working")
EXIT_USAGE = 2  # a user mistake: bad option, bad data folder, bad weights


# ---------------------------------------------------------------------------------------
# Settings: plain typed values; the command line overrides them; saved as config.json.

@dataclass
class Config:
    data_dir: str | None = None      # folder with stage_2_train.csv; None: Kaggle or demo
    out_dir: str | None = None       # default ./runs/<timestamp>, /kaggle/working on Kaggle
    epochs: int = 3
    arch: str = "resnext101_32x8d"
    weights: str | None = None       # a local file, "none" for random init, None to search
    weights_strict: bool = True
    image_size: int = 256
    windows: str = "brain,subdural,soft_tissue"
    batch_size: int = 32
    workers: int = min(8, os.cpu_count() or 1)
    lr: float = 2e-4
    weight_decay: float = 1e-4
    val_frac: float = 0.1
    folds: int = 0                   # K >= 2: K patient-grouped folds, validate on --fold
    fold: int = 0
    seed: int = 42
    tta: bool = True
    resume: bool = False
    overwrite: bool = False
    demo: bool = False               # set when no data was given: the synthetic dataset
    demo_patients: int = 36          # training patients of the synthetic dataset
    header_cache: str | None = None  # folder for the header scan cache; default beside out-dir


# No data given: a preset small enough for a laptop CPU, trained from scratch because
# nothing can be downloaded; an explicit option still wins.
DEMO_PRESET = dict(arch="resnext50_32x4d", weights="none", image_size=64, batch_size=16,
                   lr=1e-3, val_frac=0.25, workers=min(2, os.cpu_count() or 1))


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(argv=None) -> tuple[Config, str | None]:
    """The resolved settings, and the path given to --check-submission (if any)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    types = {"data_dir": str, "out_dir": str, "epochs": int, "arch": str, "weights": str,
             "weights_strict": _bool, "image_size": int, "windows": str, "batch_size": int,
             "workers": int, "lr": float, "weight_decay": float, "val_frac": float,
             "seed": int, "tta": _bool, "demo_patients": int,
             "header_cache": str, "folds": int, "fold": int}
    for name, kind in types.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=f"(default: {getattr(Config, name)})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out-dir")
    p.add_argument("--check-submission", metavar="PATH", default=None,
                   help="only check a submission file against the sample submission, then exit")
    args = p.parse_args(argv)  # an unknown option exits with usage and code 2
    given = {k: v for k, v in vars(args).items() if v is not None and v is not False}
    check = given.pop("check_submission", None)
    cfg = Config()
    if given.get("data_dir") is None and find_kaggle_data() is None:
        cfg = dataclasses.replace(cfg, demo=True, **DEMO_PRESET)
    cfg = dataclasses.replace(cfg, **given)
    problems = [f"--{k.replace('_', '-')} must be positive" for k in
                ("epochs", "image_size", "batch_size", "demo_patients") if getattr(cfg, k) <= 0]
    if cfg.workers < 0:
        problems.append("--workers must be >= 0")
    if not 0 < cfg.val_frac < 1:
        problems.append("--val-frac must be between 0 and 1")
    if cfg.folds == 1 or cfg.folds < 0:
        problems.append("--folds must be 0 (a single --val-frac split) or at least 2")
    if cfg.folds >= 2 and not 0 <= cfg.fold < cfg.folds:
        problems.append(f"--fold must be between 0 and {cfg.folds - 1}")
    try:
        parse_windows(cfg.windows)
    except ValueError as err:
        problems.append(f"--windows: {err}")
    if problems:
        p.error("; ".join(problems))
    return cfg, check


class UserError(Exception):
    """A problem with the user's input: printed as one message, exit code 2, no traceback."""


def log(*parts) -> None:
    print(*parts, flush=True)


# ---------------------------------------------------------------------------------------
# Data folder and output folder.

DATA_LAYOUT = ("stage_2_train.csv", "stage_2_sample_submission.csv", "stage_2_train", "stage_2_test")


def find_kaggle_data() -> Path | None:
    """The competition folder under /kaggle/input; the mount is nested, so search for it."""
    if not KAGGLE_INPUT.is_dir():
        return None
    hits = sorted(KAGGLE_INPUT.rglob("stage_2_train.csv"))
    return hits[0].parent if hits else None


def resolve_data_dir(cfg: Config, out_dir: Path) -> Path:
    if cfg.demo:
        root = out_dir / "demo_data"
        if not (root / "stage_2_train.csv").is_file():
            log(f"No --data-dir given: writing the synthetic demo dataset to {root}")
            make_demo_dataset(root, n_train_patients=cfg.demo_patients,
                              n_test_patients=max(2, cfg.demo_patients // 4), seed=cfg.seed)
        return root
    root = Path(cfg.data_dir) if cfg.data_dir else find_kaggle_data()
    missing = [name for name in DATA_LAYOUT if not (root / name).exists()]
    if missing:
        raise UserError(
            f"{root} is not an RSNA data folder: it lacks {', '.join(missing)}. Expected the "
            f"Kaggle layout: stage_2_train.csv (ID,Label rows like ID_3a5b7c9d1_subdural,0), "
            f"stage_2_sample_submission.csv, and the folders stage_2_train/ and stage_2_test/ "
            f"of <image ID>.dcm files. Download it with `kaggle competitions download -c "
            f"rsna-intracranial-hemorrhage-detection`, or run without --data-dir for the demo.")
    return root


def prepare_out_dir(cfg: Config) -> Path:
    if cfg.out_dir:
        out = Path(cfg.out_dir)
    elif KAGGLE_WORKING.is_dir():
        out = KAGGLE_WORKING
    else:
        out = Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    finished = [n for n in ("submission.csv", "metrics.json") if (out / n).exists()]
    if finished and not (cfg.resume or cfg.overwrite):
        raise UserError(f"{out} already holds a finished run ({', '.join(finished)}); pass "
                        f"--resume to continue it, --overwrite to replace it, or another --out-dir")
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_csv(path: Path, df: pd.DataFrame, **kwargs) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, **kwargs)
    os.replace(tmp, path)


def record_bad_files(out_dir: Path, paths, reason: str) -> None:
    """Add files that failed only when their pixels were decoded to bad_files.csv."""
    table = pd.read_csv(out_dir / "bad_files.csv", dtype=str)
    new = [p for p in map(str, paths) if p not in set(table["path"])]
    if new:
        for p in new:
            log(f"  unreadable: {p}: {reason}")
        rows = pd.DataFrame({"path": new, "reason": reason})
        write_csv(out_dir / "bad_files.csv", pd.concat([table, rows], ignore_index=True), index=False)


# ---------------------------------------------------------------------------------------
# Stage 1: labels.

def load_labels(data_dir: Path, out_dir: Path) -> pd.DataFrame:
    labels = read_labels(data_dir / "stage_2_train.csv")
    report = label_report(labels)
    write_csv(out_dir / "label_report.csv", report, index=False)
    log(format_label_report(report))
    return labels


# ---------------------------------------------------------------------------------------
# Stage 2: DICOM headers (no pixels) for patient, series, position and pixel attributes.

def header_cache(cfg: Config, out_dir: Path, data_dir: Path, split: str) -> Path:
    """Where the header scan is cached: beside the run folders, so the next run reuses it.

    Parquet, not a pickle: a cache must never be able to run code. Keyed by the data
    folder; rows are reused only for files whose size and modification time match.
    """
    folder = Path(cfg.header_cache) if cfg.header_cache else out_dir.parent / "header_cache"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = out_dir
    key = hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:12]
    return folder / f"headers_{split}_{key}.parquet"


def scan_data(data_dir: Path, labels: pd.DataFrame, test_ids: list[str], cfg: Config,
              out_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(train headers aligned to labels, test headers, bad files with reasons)."""
    bad_rows = []
    frames = {}
    for split, ids in (("train", list(labels.index)), ("test", test_ids)):
        folder = data_dir / f"stage_2_{split}"
        paths = [folder / f"{check_image_id(i)}.dcm" for i in ids]
        present = [p for p in paths if p.is_file()]
        bad_rows += [{"path": str(p), "reason": f"named in the {split} CSV but missing on disk"}
                     for p in paths if not p.is_file()]
        t0 = time.perf_counter()
        headers, bad = scan_headers(present, workers=cfg.workers,
                                    cache=header_cache(cfg, out_dir, data_dir, split))
        log(f"Headers ({split}): {len(headers)} readable, {len(bad)} unreadable, "
            f"{len(paths) - len(present)} missing, {time.perf_counter() - t0:.1f}s")
        bad_rows += bad.to_dict("records")
        frames[split] = headers.set_index("image_id")
    bad_files = pd.DataFrame(bad_rows, columns=["path", "reason"])
    write_csv(out_dir / "bad_files.csv", bad_files, index=False)
    for row in bad_files.itertuples():
        log(f"  unreadable: {row.path}: {row.reason}")
    return frames["train"], frames["test"], bad_files


# ---------------------------------------------------------------------------------------
# Stage 3: validation split by patient, stratified over all six labels.

def make_split(labels: pd.DataFrame, headers: pd.DataFrame, cfg: Config, out_dir: Path):
    usable = labels.loc[labels.index.isin(headers.index)]
    h = headers.loc[usable.index]
    groups, n_study, n_image = resolve_groups(h["patient_id"].to_numpy(), h["study_uid"].to_numpy(),
                                              usable.index.to_numpy())
    if n_study or n_image:
        log(f"Split: {n_study} images grouped by StudyInstanceUID and {n_image} by themselves "
            f"(no PatientID)")
    y = usable.to_numpy()
    split = pd.DataFrame({"image_id": usable.index, "patient_id": groups})
    if cfg.folds >= 2:
        folds = kfold_by_patient(y, groups, cfg.folds, cfg.seed)
        val = folds == cfg.fold
        split["fold"] = folds
        table = fold_table(y, groups, folds, LABELS)
        log(f"Folds by patient (validating on fold {cfg.fold} of {cfg.folds}):")
    else:
        val = split_by_patient(y, groups, cfg.val_frac, cfg.seed)
        table = fold_table(y, groups, val, LABELS)
        log("Split by patient:")
    split["is_val"] = val
    write_csv(out_dir / "split.csv", split, index=False)
    log(format_fold_table(table))
    return usable.loc[~val], usable.loc[val]


# ---------------------------------------------------------------------------------------
# Stage 4: training. Device and precision are decided once here.

@dataclass
class Runtime:
    device: torch.device
    autocast: callable
    scaler: torch.amp.GradScaler | None


def setup_runtime() -> Runtime:
    if torch.cuda.is_available():
        device = torch.device("cuda")
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        return Runtime(device, lambda: torch.autocast("cuda", dtype=dtype), scaler)
    return Runtime(torch.device("cpu"), contextlib.nullcontext, None)


def resolve_weights(cfg: Config) -> str | None:
    if cfg.weights is not None and cfg.weights.lower() == "none":
        return None
    if cfg.weights is not None:
        return cfg.weights
    found = find_weights(cfg.arch)
    if found is None:
        raise UserError(
            f"no pretrained weights for {cfg.arch} were found (searched $TORCH_HOME/hub/checkpoints "
            f"and /kaggle/input). Attach them as a file and pass --weights PATH (for example "
            f"ig_resnext101_32x8-c38310e5.pth or torchvision's {cfg.arch}-*.pth), or pass "
            f"--weights none to train from random initialisation on purpose.")
    log(f"Weights: found {found}")
    return str(found)


def weighted_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE weighted like the competition metric ('any' counts twice), over readable rows."""
    w = torch.as_tensor(CLASS_WEIGHTS, dtype=logits.dtype, device=logits.device)
    per_row = (torch.nn.functional.binary_cross_entropy_with_logits(
        logits.float(), target, reduction="none") * w).sum(1) / w.sum()
    return (per_row * mask).sum() / mask.sum().clamp(min=1)


def lr_lambda(total_steps: int):
    warmup = max(1, min(200, total_steps // 20))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return f


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def predict(model, paths, cfg: Config, rt: Runtime, desc: str, tta: bool = False):
    """Probabilities (n, 6) and a readable flag per file."""
    ds = data_utils.SliceDataset(paths, windows=parse_windows(cfg.windows), size=cfg.image_size)
    loader = data_utils.make_loader(ds, cfg.batch_size * 2, shuffle=False, workers=cfg.workers,
                                    seed=cfg.seed)
    model.eval()
    probs, readable = np.zeros((len(ds), len(LABELS)), np.float32), np.zeros(len(ds), bool)
    for images, _, index, ok in tqdm(loader, desc=desc, leave=False, mininterval=2):
        x = data_utils.to_device_normalized(images, rt.device)
        with rt.autocast():
            logits = model(x).float()
            if tta:
                logits = (logits + model(torch.flip(x, dims=[3])).float()) / 2
        probs[index.numpy()] = torch.sigmoid(logits).cpu().numpy()
        readable[index.numpy()] = ok.numpy()
    return probs, readable


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum formula; NaN when one class is absent."""
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(p).rank().to_numpy()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def train(cfg: Config, train_df: pd.DataFrame, val_df: pd.DataFrame, headers: pd.DataFrame,
          out_dir: Path, rt: Runtime):
    """Fine-tune for cfg.epochs; returns the best model, its validation predictions, history."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    weights = resolve_weights(cfg)
    try:
        model = build_model(cfg.arch, weights, strict=cfg.weights_strict)
    except WeightsError as err:
        raise UserError(str(err)) from None
    model = model.to(rt.device).to(memory_format=torch.channels_last)
    windows = parse_windows(cfg.windows)
    train_ds = data_utils.SliceDataset(headers.loc[train_df.index, "path"], train_df.to_numpy(),
                                       windows, cfg.image_size, data_utils.train_transform())
    loader = data_utils.make_loader(train_ds, cfg.batch_size, shuffle=True, workers=cfg.workers,
                                    seed=cfg.seed, drop_last=len(train_ds) > cfg.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.epochs * len(loader)))
    ckpt_dir = out_dir / "checkpoints"
    start_epoch, best, history = 0, (math.inf, -1), []
    best_val_probs = None
    if cfg.resume and (ckpt_dir / "last.pt").is_file():
        state = torch.load(ckpt_dir / "last.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best = state["epoch"] + 1, (state["best_loss"], state["best_epoch"])
        history = pd.read_csv(out_dir / "history.csv").to_dict("records")[:start_epoch]
        torch.set_rng_state(state["torch_rng"])
        loader.generator.set_state(state["loader_rng"])
        best_val_probs = state["best_val_probs"].numpy() if "best_val_probs" in state else None
        log(f"Resuming after epoch {start_epoch} from {ckpt_dir / 'last.pt'}")

    val_paths = headers.loc[val_df.index, "path"].tolist()
    y_val = val_df.to_numpy()
    prior = prior_probabilities(train_df.to_numpy())
    unreadable: set[int] = set()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0, seen, running = time.perf_counter(), 0, 0.0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", mininterval=2)
        for images, target, index, ok in bar:
            unreadable.update(index[~ok].tolist())
            x = data_utils.to_device_normalized(images, rt.device)
            target, mask = target.to(rt.device), ok.to(rt.device, torch.float32)
            with rt.autocast():
                logits = model(x)
            loss = weighted_bce(logits, target, mask)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the training loss became {loss.item()} in epoch {epoch + 1}; the last good "
                    f"checkpoint is {ckpt_dir / 'last.pt'}. Lower --lr and run with --resume.")
            optimizer.zero_grad(set_to_none=True)
            if rt.scaler is not None:
                rt.scaler.scale(loss).backward()
                rt.scaler.step(optimizer)
                rt.scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            seen += len(images)
            running += loss.item() * len(images)
            bar.set_postfix(loss=f"{running / seen:.4f}",
                            img_s=f"{seen / (time.perf_counter() - t0):.1f}")
        val_probs, val_ok = predict(model, val_paths, cfg, rt, "validate")
        val_probs[~val_ok] = prior
        if unreadable or not val_ok.all():
            record_bad_files(out_dir, [train_ds.paths[i] for i in sorted(unreadable)] +
                             [p for p, ok in zip(val_paths, val_ok) if not ok],
                             "pixel data could not be decoded; left out of training, prior in validation")
        val_loss = weighted_log_loss(y_val, val_probs)
        row = {"epoch": epoch + 1, "train_loss": running / max(seen, 1), "val_loss": val_loss,
               "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0}
        row.update({f"val_loss_{k}": v for k, v in per_class_log_loss(y_val, val_probs).items()})
        row.update({f"val_auc_{k}": roc_auc(y_val[:, j], val_probs[:, j]) for j, k in enumerate(LABELS)})
        history.append(row)
        write_csv(out_dir / "history.csv", pd.DataFrame(history), index=False)
        log(f"epoch {epoch + 1}: train loss {row['train_loss']:.4f}, validation weighted log "
            f"loss {val_loss:.4f} ({row['seconds']:.0f}s)")
        if val_loss < best[0]:
            best, best_val_probs = (val_loss, epoch + 1), val_probs
            save_checkpoint(ckpt_dir / "best.pt", {"model": model.state_dict(), "epoch": epoch,
                                                   "val_loss": val_loss, "config": dataclasses.asdict(cfg)})
        save_checkpoint(ckpt_dir / "last.pt", {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch, "best_loss": best[0],
            "best_epoch": best[1], "torch_rng": torch.get_rng_state(),
            "loader_rng": loader.generator.get_state(), "config": dataclasses.asdict(cfg),
            "best_val_probs": torch.from_numpy(best_val_probs)})
    state = torch.load(ckpt_dir / "best.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    return model, best_val_probs, best[1]


# ---------------------------------------------------------------------------------------
# Stage 5: validation against the constant prior.

def evaluate(train_df: pd.DataFrame, val_df: pd.DataFrame, val_probs: np.ndarray,
             out_dir: Path) -> dict:
    y_val = val_df.to_numpy()
    prior = prior_probabilities(train_df.to_numpy())
    metrics = {
        "val_weighted_log_loss": weighted_log_loss(y_val, val_probs),
        "prior_weighted_log_loss": weighted_log_loss(y_val, np.broadcast_to(prior, y_val.shape)),
        "val_log_loss_per_class": per_class_log_loss(y_val, val_probs),
        "prior_log_loss_per_class": per_class_log_loss(y_val, np.broadcast_to(prior, y_val.shape)),
        "prior": dict(zip(LABELS, map(float, prior))),
        "n_train": len(train_df), "n_val": len(val_df),
    }
    preds = pd.DataFrame(val_probs, index=val_df.index, columns=[f"pred_{k}" for k in LABELS])
    write_csv(out_dir / "val_predictions.csv", pd.concat([val_df, preds], axis=1))
    log(f"Validation weighted log loss {metrics['val_weighted_log_loss']:.4f} vs constant prior "
        f"{metrics['prior_weighted_log_loss']:.4f}")
    return metrics


# ---------------------------------------------------------------------------------------
# Stage 6: predict the test set and write a checked submission.

def predict_and_submit(model, cfg: Config, data_dir: Path, test_ids: list[str],
                       test_headers: pd.DataFrame, prior: np.ndarray, out_dir: Path, rt: Runtime) -> dict:
    readable_ids = [i for i in test_ids if i in test_headers.index]
    probs, ok = predict(model, test_headers.loc[readable_ids, "path"].tolist(), cfg, rt,
                        "predict test", tta=cfg.tta)
    probs[~ok] = prior
    if not ok.all():
        record_bad_files(out_dir, [p for p, good in zip(test_headers.loc[readable_ids, "path"], ok)
                                   if not good], "pixel data could not be decoded; prior predicted")
    n_prior = len(test_ids) - int(ok.sum())
    if n_prior:
        log(f"{n_prior} unreadable test images are predicted with the training prior")
    sub = build_submission(data_dir / "stage_2_sample_submission.csv", readable_ids, probs, fill=prior)
    write_submission(sub, out_dir / "submission.csv", data_dir / "stage_2_sample_submission.csv")
    log(f"Submission: {out_dir / 'submission.csv'} ({len(sub)} rows, checked against the sample)")
    return {"n_test": len(test_ids), "n_test_predicted_with_prior": n_prior}


def check_submission(path: str, cfg: Config) -> int:
    """--check-submission: validate a file against the sample; 0 when valid, 2 otherwise."""
    data_dir = Path(cfg.data_dir) if cfg.data_dir else find_kaggle_data()
    if data_dir is None:
        raise UserError("--check-submission needs --data-dir, the folder holding "
                        "stage_2_sample_submission.csv")
    sample = data_dir / "stage_2_sample_submission.csv"
    if not sample.is_file():
        raise UserError(f"{sample} does not exist: --data-dir must hold the sample submission")
    problems = check_submission_file(path, sample)
    if problems:
        print(f"{path} is not a valid submission:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_USAGE
    log(f"{path}: valid, every row of {sample} exactly once, values in [0, 1]")
    return 0


# ---------------------------------------------------------------------------------------

def main(argv=None) -> int:
    # Our helpers log what they drop or fill; other libraries' loggers stay as they are.
    ours = logging.getLogger("utils")
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
    cfg, check = parse_args(argv)
    if check is not None:
        return check_submission(check, cfg)
    started = time.perf_counter()
    out_dir = prepare_out_dir(cfg)
    data_dir = resolve_data_dir(cfg, out_dir)
    cfg = dataclasses.replace(cfg, data_dir=str(data_dir), out_dir=str(out_dir))
    write_json(out_dir / "config.json", dataclasses.asdict(cfg))
    log(f"Run: {out_dir} (data: {data_dir}{', synthetic demo' if cfg.demo else ''})")
    rt = setup_runtime()

    labels = load_labels(data_dir, out_dir)
    test_ids = list(read_sample_submission(data_dir / "stage_2_sample_submission.csv").image_ids)
    train_headers, test_headers, bad_files = scan_data(data_dir, labels, test_ids, cfg, out_dir)
    train_df, val_df = make_split(labels, train_headers, cfg, out_dir)
    model, val_probs, best_epoch = train(cfg, train_df, val_df, train_headers, out_dir, rt)
    metrics = evaluate(train_df, val_df, val_probs, out_dir)
    prior = prior_probabilities(train_df.to_numpy())
    metrics.update(predict_and_submit(model, cfg, data_dir, test_ids, test_headers, prior, out_dir, rt))
    n_bad = len(pd.read_csv(out_dir / "bad_files.csv"))
    metrics.update(best_epoch=best_epoch, n_bad_files=n_bad,
                   seconds=round(time.perf_counter() - started, 1))
    write_json(out_dir / "metrics.json", metrics)
    log(f"Done in {metrics['seconds']:.0f}s: outputs in {out_dir}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (UserError, LabelError, SubmissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
