"""RSNA Intracranial Hemorrhage Detection: the whole pipeline, stage by stage.

    python kernel.py                                   # demo on a synthetic dataset it writes
    python kernel.py --data-dir DATA --weights ig_resnext101_32x8-c38310e5.pth
    python kernel.py --data-dir DATA --weights none    # random init, on purpose
    torchrun --nproc_per_node 4 kernel.py --data-dir DATA --weights WEIGHTS.pth
    python kernel.py --export-kaggle kaggle/ --kaggle-id USER/SLUG   # notebook to upload
    python kernel.py --evaluate SCANS --labels labels.csv --checkpoint runs/X   # a model on your scans
    python kernel.py --scans SCANS --labels labels.csv --weights runs/X/checkpoints/best.pt  # fine-tune

Stages, in the order they run: settings -> labels -> headers (and slice order) ->
split -> train -> validate (and refine) -> predict and submit -> report. DATA is the
folder holding stage_2_train.csv, stage_2_sample_submission.csv, stage_2_train/ and
stage_2_test/. On Kaggle the data is found under /kaggle/input and outputs go to
/kaggle/working.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
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
from utils import embeddings, rundir
from utils.calibration import calibration_metrics, calibration_summary, decide_calibration
from utils.demo import DEMO_PRESET, make_demo_dataset
from utils.crop import CROPS
from utils.dicom import parse_windows
from utils.headers import scan_headers
from utils.engine import (Check, CheckpointMismatch, Checkpoints, Dist, ResumableSampler, Tally, barrier,
                          check_in, gather_lists, init_distributed, load_checkpoint, model_state, roc_auc,
                          share, warmup_cosine, weighted_bce)
from utils.ensemble import assemble_oof, average, data_fingerprint, run_ensemble
from utils.errors import (EXIT_OUTPUT, EXIT_STOPPED, EXIT_USAGE, OutputError, TrainingStopped, UserError,
                          writing)
from utils.inference import (TestPredictions, calibrate_test, fine_tuning_settings, input_layout, predict,
                             predict_saved, predict_test, refine_test, run_checkpoint, scanned_and_failed,
                             slice_dataset, training_prior)
from utils.labels import (LABELS, LabelError, check_image_id, format_label_report, label_report, read_labels,
                          series_picks)
from utils.metrics import fold_labels, logit, per_class_log_loss, weighted_log_loss
from utils.model import WeightsError, build_model, resolve_weights
from utils.refiner import RefinerResult, choose_refiner, fit_refiners, save_refiner
from utils.report import report_command, write_run_report
from utils.rundir import PRED_COLUMNS, REFINED_COLUMNS, write_csv, write_json
from utils.runtime import (PRECISIONS, Runtime, RuntimeChoiceError, StopRequest, default_workers, environment,
                           launch, log_to_stdout, plan_processes, setup_runtime, under_torchrun)
from utils.slices import neighbour_paths, order_slices
from utils.split import fold_table, format_fold_table, kfold_by_patient, resolve_groups, split_by_patient
from utils.submission import (SubmissionError, build_submission, check_submission_command,
                              read_sample_submission, write_checked_submission)

DESCRIPTION = "RSNA Intracranial Hemorrhage Detection: the whole pipeline, stage by stage."
KAGGLE_INPUT, KAGGLE_WORKING = Path("/kaggle/input"), Path("/kaggle/working")


# %% Settings: plain typed values; the command line overrides them; saved as config.json.

@dataclass
class Config:
    data_dir: str | None = None      # folder with stage_2_train.csv; None: Kaggle or demo
    scans: str | None = None         # instead: a folder of your own scans (any tree), labelled by --labels
    labels: str | None = None        # the label CSV of --scans or --evaluate (utils/dataset.py)
    out_dir: str | None = None       # default ./runs/<timestamp>, /kaggle/working on Kaggle
    epochs: int = 3
    arch: str = "resnext101_32x8d"
    weights: str | None = None       # a local file, "none" for random init, None to search
    weights_strict: bool = True
    image_size: int = 256
    windows: str = "brain,subdural,soft_tissue"
    batch_size: int = 32             # per process; see the README's GPU table for 16 GB cards
    workers: int | None = None       # loader workers per process; None: the cores / processes, at most 8
    lr: float = 2e-4
    weight_decay: float = 1e-4
    val_frac: float = 0.1
    folds: int = 0                   # K >= 2: K patient-grouped folds, validate on --fold
    fold: int | str = 0              # FOLD_ALL ("all"): every fold in turn, then their average
    seed: int = 42
    tta: bool = True
    resume: bool = False
    overwrite: bool = False
    demo: bool = False               # set when no data was given: the synthetic dataset
    context: int = 0                 # 1: neighbouring slices (by z within a series) as channels
    context_windows: bool = False    # with --context: every window of each slice (9 channels)
    crop: str = "none"               # head: each slice cut to the head before resizing (utils/crop.py)
    refine: bool = False             # refine predictions along each series (a 1-D conv)
    calibrate: bool = False          # temperature per class, used where it helps out of fold
    accum: int = 1                   # batches per optimizer step (gradient accumulation)
    ckpt_minutes: float = 20.0       # mid-epoch checkpoint interval (rank 0's clock); 0: at every check
    log_every: int = 20              # optimizer steps between checks: loss shown, NaN, Ctrl-C, checkpoint due
    compile: bool = False            # torch.compile the model
    precision: str = "auto"          # auto: bf16 on GPUs >= sm_80, fp16 below (a grad scaler), fp32 on the CPU
    processes: int | None = None     # None: one per GPU when there are several (started under torchrun)
    demo_patients: int = 36          # training patients of the synthetic dataset
    header_cache: str | None = None  # folder for the header scan cache; default beside out-dir


FOLD_ALL = "all"  # --fold all, as config.json says it
PREDICT_THRESHOLD = 0.5  # --predict: `any` above it makes a slice count, and its series positive


def _fold(text: str) -> int | str:
    if text.lower() == "all":
        return FOLD_ALL
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fold number or all, got {text!r}") from None


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# Each option, its type and what it does; the default is Config's (the demo's without data).
OPTIONS = {
    "data_dir": (str, "the folder of stage_2_train.csv and the DICOM folders (default: Kaggle's, else the demo)"),
    "scans": (str, "train on a folder of your own scans (any tree, any format --predict reads) with --labels "
                   "(default: none)"),
    "labels": (str, "with --scans or --evaluate: the label CSV of the folder, by path, sop_uid or series_uid "
                    "(default: none)"),
    "out_dir": (str, "the run folder (default: runs/<time>, /kaggle/working on Kaggle)"),
    "epochs": (int, "passes over the training images"),
    "arch": (str, "the torchvision ResNet or ResNeXt to fine-tune"),
    "weights": (str, "pretrained weights file, a run's checkpoint to fine-tune (its model settings come "
                     "with it), or none for random initialisation (default: searched)"),
    "weights_strict": (_bool, "refuse weights with missing or unexpected keys"),
    "image_size": (int, "side of the square input in pixels"),
    "windows": (str, "comma-separated windows (names or center:width), one channel each"),
    "batch_size": (int, "images per step per process"),
    "workers": (int, "data loader workers per process (default: the cores / processes, at most 8)"),
    "lr": (float, "peak learning rate of AdamW (warm-up, then cosine)"),
    "weight_decay": (float, "AdamW's weight decay"),
    "val_frac": (float, "share of patients held out for validation without --folds"),
    "seed": (int, "seed of the split, the initialisation and the augmentation"),
    "tta": (_bool, "average each prediction with that of the mirrored image"),
    "demo_patients": (int, "training patients of the synthetic demo dataset"),
    "header_cache": (str, "folder of the header scan cache (default: beside the run folders)"),
    "folds": (int, "K >= 2: K patient-grouped folds (0: one --val-frac split)"),
    "fold": (_fold, "the fold to validate on, or all: every fold in turn, then their average"),
    "accum": (int, "batches per optimiser step (gradient accumulation)"),
    "ckpt_minutes": (float, "minutes between mid-epoch checkpoints (0: at every check)"),
    "log_every": (int, "optimiser steps between checks: loss shown, NaN, Ctrl-C, checkpoint due"),
    "checkpoint": (str, "with --predict-only, --predict or --evaluate: a best.pt, a run folder or an ensemble folder "
                        "(default: none)"),
    "context": (int, "1: the slices below and above as channels"),
    "crop": (str, "none, or head: cut each slice to the head (the largest region above -500 HU, squared) before resizing"),
    "precision": (str, "auto, fp32, bf16 or fp16 (auto: bf16 from sm_80, fp16 below, fp32 on the CPU)"),
    "predict": (str, "predict every CT slice in this folder of your own scans with --checkpoint (default: none)"),
    "evaluate": (str, "score --checkpoint on this folder of your own scans against --labels, no training "
                      "(default: none)"),
    "threshold": (float, f"with --predict or --evaluate: the `any` probability that makes a slice, and its series, positive "
                         f"(default: {PREDICT_THRESHOLD})"),
    "processes": (int, "processes to train with (default: one per GPU; started under torchrun)")}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, (kind, text) in OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=text if "(default" in text else f"{text} (default: {getattr(Config, name)})")
    # Flags default to None, like the options above: only what was given overrides Config.
    flags = {"resume": "continue the run in --out-dir",
             "overwrite": "replace a finished run in --out-dir",
             "compile": "torch.compile the model",
             "context_windows": "with --context 1: all windows of the slices below, at and above",
             "refine": "refine each series' predictions with a small sequence model",
             "calibrate": "scale each class's logits by a temperature fitted on the validation "
                          "(or out-of-fold) predictions, where that helps out of fold",
             "predict_only": "make a submission from --checkpoint without training",
             "report": "only (re)write the visual report of the run in --out-dir, then exit"}
    for name, text in flags.items():
        p.add_argument("--" + name.replace("_", "-"), action="store_true", default=None, help=text)
    p.add_argument("--check-submission", metavar="PATH", default=None,
                   help="only check a submission file against the sample submission, then exit")
    p.add_argument("--export-kaggle", metavar="DIR", default=None,
                   help="only write kernel.ipynb, kernel_bundle.py and kernel-metadata.json to DIR")
    p.add_argument("--kaggle-id", metavar="USER/SLUG", default=None, help="the exported kernel's id")
    p.add_argument("--kaggle-weights-dataset", metavar="USER/SLUG", default=None,
                   help="the Kaggle dataset holding the pretrained weights, attached to the export")
    p.add_argument("--with-wheels", action="store_true", default=None,
                   help="with --export-kaggle: also download the pinned packages' wheels for "
                        "Kaggle's Python into DIR/wheels, a dataset the notebook installs from")
    p.add_argument("--ensemble", metavar="RUN_DIR", nargs="+", default=None,
                   help="only average the test predictions of these finished runs into --out-dir")
    p.add_argument("--ensemble-weights", metavar="W", nargs="+", type=float, default=None,
                   help="with --ensemble: one weight per run (default: equal)")
    return p


def _problems(cfg: Config) -> list[str]:
    """What is wrong with the settings, in the words of the options."""
    problems = [f"--{k.replace('_', '-')} must be positive" for k in
                ("epochs", "image_size", "batch_size", "demo_patients") if getattr(cfg, k) <= 0]
    checks = [(cfg.workers is not None and cfg.workers < 0, "--workers must be >= 0"),
              (cfg.log_every < 1, "--log-every must be >= 1"),
              (cfg.processes is not None and cfg.processes < 1, "--processes must be >= 1"),
              (cfg.precision not in ("auto", *PRECISIONS), "--precision must be auto, fp32, bf16 or fp16"),
              (cfg.context not in (0, 1), "--context must be 0 or 1"),
              (cfg.crop not in CROPS, f"--crop must be {' or '.join(CROPS)}"),
              (cfg.context_windows and not cfg.context, "--context-windows needs --context 1"),
              (cfg.accum < 1, "--accum must be >= 1"),
              (cfg.ckpt_minutes < 0, "--ckpt-minutes must be >= 0"),
              (not 0 < cfg.val_frac < 1, "--val-frac must be between 0 and 1"),
              (cfg.folds == 1 or cfg.folds < 0, "--folds must be 0 (a single --val-frac split) or at least 2"),
              (cfg.folds >= 2 and not (cfg.fold == FOLD_ALL or 0 <= cfg.fold < cfg.folds),
               f"--fold must be between 0 and {cfg.folds - 1}, or all"),
              (cfg.fold == FOLD_ALL and cfg.folds < 2, "--fold all needs --folds K (K >= 2)"),
              (cfg.scans is not None and cfg.data_dir is not None, "--scans and --data-dir are two datasets: give one"),
              (cfg.scans is not None and cfg.labels is None, "--scans needs --labels CSV")]
    problems += [text for failed, text in checks if failed]
    try:
        parse_windows(cfg.windows)
    except ValueError as err:
        problems.append(f"--windows: {err}")
    return problems


# The ways in besides training, and the options that belong to some of them alone: not
# settings of a run (Config), but what parse_args returns beside them.
MODES = ("predict_only", "predict", "evaluate", "ensemble", "check_submission", "report", "export_kaggle")
MODE_OPTIONS = {"checkpoint": ("predict_only", "predict", "evaluate"), "threshold": ("predict", "evaluate"),
                "ensemble_weights": ("ensemble",), "kaggle_id": ("export_kaggle",),
                "kaggle_weights_dataset": ("export_kaggle",), "with_wheels": ("export_kaggle",)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _mode_problems(given: dict) -> list[str]:
    """Modes exclude each other; an option of one mode given without it names that mode."""
    chosen = [m for m in MODES if m in given]
    problems = [f"{' and '.join(map(_flag, chosen))} are different modes: give one"] if len(chosen) > 1 else []
    problems += [f"{_flag(m)} needs --checkpoint PATH" for m in ("predict_only", "predict", "evaluate")
                 if m in given and "checkpoint" not in given]
    if "labels" in given and not ({"scans", "evaluate"} & set(given)):
        problems.append("--labels belongs to --scans or --evaluate")
    if "evaluate" in given and "labels" not in given:
        problems.append("--evaluate needs --labels CSV")
    if not 0 < given.get("threshold", PREDICT_THRESHOLD) < 1:
        problems.append("--threshold must be between 0 and 1")
    return problems + [f"{_flag(option)} belongs to {' or '.join(map(_flag, owners))}"
                       for option, owners in MODE_OPTIONS.items()
                       if option in given and not set(owners) & set(chosen)]


def parse_args(argv=None) -> tuple[Config, dict]:
    """The resolved settings, and the modes (MODES, each None unless given) with their options."""
    p = _parser()
    args = p.parse_args(argv)  # an unknown option exits with usage and code 2
    given = {k: v for k, v in vars(args).items() if v is not None}
    mode_problems = _mode_problems(given)
    modes = {k: given.pop(k, None) for k in (*MODES, *MODE_OPTIONS)}
    modes["threshold"] = modes["threshold"] or PREDICT_THRESHOLD
    cfg = Config()
    if given.get("data_dir") is None and given.get("scans") is None and find_kaggle_data() is None:
        cfg = dataclasses.replace(cfg, demo=True, **DEMO_PRESET)
    cfg = dataclasses.replace(cfg, **given)
    if not any(modes[m] for m in MODES):
        cfg, clash = fine_tuning_settings(cfg, given)
        mode_problems += clash
    if cfg.workers is None:
        cfg = dataclasses.replace(cfg, workers=default_workers(os.cpu_count(),
                                                               int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    problems = mode_problems + _problems(cfg)
    if problems:
        p.error("; ".join(problems))
    return cfg, modes


LOG = logging.getLogger("kernel")
log_to_stdout("kernel", "utils")  # utils' modules log what they drop, fill or write: shown like ours


def log(*parts) -> None:
    LOG.info(" ".join(map(str, parts)))


# %% Data folder and output folder.

DATA_LAYOUT = ("stage_2_train.csv", "stage_2_sample_submission.csv", "stage_2_train", "stage_2_test")


def find_kaggle_data() -> Path | None:
    """The competition folder under /kaggle/input; the mount is nested, so search for it."""
    if not KAGGLE_INPUT.is_dir():
        return None
    hits = sorted(KAGGLE_INPUT.rglob("stage_2_train.csv"))
    return hits[0].parent if hits else None


def resolve_data_dir(cfg: Config, out_dir: Path) -> Path:
    if cfg.scans:  # read by utils.dataset.labelled_folder, which refuses one that is missing
        return Path(cfg.scans)
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


def prepare_out_dir(cfg: Config, held: contextlib.ExitStack) -> Path:
    """The run's folder (--out-dir; on Kaggle its working folder; else runs/<time>), held by
    this process until ``held`` closes: utils.rundir.prepare_out_dir."""
    if cfg.out_dir:
        out = Path(cfg.out_dir)
    elif KAGGLE_WORKING.is_dir():
        out = KAGGLE_WORKING
    else:
        out = Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    return rundir.prepare_out_dir(out, held, cfg.resume, cfg.overwrite, inputs=KAGGLE_INPUT)


# %% Stage 1: labels.

def load_labels(data_dir: Path, out_dir: Path, d: Dist) -> pd.DataFrame:
    labels = read_labels(data_dir / "stage_2_train.csv")
    report = label_report(labels)
    if d.main:
        write_csv(out_dir / rundir.LABEL_REPORT, report, index=False)
    log(format_label_report(report))
    return labels


# %% Stage 2: DICOM headers (no pixels) for patient, series, position and pixel attributes.


def scan_data(data_dir: Path, ids_by_split: dict[str, list[str]], cfg: Config, out_dir: Path,
              d: Dist) -> dict[str, pd.DataFrame]:
    """Headers of each split's files, indexed by image ID; unreadable ones in bad_files.csv.

    Under torchrun rank 0 scans and fills the cache first; the other ranks then read it.
    """
    bad_rows, frames = [], {}
    for split, ids in ids_by_split.items():
        folder = data_dir / f"stage_2_{split}"
        paths = [folder / f"{check_image_id(i)}.dcm" for i in ids]
        present = [p for p in paths if p.is_file()]
        bad_rows += [{"path": str(p), "reason": f"named in the {split} CSV but missing on disk"}
                     for p in paths if not p.is_file()]
        t0 = time.perf_counter()
        cache = rundir.header_cache(cfg.header_cache, out_dir, data_dir, split)
        if not d.main:
            barrier(d)
        headers, bad = scan_headers(present, workers=cfg.workers, cache=cache, update_cache=d.main)
        if d.main:
            barrier(d)
        log(f"Headers ({split}): {len(headers)} readable, {len(bad)} unreadable, "
            f"{len(paths) - len(present)} missing, {time.perf_counter() - t0:.1f}s")
        bad_rows += bad.to_dict("records")
        frames[split] = headers.set_index("image_id")
    bad_files = pd.DataFrame(bad_rows, columns=["path", "reason"])
    if d.main:
        write_csv(out_dir / rundir.BAD_FILES, bad_files, index=False)
    for row in bad_files.itertuples():
        log(f"  unreadable: {row.path}: {row.reason}")
    barrier(d)
    return frames


def add_slice_order(headers: pd.DataFrame, split: str) -> pd.DataFrame:
    """Series, position along z, and the paths of the slices below and above each slice
    (used by --context and --refine; an edge slice is its own neighbour)."""
    order = order_slices(headers.reset_index())
    notes = {k: order.attrs.get(k, 0) for k in ("ties", "missing_z", "series_fallback")}
    log(f"Slice order ({split}): {order.attrs.get('n_series', order['series'].nunique())} series; "
        f"{notes['ties']} tied z, {notes['missing_z']} without z (alone), "
        f"{notes['series_fallback']} without a series UID")
    near = neighbour_paths(order, headers["path"], radius=1)
    return headers.assign(series=order.loc[headers.index, "series"],
                          position=order.loc[headers.index, "position"],
                          below=near.loc[headers.index, -1], above=near.loc[headers.index, 1])


# %% Stage 3: validation split by patient, stratified over all six labels.

def make_split(labels: pd.DataFrame, headers: pd.DataFrame, cfg: Config, out_dir: Path,
               d: Dist) -> tuple[pd.DataFrame, np.ndarray]:
    """The labels of the usable images and each image's fold: its patient fold 0..K-1 with
    --folds K; with --val-frac, 1 for the held-out share and 0 for the rest."""
    usable = labels.loc[labels.index.isin(headers.index)]
    h = headers.loc[usable.index]
    groups, n_study, n_image = resolve_groups(h["patient_id"].to_numpy(), h["study_uid"].to_numpy(),
                                              usable.index.to_numpy())
    if n_study or n_image:
        log(f"Split: {n_study} images grouped by StudyInstanceUID and {n_image} by themselves "
            f"(no PatientID)")
    y = fold_labels(usable.to_numpy())  # an unknown label (a site's CSV) stratifies as a 0
    split = pd.DataFrame({"image_id": usable.index, "patient_id": groups})
    if cfg.folds >= 2:
        folds = kfold_by_patient(y, groups, cfg.folds, cfg.seed)
        split["fold"] = folds
        table = fold_table(y, groups, folds, LABELS)
        which = "every fold in turn" if cfg.fold == FOLD_ALL else f"fold {cfg.fold}"
        log(f"Folds by patient (validating on {which} of {cfg.folds}):")
    else:
        folds = split_by_patient(y, groups, cfg.val_frac, cfg.seed).astype(np.int64)
        table = fold_table(y, groups, folds == 1, LABELS)
        log("Split by patient:")
    if cfg.fold != FOLD_ALL:
        split["is_val"] = folds == validation_fold(cfg)
    if d.main:
        write_csv(out_dir / rundir.SPLIT, split, index=False)
    log(format_fold_table(table))
    return usable, folds


def validation_fold(cfg: Config) -> int:
    return cfg.fold if cfg.folds >= 2 else 1


# %% Stage 4: training. Device, precision and processes are decided once, in utils.runtime.


# A run of fp16 steps skipped in a row (a loss or gradient not finite) beyond which the
# scaler is not the cure: its scale has been halved this many times.
MAX_SKIPPED_IN_A_ROW = 25


@dataclass
class Training:
    """One training run as it goes: the model, its optimiser, where it stands. The state
    of a run that ``last.pt`` holds, and that a fold loop creates once per fold."""
    model: torch.nn.Module   # the plain model: checkpoints and validation
    net: torch.nn.Module     # what the loop calls: DDP and/or compiled around the model
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    data: data_utils.SliceDataset
    sampler: ResumableSampler
    prior: np.ndarray        # of the training labels: what an unreadable slice is given
    ckpt: Checkpoints
    tally: Tally             # the steps since the last check, on the device
    pos: dict = dataclasses.field(default_factory=lambda: {
        "epoch": 0, "batch": 0, "running": 0.0, "seen": 0, "best_loss": math.inf,
        "best_epoch": 0, "unreadable": [], "skipped_steps": 0})
    history: list = dataclasses.field(default_factory=list)
    best_val_probs: np.ndarray | None = None

    def state(self) -> dict:
        """What last.pt holds (Checkpoints adds the settings)."""
        return {"model": model_state(self.model), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "torch_rng": torch.get_rng_state(), "position": dict(self.pos),
                "prior": torch.from_numpy(self.prior),
                "best_val_probs": None if self.best_val_probs is None
                else torch.from_numpy(self.best_val_probs)}

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        self.pos.update(state["position"])
        if state.get("best_val_probs") is not None:
            self.best_val_probs = state["best_val_probs"].numpy()


def start_training(cfg: Config, train_df: pd.DataFrame, headers: pd.DataFrame, out_dir: Path,
                   rt: Runtime) -> Training:
    """The model, its optimiser and data for cfg; resumed from last.pt under --resume."""
    torch.manual_seed(cfg.seed)  # the same initial head on every rank
    channels, slices = input_layout(cfg)
    start = run_checkpoint(cfg.weights)
    try:
        model = build_model(cfg.arch, None if start else resolve_weights(cfg.weights, cfg.arch),
                            strict=cfg.weights_strict, in_channels=channels, slices=slices)
    except WeightsError as err:
        raise UserError(str(err)) from None
    if start:  # fine-tuning: the whole model, head included (fine_tuning_settings made them alike)
        model.load_state_dict(start["model"])
        log(f"Fine-tuning {cfg.weights} (its epoch {start.get('epoch', '?')})")
    model = model.to(rt.device).to(memory_format=torch.channels_last)
    net = model
    if rt.dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    data = slice_dataset(headers.loc[train_df.index], cfg, train_df.to_numpy(), data_utils.train_transform())
    d = rt.dist
    sampler = ResumableSampler(len(data), cfg.batch_size, cfg.seed, rank=d.rank, world=d.world,
                               drop_last=len(data) > cfg.batch_size * d.world)
    # fused on CUDA: one kernel per step, and the grad scaler's skip decision stays on the GPU
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=True if rt.device.type == "cuda" else None)
    steps = cfg.epochs * math.ceil(sampler.batches_per_epoch() / cfg.accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    scaler = torch.amp.GradScaler(rt.device.type) if rt.amp_dtype == torch.float16 else None
    run = Training(model, net, optimizer, scheduler, scaler, data, sampler,
                   training_prior(cfg.weights, train_df),
                   Checkpoints(out_dir / rundir.CHECKPOINTS, dataclasses.asdict(cfg)), Tally.zeros(rt.device))
    state = run.ckpt.resumable() if cfg.resume else None
    if state is not None:
        run.restore(state)
        if (out_dir / rundir.HISTORY).is_file():
            run.history = [r for r in pd.read_csv(out_dir / rundir.HISTORY).to_dict("records")
                           if r["epoch"] <= run.pos["epoch"]]
        log(f"Resuming at epoch {run.pos['epoch'] + 1}, batch {run.pos['batch']} of "
            f"{sampler.batches_per_epoch()}, from {run.ckpt.last}")
    return run


def save_last(run: Training, rt: Runtime) -> None:
    if rt.dist.main:
        with writing(run.ckpt.last):
            run.ckpt.save(run.ckpt.last, run.state())
    barrier(rt.dist)


def training_step(run: Training, cfg: Config, rt: Runtime, images, target, ok) -> bool:
    """Forward and backward on one batch; an optimiser step after every --accum batches.
    True when a step was taken. Nothing here waits for the GPU: the loss and its checks
    go into the device-side tally, read at the next check."""
    pos = run.pos
    x = data_utils.to_device_normalized(images, rt.device, input_layout(cfg)[1])
    target = target.to(rt.device, non_blocking=True)
    mask = ok.to(rt.device, torch.float32, non_blocking=True)
    pos["batch"] += 1
    stepping = pos["batch"] % cfg.accum == 0 or pos["batch"] == run.sampler.batches_per_epoch()
    # under DDP the gradients are all-reduced on the batch that steps, not on every micro-batch
    accumulating = run.net.no_sync() if rt.dist.enabled and not stepping else contextlib.nullcontext()
    try:
        with accumulating:
            with rt.autocast():
                logits = run.net(x)
            loss = weighted_bce(logits, target, mask)
            (run.scaler.scale(loss / cfg.accum) if run.scaler else loss / cfg.accum).backward()
    except torch.cuda.OutOfMemoryError:
        raise UserError(
            f"out of GPU memory at --batch-size {cfg.batch_size}, --image-size {cfg.image_size}, "
            f"{cfg.arch} on {rt.machine.describe()}: pass --batch-size {max(1, cfg.batch_size // 2)} "
            f"--accum {cfg.accum * 2} (the same batch per optimizer step), and --overwrite or a new "
            f"--out-dir (the batch size shapes the run)") from None
    run.tally.add_batch(loss, len(images))
    if not stepping:
        return False
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
        # the scaler skips the step when a gradient is not finite; the norm says when, on the device
        norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), math.inf)
        run.tally.add_step(~torch.isfinite(norm))
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return True


def after_check(run: Training, cfg: Config, rt: Runtime, check: Check) -> None:
    """Fold a check into the run's position; stop on a diverged loss."""
    pos = run.pos
    pos["running"] += check.loss_sum
    pos["seen"] += check.seen
    pos["skipped_steps"] += check.skipped
    diverged = (check.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW if run.scaler is not None
                else check.nonfinite > 0)
    if diverged:
        what = (f"not finite for {check.skipped_in_a_row} fp16 steps in a row (each skipped by the "
                f"grad scaler)" if run.scaler is not None else "nan or inf")
        raise TrainingStopped(
            f"the training loss became {what} by epoch {pos['epoch'] + 1}, batch {pos['batch']}; "
            f"the last good checkpoint, {run.ckpt.last}, is kept. Lower --lr (now {cfg.lr}) and "
            f"continue with --resume.")


