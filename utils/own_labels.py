"""Your own labelled scans: fine-tuning a run's model on them (kernel.py --scans DIR --labels
CSV --weights RUN/checkpoints/best.pt) and scoring a model on them (--evaluate DIR).

The folder and its label CSV become the slice table of utils/dataset.py, which the split,
the training loop, the refiner and calibration take as they take the Kaggle layout.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from utils import evaluation, rundir
from utils.calibration import calibration_summary
from utils.dataset import labelled_folder
from utils.engine import barrier
from utils.ensemble import file_sha1
from utils.inference import predict_saved
from utils.labels import LABELS
from utils.metrics import per_class_log_loss, weighted_log_loss
from utils.own_scans import folder_tool_dir, heatmaps
from utils.runtime import environment

LOG = logging.getLogger(__name__)


def load_scans(scans: str, labels: str, workers: int, out_dir: Path, main: bool) -> dict:
    """kernel.load_data's answer for --scans DIR --labels CSV: the folder's labelled slices
    as the training set, scanned as --predict scans; no test set, so no submission. What
    was skipped goes to bad_files.csv (rank 0, ``main``)."""
    data = labelled_folder(scans, labels, workers=workers)
    LOG.info(f"Scans {scans}: {data.scan.summary()}")
    LOG.info(f"Labels {labels}: {data.describe()}")
    if main:
        rundir.write_csv(out_dir / rundir.BAD_FILES, data.scan.skipped, index=False)
    return {"labels": data.labels, "test_ids": [], "train_headers": data.headers,
            "test_headers": data.headers.iloc[:0], "data_dir": Path(scans), "series_labels": data.series_labels,
            "fingerprint": {Path(labels).name: file_sha1(labels)}}


def evaluate_folder(cfg, rt, started: float, folder: str, checkpoint: str, threshold: float) -> int:
    """The whole of --evaluate DIR --labels CSV --checkpoint RUN: the checkpoint's predictions
    of the folder's labelled slices (as --predict makes them: its settings, refiner and
    calibration) scored against the labels, no training (utils/evaluation.py): metrics.json,
    slices.csv, series.csv, skipped.csv and report/evaluate.html. 0 when done."""
    d = rt.dist
    with contextlib.ExitStack() as held:
        out_dir = folder_tool_dir(cfg, rt, held, "evaluate", folder)
        asked = {"evaluate": folder, "labels": cfg.labels, "checkpoint": checkpoint, "threshold": threshold}
        if d.main:
            rundir.write_json(out_dir / rundir.CONFIG, {**dataclasses.asdict(cfg), **asked, "environment": environment()})
            rundir.write_csv(out_dir / rundir.BAD_FILES, pd.DataFrame(columns=["path", "reason"]), index=False)
        barrier(d)
        data = labelled_folder(folder, cfg.labels, workers=cfg.workers)
        LOG.info(f"Scanned {folder}: {data.scan.summary()}")
        LOG.info(f"Labels {cfg.labels}: {data.describe()}")
        rows = data.headers
        pred = predict_saved(Path(checkpoint), cfg, rt, {"test_ids": list(rows.index), "test_headers": rows}, out_dir)
        keep = ~rows.index.isin(pred.failed)  # undecodable: in skipped.csv, not scored
        slices = evaluation.slice_frame(rows.index[keep], data.labels[keep].to_numpy(),
                                        pred.probs.loc[rows.index[keep]].to_numpy(), rows["series"][keep].to_numpy(),
                                        rows["patient_id"][keep].to_numpy())
        series_labels = data.series_labels[data.series_labels.index.isin(slices["series"])]  # some decoded
        summary = evaluation.evaluate(slices, series_labels, threshold=threshold,
                                      validation=_run_validation(Path(checkpoint)), seed=cfg.seed)
        if d.main:
            skipped = pd.concat([data.scan.skipped, pd.DataFrame({"path": pred.failed, "reason": "pixel data could "
                                                                  "not be decoded"})], ignore_index=True)
            write_evaluation(cfg, rt, out_dir, slices, dataclasses.replace(data, series_labels=series_labels),
                             summary, skipped, asked)
            rundir.write_json(out_dir / rundir.METRICS, {**run_metrics(slices), **summary, **asked,
                                                         "seconds": round(time.perf_counter() - started, 1)})
        LOG.info(f"Evaluated {summary['counts']['slices']} slices of {summary['counts']['patients']} patients in "
                 f"{time.perf_counter() - started:.0f}s: {out_dir / rundir.METRICS}, "
                 f"{out_dir / rundir.REPORT / rundir.EVALUATE_HTML}")
        barrier(d)
        return 0


def run_metrics(slices: pd.DataFrame) -> dict:
    """The keys every run's metrics.json has (rundir.METRIC_KEYS), of the slices scored:
    the weighted log loss over the known labels, per class, and the calibration errors."""
    y, p = slices[list(LABELS)].to_numpy(), slices[rundir.PRED_COLUMNS].to_numpy()
    labelled = ~np.isnan(y).all(axis=1)
    return {"validated_on": "site", "n_validation": int(labelled.sum()), "weighted_log_loss": weighted_log_loss(y, p),
            "log_loss_per_class": per_class_log_loss(y, p), **calibration_summary(y, p)}


def _run_validation(checkpoint: Path) -> pd.DataFrame | None:
    """The validation (or out-of-fold) predictions of the run a checkpoint belongs to, for
    the threshold that run would choose; None for a lone best.pt."""
    run = checkpoint if checkpoint.is_dir() else checkpoint.parent.parent
    try:
        validation = rundir.validation_predictions(run)
    except (OSError, ValueError, KeyError) as err:
        LOG.info(f"No validation predictions in {run} ({type(err).__name__}): the second threshold is not chosen")
        return None
    if set(validation["any"].dropna()) != {0, 1}:  # a run on series-level labels may know no slice's `any`
        LOG.info(f"The validation of {run} lacks slices known to be `any` 0 and 1: the second threshold is not chosen")
        return None
    return validation


def write_evaluation(cfg, rt, out_dir: Path, slices: pd.DataFrame, data, summary: dict, skipped: pd.DataFrame,
                     asked: dict) -> None:
    """slices.csv, series.csv, skipped.csv and evaluate.html, with the heatmaps of the most
    wrong slices and of the slice that gave each most wrong series its maximum."""
    series = evaluation.series_frame(slices, data.series_labels)
    rundir.write_csv(out_dir / rundir.SLICES, slices.drop(columns="patient"))
    rundir.write_csv(out_dir / rundir.SERIES, series.drop(columns="patient"))
    rundir.write_csv(out_dir / rundir.SKIPPED, skipped, index=False)
    (out_dir / rundir.BAD_FILES).unlink()  # its rows are in skipped.csv
    worst, worst_series = evaluation.worst_slices(slices), evaluation.worst_series(series)
    # each shown slice's map is of the class it got most wrong (a series': at its maximum)
    shown = dict(zip(worst_series["at"], worst_series["worst_class"])) | dict(zip(worst.index, worst["worst_class"]))
    probs = slices[rundir.PRED_COLUMNS].set_axis(list(LABELS), axis=1)
    maps = heatmaps(Path(asked["checkpoint"]), cfg, rt, data.headers.loc[list(shown)], probs,
                    [LABELS.index(c) for c in shown.values()]) if shown else {}
    notes = [f"{asked['evaluate']}: {data.scan.summary()}", f"Labels: {asked['labels']}: {data.describe()}",
             f"Model: {asked['checkpoint']}; heatmaps (Grad-CAM) of the class each slice or series got most wrong"]
    evaluation.write_evaluate_html(out_dir / rundir.REPORT / rundir.EVALUATE_HTML, summary, worst, worst_series,
                                   maps, notes)