def train_one_epoch(run: Training, cfg: Config, rt: Runtime, stop: StopRequest) -> float:
    """The rest of the current epoch, from pos["batch"]. Every --log-every steps the ranks
    check in together: the loss is shown, a NaN stops the run, and a checkpoint is written
    when rank 0's clock says --ckpt-minutes have passed, or on Ctrl-C before stopping.
    Returns the images per second trained (all ranks), kernel.py's own training speed."""
    pos, epoch, batches = run.pos, run.pos["epoch"], run.sampler.batches_per_epoch()
    run.data.epoch = epoch
    run.sampler.set_epoch(epoch, pos["batch"])
    loader = data_utils.make_loader(run.data, cfg.batch_size, workers=cfg.workers, sampler=run.sampler)
    run.net.train()
    t0, seen_now, steps, last_save = time.perf_counter(), 0, 0, time.monotonic()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", initial=pos["batch"],
               total=batches, mininterval=2, disable=not rt.dist.main)
    for images, target, index, ok in bar:
        pos["unreadable"] += [run.data.paths[i] for i in index[~ok].tolist()]
        seen_now += len(images)
        stepped = training_step(run, cfg, rt, images, target, ok)
        steps += stepped
        if not (stepped and (steps % cfg.log_every == 0 or pos["batch"] == batches)):
            continue
        check = check_in(run.tally, rt.dist, stop.requested,
                         time.monotonic() - last_save >= cfg.ckpt_minutes * 60)
        after_check(run, cfg, rt, check)
        bar.set_postfix(loss=f"{pos['running'] / max(pos['seen'], 1):.4f}",
                        img_s=f"{seen_now * rt.dist.world / (time.perf_counter() - t0):.1f}")
        if check.stop:
            save_last(run, rt)
            raise TrainingStopped(
                f"interrupted at epoch {epoch + 1}, batch {pos['batch']}; checkpoint saved to "
                f"{run.ckpt.last}. Continue with the same command plus --resume.")
        if check.save and pos["batch"] < batches:
            save_last(run, rt)
            last_save = time.monotonic()
    bar.close()
    return seen_now * rt.dist.world / max(time.perf_counter() - t0, 1e-9)


def validate(run: Training, cfg: Config, rt: Runtime, val_df: pd.DataFrame, headers: pd.DataFrame,
             out_dir: Path, started: float) -> tuple[np.ndarray, dict]:
    """Validation probabilities (the prior where unreadable) and the epoch's history row
    (its seconds counted from ``started``, training and validation)."""
    # the plain model: DDP's forward is a collective, and the ranks' shares of the
    # validation set may differ by one batch
    val_probs, val_ok, _ = predict(run.model, headers.loc[val_df.index], cfg, rt, "validate")
    val_probs[~val_ok] = run.prior
    val_paths = headers.loc[val_df.index, "path"].tolist()
    unreadable = gather_lists(rt.dist, run.pos["unreadable"]) + [p for p, ok in zip(val_paths, val_ok) if not ok]
    if unreadable and rt.dist.main:
        rundir.record_bad_files(out_dir, unreadable,
                         "pixel data could not be decoded; left out of training, prior in validation")
    y_val = val_df.to_numpy()
    row = {"epoch": run.pos["epoch"] + 1, "train_loss": run.pos["running"] / max(run.pos["seen"], 1),
           "val_loss": weighted_log_loss(y_val, val_probs), "lr": run.scheduler.get_last_lr()[0],
           "seconds": time.perf_counter() - started, "skipped_steps": run.pos["skipped_steps"]}
    row.update({f"val_loss_{k}": v for k, v in per_class_log_loss(y_val, val_probs).items()})
    row.update({f"val_auc_{k}": roc_auc(y_val[:, j], val_probs[:, j]) for j, k in enumerate(LABELS)})
    return val_probs, row


def end_epoch(run: Training, rt: Runtime, val_probs: np.ndarray, row: dict, out_dir: Path) -> None:
    """Keep the best model, write the history, checkpoint the position after the epoch."""
    run.history.append(row)
    log(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}, validation weighted log "
        f"loss {row['val_loss']:.4f} ({row['seconds']:.0f}s)")
    if row["val_loss"] < run.pos["best_loss"]:
        run.pos["best_loss"], run.pos["best_epoch"], run.best_val_probs = row["val_loss"], row["epoch"], val_probs
        if rt.dist.main:
            with writing(run.ckpt.best):
                run.ckpt.save(run.ckpt.best, {"model": model_state(run.model), "epoch": row["epoch"],
                                              "val_loss": row["val_loss"], "prior": torch.from_numpy(run.prior)})
    if rt.dist.main:
        write_csv(out_dir / rundir.HISTORY, pd.DataFrame(run.history), index=False)
    run.pos.update(epoch=row["epoch"], batch=0, running=0.0, seen=0, unreadable=[], skipped_steps=0)
    save_last(run, rt)


def label_series_maxima(run: Training, cfg: Config, rt: Runtime, train_df: pd.DataFrame, headers: pd.DataFrame,
                        series_labels: pd.DataFrame) -> None:
    """The series-level loss of --scans' series-level labels (utils.labels.series_picks): at
    each epoch's start, the slice where the current model puts a series-labelled class's
    maximum is labelled 1 for the epoch; a resumed epoch keeps its checkpoint's picks."""
    y = train_df.to_numpy(np.float32, copy=True)
    if run.pos["batch"] == 0 or "picks" not in run.pos:
        h = headers.loc[train_df.index]
        rows = np.flatnonzero(h["series"].isin(series_labels.index).to_numpy())
        probs, ok, _ = predict(run.model, h.iloc[rows], cfg, rt, "series maxima")
        rows, probs = rows[ok], probs[ok]  # an unreadable slice is nobody's maximum
        picks = series_picks(probs, h["series"].to_numpy()[rows], y[rows], series_labels)
        run.pos["picks"] = np.column_stack([rows[picks[:, 0]], picks[:, 1]]).tolist()
        log(f"Series-level labels: {len(picks)} series maxima labelled 1 for epoch {run.pos['epoch'] + 1}")
    for r, c in run.pos["picks"]:
        y[r, c] = 1
    run.data.labels = y


def train(cfg: Config, train_df: pd.DataFrame, val_df: pd.DataFrame, headers: pd.DataFrame,
          out_dir: Path, rt: Runtime, series_labels: pd.DataFrame | None = None):
    """Fine-tune for cfg.epochs (--scans' ``series_labels`` through label_series_maxima);
    returns the best model, its validation predictions, epoch."""
    run = start_training(cfg, train_df, headers, out_dir, rt)
    with StopRequest(rt.dist.enabled) as stop:
        while run.pos["epoch"] < cfg.epochs:
            started = time.perf_counter()
            if series_labels is not None and len(series_labels):
                label_series_maxima(run, cfg, rt, train_df, headers, series_labels)
            images_s = train_one_epoch(run, cfg, rt, stop)
            val_probs, row = validate(run, cfg, rt, val_df, headers, out_dir, started)
            end_epoch(run, rt, val_probs, {**row, "train_images_s": images_s}, out_dir)
    run.model.load_state_dict(load_checkpoint(run.ckpt.best)["model"])
    return run.model, run.best_val_probs, run.pos["best_epoch"]


# %% Stage 5: validation against the constant prior.

def evaluate(truth: pd.DataFrame, probs: np.ndarray, prior: np.ndarray, validated_on: str) -> dict:
    """The scores of per-slice predictions against the constant prior, in the one metrics
    schema (utils.rundir.METRIC_KEYS); refine_and_calibrate adds the steps after."""
    y = truth.to_numpy()
    prior_probs = np.broadcast_to(prior, y.shape)
    loss, prior_loss = weighted_log_loss(y, probs), weighted_log_loss(y, prior_probs)
    where = {"validation": "Validation", "out_of_fold": "Out-of-fold"}[validated_on]
    log(f"{where} weighted log loss {loss:.4f} over {len(y)} images vs constant prior {prior_loss:.4f}")
    return {"validated_on": validated_on, "n_validation": len(y), "weighted_log_loss": loss,
            "weighted_log_loss_per_slice": loss, "prior_weighted_log_loss": prior_loss,
            "log_loss_per_class": per_class_log_loss(y, probs),
            "prior_log_loss_per_class": per_class_log_loss(y, prior_probs), "prior": dict(zip(LABELS, map(float, prior)))}


# %% Stage 6: refine along each series and calibrate, fitted on the validation predictions.

def patient_groups(headers: pd.DataFrame, ids: pd.Index) -> np.ndarray:
    """The patient of each image (with the study and image fallbacks of utils.split)."""
    h = headers.loc[ids]
    return resolve_groups(h["patient_id"].to_numpy(), h["study_uid"].to_numpy(), ids.to_numpy())[0]


def fit_calibration(truth: pd.DataFrame, probs: np.ndarray, headers: pd.DataFrame, cfg: Config,
                    out_dir: Path, d: Dist) -> dict | None:
    """--calibrate: a temperature per class fitted on the validation (or out-of-fold)
    predictions, judged out of fold by patient; calibration.json says whether it is used."""
    groups = patient_groups(headers, truth.index)
    if len(np.unique(groups)) < 2:
        log("Calibration skipped: it is judged out of fold and needs at least 2 patients")
        return None
    decision = decide_calibration(truth.to_numpy(), probs, groups, seed=cfg.seed)
    verdict = "used" if decision["use"] else "not used: it does not help out of fold"
    log(f"Calibration: weighted log loss {decision['loss_before']:.4f} -> {decision['loss_after_oof']:.4f} "
        f"with a temperature per class (out of fold, {decision['n_folds']} patient folds); {verdict}")
    if d.main:
        write_json(out_dir / rundir.CALIBRATION, decision)
    return decision


def fit_series_refiner(val_df: pd.DataFrame, val_probs: np.ndarray, headers: pd.DataFrame, cfg: Config,
                       features=None, device="cpu") -> tuple[RefinerResult | None, np.ndarray, dict]:
    """--refine: refiners along each series, trained on the validation predictions in
    patient-grouped folds, so each slice's refined value comes from a model that never saw
    its patient: a 1-D conv over the per-slice logits and, where the run kept its images'
    ``features``, a GRU over the logits and the features (utils/refiner.py). Returns what
    wins out of fold (a refiner, or None: the per-slice predictions), the probabilities it
    gives the validation images, and each refiner's out-of-fold loss by kind."""
    h = headers.loc[val_df.index]
    groups = patient_groups(headers, val_df.index)
    n_patients = len(np.unique(groups))
    if n_patients < 2:
        log(f"Refiner skipped: the validation set holds {n_patients} patient, and "
            f"out-of-fold refinement needs at least 2; the submission is not refined")
        return None, val_probs, {}
    y = val_df.to_numpy()
    fitted = fit_refiners(logit(val_probs), y, h["series"].to_numpy(), h["position"].to_numpy(), groups,
                          seed=cfg.seed, features=features, device=device)
    before = weighted_log_loss(y, val_probs)
    losses = {kind: result.loss_after for kind, result in fitted.items()}
    log(f"Refiner: validation weighted log loss {before:.4f} per slice -> "
        + ", ".join(f"{loss:.4f} over the {kind}" for kind, loss in losses.items())
        + f" along the series (out of fold, {fitted['logits'].n_folds} patient folds)")
    best = choose_refiner(losses, before)
    if best is None:
        log("Refiner not used: it does not beat the per-slice predictions out of fold")
        return None, val_probs, losses
    log(f"Refiner used: the one over the {best}")
    return fitted[best], fitted[best].oof_probs, losses


def refine_and_calibrate(cfg: Config, table: pd.DataFrame, headers: pd.DataFrame, metrics: dict,
                         out_dir: Path, d: Dist, features=None,
                         device="cpu") -> tuple[RefinerResult | None, dict | None, pd.DataFrame]:
    """--refine, then --calibrate, fitted on the validation (or out-of-fold) predictions
    ``table`` (and the ``features`` of its rows, where kept): the refiner and calibration for
    the test set, and the table with refined_* where a refiner is used. ``metrics`` is
    completed: weighted_log_loss becomes the loss of what is submitted (rundir.final_columns)."""
    truth, refiner, calibration = table[list(LABELS)], None, None
    if cfg.refine:
        refiner, refined, losses = fit_series_refiner(truth, table[PRED_COLUMNS].to_numpy(), headers, cfg,
                                                      features, device)
        metrics.update(refiner_used=refiner is not None, refiner=refiner.kind if refiner else "none",
                       weighted_log_loss_refined=min(losses.values(), default=float("nan")),
                       **{f"weighted_log_loss_refined_{kind}": loss for kind, loss in losses.items()})
        if refiner is not None:
            table = table.assign(**dict(zip(REFINED_COLUMNS, refined.T)))
    final = table[rundir.final_columns(table)].to_numpy()
    if refiner is not None:
        metrics.update(weighted_log_loss=weighted_log_loss(truth.to_numpy(), final),
                       log_loss_per_class=per_class_log_loss(truth.to_numpy(), final))
    metrics.update(calibration_summary(truth.to_numpy(), final))
    if cfg.calibrate:
        calibration = fit_calibration(truth, final, headers, cfg, out_dir, d)
        metrics.update(calibration_metrics(calibration))
    return refiner, calibration, table


# %% Stage 7: predict the test set and write a checked submission.


def submit(pred: TestPredictions, data_dir: Path, out_dir: Path, rt: Runtime) -> dict:
    """submission.csv, checked against the sample, and test_predictions.csv (the same
    probabilities unclipped, one row per image: what --ensemble averages)."""
    n_prior = len(pred.probs) - len(pred.scanned) + len(pred.failed)
    if n_prior:
        log(f"{n_prior} unreadable test images are predicted with the training prior")
    sample = data_dir / "stage_2_sample_submission.csv"
    if rt.dist.main:
        rows = write_checked_submission(pred.probs, sample, out_dir)
    else:  # every rank checks it, so that a bad submission stops them all
        rows = len(build_submission(sample, pred.probs.index.tolist(), pred.probs.to_numpy()))
    log(f"Submission: {out_dir / rundir.SUBMISSION} ({rows} rows, checked against the sample)")
    return {"n_test": len(pred.probs), "n_test_predicted_with_prior": n_prior}


# %% The whole run, stages 1 to 7, then metrics.json and the report.

def load_data(cfg: Config, out_dir: Path, data_dir: Path, d: Dist) -> dict:
    """Labels, test IDs and both header tables (with slice order where it is used)."""
    if cfg.scans:
        return repository_tool("own_labels", "--scans").load_scans(cfg.scans, cfg.labels, cfg.workers, out_dir, d.main)
    labels = load_labels(data_dir, out_dir, d)
    test_ids = list(read_sample_submission(data_dir / "stage_2_sample_submission.csv").image_ids)
    headers = scan_data(data_dir, {"train": list(labels.index), "test": test_ids}, cfg, out_dir, d)
    train_headers, test_headers = headers["train"], headers["test"]
    if cfg.context or cfg.refine:
        train_headers = add_slice_order(train_headers, "train")
        test_headers = add_slice_order(test_headers, "test")
    return {"labels": labels, "test_ids": test_ids, "train_headers": train_headers,
            "test_headers": test_headers, "data_dir": data_dir, "fingerprint": data_fingerprint(data_dir)}


def run_pipeline(cfg: Config, rt: Runtime, out_dir: Path, data_dir: Path, started: float) -> None:
    """One training run on the --val-frac split (or --fold i of --folds K)."""
    d, data = rt.dist, load_data(cfg, out_dir, data_dir, rt.dist)
    usable, folds = make_split(data["labels"], data["train_headers"], cfg, out_dir, d)
    val = folds == validation_fold(cfg)
    train_df, val_df = usable.loc[~val], usable.loc[val]
    model, val_probs, best_epoch = train(cfg, train_df, val_df, data["train_headers"], out_dir, rt,
                                         data.get("series_labels"))
    if d.enabled:
        digest = hashlib.sha1(b"".join(v.cpu().numpy().tobytes() for v in model.state_dict().values()))
        print(f"rank {d.rank} of {d.world}: final weights sha1 {digest.hexdigest()}", flush=True)
    prior = training_prior(cfg.weights, train_df)
    metrics = {**evaluate(val_df, val_probs, prior, "validation"), "n_train": len(train_df), "best_epoch": best_epoch}
    pred = (predict_test(model, cfg, data["test_ids"], data["test_headers"], prior, out_dir, rt, embed=cfg.refine)
            if data["test_ids"] else None)
    features = keep_features(model, cfg, val_df, data["train_headers"], pred, out_dir, rt) if cfg.refine else None
    finish(cfg, rt, out_dir, data, rundir.predictions_table(val_df, val_probs), metrics, pred, started, features)


def keep_features(model, cfg: Config, val_df: pd.DataFrame, headers: pd.DataFrame, pred: TestPredictions | None,
                  out_dir: Path, rt: Runtime) -> np.ndarray:
    """--refine: the best model's pooled features of the validation images (with the test
    predictions' flips), saved with those of the test images (``pred``) in OUT/embeddings/
    for the embedding refiner. One more pass over the validation images, about 1 % of the
    training's time at 3 epochs."""
    features = predict(model, headers.loc[val_df.index], cfg, rt, "validation features", tta=cfg.tta,
                       embed=True).features
    if rt.dist.main:
        embeddings.save(out_dir, rundir.VAL_SPLIT, val_df.index, features)
        if pred is not None:
            embeddings.save(out_dir, rundir.TEST_SPLIT, pred.scanned, pred.features)
    return features


# %% The fold loop (--folds K --fold all): every fold in turn, out of fold, one submission.

@dataclass
class FoldResult:
    val: pd.DataFrame   # the fold's validation images: labels and pred_* columns
    test: pd.DataFrame | None  # its per-slice probabilities of every test image (None: no test set)


def run_fold(cfg: Config, i: int, data: dict, usable: pd.DataFrame, folds: np.ndarray,
             out_dir: Path, rt: Runtime) -> FoldResult:
    """Fold i as a complete run in OUT/fold_<i>/ (checkpoints, history, metrics, submission),
    through the same train() as a single run. A finished fold is read back, not retrained."""
    fold_dir = rundir.fold_dir(out_dir, i)
    if (fold_dir / rundir.METRICS).is_file() and not cfg.overwrite:
        log(f"Fold {i}: finished earlier in {fold_dir}; not retrained (--overwrite would)")
        return read_fold(fold_dir)
    resume = cfg.resume and rundir.checkpoint(fold_dir, rundir.LAST).is_file()
    fold_cfg = dataclasses.replace(cfg, fold=i, out_dir=str(fold_dir), refine=False, resume=resume)
    log(f"Fold {i} of {cfg.folds}: {fold_dir}{' (resuming)' if resume else ''}")
    if rt.dist.main:
        (fold_dir / rundir.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        write_json(fold_dir / rundir.CONFIG, {**dataclasses.asdict(fold_cfg), "environment": environment()})
        rundir.copy_file(out_dir / rundir.BAD_FILES, fold_dir / rundir.BAD_FILES)
    barrier(rt.dist)
    val = folds == i
    train_df, val_df = usable.loc[~val], usable.loc[val]
    model, val_probs, best_epoch = train(fold_cfg, train_df, val_df, data["train_headers"], fold_dir, rt,
                                         data.get("series_labels"))
    prior = training_prior(cfg.weights, train_df)
    pred = predict_test(model, fold_cfg, data["test_ids"], data["test_headers"], prior, fold_dir, rt,
                        embed=cfg.refine) if data["test_ids"] else None
    if cfg.refine:  # for the embedding refiner of the whole run, fitted out of fold
        keep_features(model, fold_cfg, val_df, data["train_headers"], pred, fold_dir, rt)
    test_metrics = submit(pred, data["data_dir"], fold_dir, rt) if pred else {}
    if rt.dist.main:
        write_csv(fold_dir / rundir.VAL_PREDICTIONS, rundir.predictions_table(val_df, val_probs))
        metrics = {**evaluate(val_df, val_probs, prior, "validation"), "n_train": len(train_df), **test_metrics,
                   "best_epoch": best_epoch, "data": data["fingerprint"]}
        write_json(fold_dir / rundir.METRICS, metrics)  # last: it marks the fold finished
    barrier(rt.dist)
    return read_fold(fold_dir)


def read_fold(fold_dir: Path) -> FoldResult:
    """A finished fold's predictions as its files hold them, so that a fold trained now and
    one read back after a restart give the same numbers to what follows."""
    test = fold_dir / rundir.TEST_PREDICTIONS
    return FoldResult(rundir.read_predictions(fold_dir / rundir.VAL_PREDICTIONS),
                      rundir.read_predictions(test) if test.is_file() else None)


def run_folds(cfg: Config, rt: Runtime, out_dir: Path, data_dir: Path, started: float) -> None:
    """--folds K --fold all: K complete runs, then the out-of-fold predictions of every
    labelled image, the folds' average on the test set, with --refine the refiner fitted on
    all of the out-of-fold predictions, and one submission."""
    data = load_data(cfg, out_dir, data_dir, rt.dist)
    usable, folds = make_split(data["labels"], data["train_headers"], cfg, out_dir, rt.dist)
    results = [run_fold(cfg, i, data, usable, folds, out_dir, rt) for i in range(cfg.folds)]
    oof = assemble_oof({i: r.val for i, r in enumerate(results)})
    metrics = evaluate(oof[list(LABELS)], oof[PRED_COLUMNS].to_numpy(), training_prior(cfg.weights, usable), "out_of_fold")
    metrics["weighted_log_loss_per_fold"] = {
        int(f): weighted_log_loss(g[list(LABELS)].to_numpy(), g[PRED_COLUMNS].to_numpy()) for f, g in oof.groupby("fold")}
    folders = [rundir.fold_dir(out_dir, i) for i in range(cfg.folds)]
    features = embeddings.load(folders, rundir.VAL_SPLIT, oof.index) if cfg.refine else None
    pred = None
    if data["test_ids"]:
        scanned, failed = scanned_and_failed(out_dir, data["test_ids"], data["test_headers"])
        members = [TestPredictions(r.test, scanned, failed,
                                   embeddings.load([f], rundir.TEST_SPLIT, scanned) if features is not None else None)
                   for f, r in zip(folders, results)]
        if any(m.features is None for m in members):
            features = None  # the embedding refiner needs every fold's test features too
        pred = TestPredictions(average([r.test for r in results]), scanned, failed, members=members)
    finish(cfg, rt, out_dir, data, oof, {**metrics, "folds": cfg.folds}, pred, started, features)


def finish(cfg: Config, rt: Runtime, out_dir: Path, data: dict, table: pd.DataFrame, metrics: dict,
           pred: TestPredictions, started: float, features=None) -> None:
    """A single or fold run's end: refine and calibrate on its validation (or out-of-fold)
    ``table`` (and its rows' ``features`` where kept), both applied to the test predictions,
    the submission, the predictions table, metrics.json (last: it marks the run finished)
    and the report."""
    refiner, calibration, table = refine_and_calibrate(cfg, table, data["train_headers"], metrics, out_dir, rt.dist,
                                                       features, rt.device)
    if pred is not None:  # a test set to submit (--scans has none)
        pred = refine_test(refiner, pred, data["test_headers"]) if refiner is not None else pred
        metrics.update(submit(calibrate_test(calibration, pred), data["data_dir"], out_dir, rt))
    if rt.dist.main:
        if refiner is not None:
            with writing(out_dir / rundir.REFINER):
                save_refiner(refiner, out_dir / rundir.REFINER)
        folds = cfg.fold == FOLD_ALL
        write_csv(out_dir / (rundir.OOF_PREDICTIONS if folds else rundir.VAL_PREDICTIONS), table)
        if folds:
            rundir.merge_bad_files(out_dir)
        metrics.update(n_bad_files=len(pd.read_csv(out_dir / rundir.BAD_FILES)), processes=rt.dist.world,
                       data=data["fingerprint"], seconds=round(time.perf_counter() - started, 1))
        write_json(out_dir / rundir.METRICS, metrics)
        # its label chart counts positives: an unknown label (a site's CSV) is no positive
        write_run_report(out_dir, data["labels"].fillna(0), [data["train_headers"], data["test_headers"]], cfg.windows)
        log(f"Done in {metrics['seconds']:.0f}s: outputs in {out_dir}")


# %% Run: main() dispatches; the other ways in live in utils, imported when chosen.

def predict_only(cfg: Config, rt: Runtime, out_dir: Path, data_dir: Path, checkpoint: str) -> dict:
    """--predict-only --checkpoint PATH: a submission from what a run saved (predict_saved)."""
    test_ids = list(read_sample_submission(data_dir / "stage_2_sample_submission.csv").image_ids)
    test_headers = scan_data(data_dir, {"test": test_ids}, cfg, out_dir, rt.dist)["test"]
    data = {"test_ids": test_ids, "test_headers": add_slice_order(test_headers, "test")}
    return submit(predict_saved(Path(checkpoint), cfg, rt, data, out_dir), data_dir, out_dir, rt)


def repository_tool(module: str, option: str):
    """A utils module the exported notebook leaves out (see utils.export), imported when chosen."""
    try:
        return importlib.import_module(f"utils.{module}")
    except ModuleNotFoundError as err:
        if err.name != f"utils.{module}":
            raise
        raise UserError(f"{option} runs from the repository's kernel.py, beside utils/") from None


def other_mode(cfg: Config, modes: dict) -> int | None:
    """--check-submission, --export-kaggle, --report or --ensemble, when one was given."""
    if modes["check_submission"] is not None:
        data_dir = Path(cfg.data_dir) if cfg.data_dir else find_kaggle_data()
        return check_submission_command(modes["check_submission"], data_dir)
    if modes["export_kaggle"] is not None:
        return repository_tool("export", "--export-kaggle").export_command(
            modes["export_kaggle"], modes["kaggle_id"], modes["kaggle_weights_dataset"], bool(modes["with_wheels"]))
    if modes["report"]:
        data_dir = cfg.data_dir or find_kaggle_data()
        return report_command(cfg.out_dir, data_dir and str(data_dir), cfg.windows, cfg.workers, cfg.header_cache)
    if modes["ensemble"]:
        return run_ensemble(modes["ensemble"], modes["ensemble_weights"], cfg.out_dir, cfg.data_dir, cfg.overwrite)
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    cfg, modes = parse_args(argv)
    code = other_mode(cfg, modes)
    if code is not None:
        return code
    processes = plan_processes(cfg.processes, torch.cuda.device_count(), under_torchrun())
    if processes > 1:
        log(f"Starting {processes} processes under torchrun ({torch.cuda.device_count()} GPUs here)")
        return launch(globals().get("__file__"), argv, processes)  # a notebook: its cells make the script
    d = init_distributed()
    log_to_stdout("kernel", "utils", quiet=not d.main)
    if cfg.processes not in (None, d.world):
        raise UserError(f"--processes {cfg.processes} under torchrun with {d.world} processes: "
                        f"torchrun's --nproc_per_node decides; leave --processes out")
    cfg = dataclasses.replace(cfg, processes=d.world)
    started = time.perf_counter()
    try:
        rt = setup_runtime(d, cfg.precision, cfg.compile)
    except RuntimeChoiceError as err:
        raise UserError(str(err)) from None
    if modes["evaluate"] is not None:
        return repository_tool("own_labels", "--evaluate DIR").evaluate_folder(
            cfg, rt, started, modes["evaluate"], modes["checkpoint"], modes["threshold"])
    if modes["predict"] is not None:
        return repository_tool("own_scans", "--predict DIR").predict_folder(
            cfg, rt, started, modes["predict"], modes["checkpoint"], modes["threshold"])
    return run_in_out_dir(cfg, rt, started, modes["checkpoint"] if modes["predict_only"] else None)


def run_in_out_dir(cfg: Config, rt: Runtime, started: float, predict_from: str | None) -> int:
    """A training run, or --predict-only from the checkpoint ``predict_from``, in its
    out-dir, which rank 0 holds until the end."""
    d = rt.dist
    with contextlib.ExitStack() as held:
        out_dir = share(d, prepare_out_dir(cfg, held) if d.main else None)
        data_dir = share(d, resolve_data_dir(cfg, out_dir) if d.main else None)
        cfg = dataclasses.replace(cfg, data_dir=str(data_dir), out_dir=str(out_dir))
        if cfg.resume and not predict_from:  # refused before anything of the run is rewritten
            Checkpoints(out_dir / rundir.CHECKPOINTS, dataclasses.asdict(cfg)).resumable()
        if d.main:
            mode = {"predict_only": True, "checkpoint": predict_from} if predict_from else {}
            write_json(out_dir / rundir.CONFIG, {**dataclasses.asdict(cfg), **mode, "environment": environment()})
        log(f"Run: {out_dir} (data: {data_dir}{', synthetic demo' if cfg.demo else ''}"
            f"{f', {d.world} processes' if d.enabled else ''})")
        if predict_from:
            predict_only(cfg, rt, out_dir, data_dir, predict_from)
            log(f"Done in {time.perf_counter() - started:.0f}s: {out_dir / rundir.SUBMISSION}")
        elif cfg.fold == FOLD_ALL:
            run_folds(cfg, rt, out_dir, data_dir, started)
        else:
            run_pipeline(cfg, rt, out_dir, data_dir, started)
        barrier(d)
        return 0


def cli(argv=None) -> int:
    """main() with a user's mistake as one message and an exit code, not a traceback."""
    try:
        return main(argv)
    except (UserError, LabelError, SubmissionError, CheckpointMismatch) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingStopped as err:
        print(f"stopped: {err}", file=sys.stderr)
        return EXIT_STOPPED
    except OutputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_OUTPUT
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli())
