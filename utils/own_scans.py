"""kernel.py --predict DIR --checkpoint PATH: a trained model on a folder of your own scans.

Every axial CT slice under DIR (found by content, grouped by study and series, ordered along
the slice normal: utils/scans.py) is predicted with the checkpoint's own settings, refiner
and calibration (utils/inference.py); the results are one row per slice (slices.csv) and
per series (series.csv), what is not a CT slice is listed in skipped.csv, and predict.html
shows each series with the Grad-CAM heatmaps of its most probable slices.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from utils import data as data_utils
from utils import rundir
from utils.dicom import BRAIN
from utils.engine import barrier, share
from utils.errors import UserError
from utils.gradcam import grad_cam, overlay
from utils.inference import input_layout, load_model, predict_saved, slice_dataset, trained_settings
from utils.labels import LABELS, SUBTYPES
from utils.runtime import Runtime, environment
from utils.scans import scan_folder
from utils.sources import read_windowed
from utils.series_results import series_table, top_slices, write_predict_html

LOG = logging.getLogger(__name__)
HEATMAPS_PER_SERIES = 3


def heatmaps(path: Path, cfg, rt: Runtime, rows: pd.DataFrame, probs: pd.DataFrame, classes=None) -> dict:
    """Grad-CAM of each row's class in ``classes`` (indices into LABELS; default: its most
    probable subtype), over its brain window: {key: (class, RGB image)}."""
    model, trained, _ = load_model(rundir.first_checkpoint(path), rt)
    run_cfg = trained_settings(cfg, trained)
    if classes is None:
        classes = probs.loc[rows.index, list(SUBTYPES)].to_numpy().argmax(axis=1)  # LABELS starts with them
    classes = np.asarray(classes)
    loader = data_utils.make_loader(slice_dataset(rows, run_cfg), cfg.batch_size, workers=0)
    slices = input_layout(run_cfg)[1]
    cams = [grad_cam(model.float(), data_utils.to_device_normalized(images, rt.device, slices), classes[index.numpy()])
            for images, _, index, _ in loader]
    out = {}
    for key, path_, cam, c in zip(rows.index, rows["path"], np.concatenate(cams), classes):
        gray = read_windowed(path_, (BRAIN,), run_cfg.image_size, crop=run_cfg.crop)[..., 0]
        out[key] = (LABELS[c], overlay(gray, cam))
    return out


def folder_tool_dir(cfg, rt: Runtime, held: contextlib.ExitStack, mode: str, folder: str) -> Path:
    """The outputs' folder of --predict or --evaluate (``mode``) on ``folder``: --out-dir, else
    runs/<mode>-<time>; held by rank 0 until ``held`` closes. A missing ``folder`` is an error."""
    if not Path(folder).is_dir():
        raise UserError(f"--{mode} {folder}: no such folder")
    out = Path(cfg.out_dir) if cfg.out_dir else Path("runs") / datetime.now().strftime(f"{mode}-%Y%m%d-%H%M%S")
    return share(rt.dist, rundir.prepare_predict_dir(out, held, cfg.overwrite) if rt.dist.main else None)


def predict_folder(cfg, rt: Runtime, started: float, folder: str, checkpoint: str, threshold: float) -> int:
    """The whole of --predict DIR: the scans in ``folder`` predicted with ``checkpoint``
    (series over ``threshold`` positive): tables, predict.html; 0 when done."""
    d = rt.dist
    with contextlib.ExitStack() as held:
        out_dir = folder_tool_dir(cfg, rt, held, "predict", folder)
        if d.main:
            rundir.write_json(out_dir / rundir.CONFIG, {**dataclasses.asdict(cfg), "predict": folder, "checkpoint": checkpoint,
                                                        "threshold": threshold, "environment": environment()})
        scan = scan_folder(folder, workers=cfg.workers)
        LOG.info(f"Scanned {folder}: {scan.summary()}")
        if scan.slices.empty:
            if d.main:
                rundir.write_csv(out_dir / rundir.SKIPPED, scan.skipped, index=False)
            raise UserError(f"{folder}: no CT slice to predict ({scan.summary()}); see {out_dir / rundir.SKIPPED}")
        rows = scan.model_rows().assign(series=scan.slices["series"], position=scan.slices["index"])
        rows.index = pd.Index(scan.slices["path"], name="image_id")
        if d.main:  # where predict_test records what fails to decode
            rundir.write_csv(out_dir / rundir.BAD_FILES, pd.DataFrame(columns=["path", "reason"]), index=False)
        barrier(d)
        pred = predict_saved(Path(checkpoint), cfg, rt, {"test_ids": list(rows.index), "test_headers": rows},
                             out_dir)
        slices = scan.slices.set_index("path", drop=False).drop(index=pred.failed)
        slices = slices.drop(columns=["prev_path", "next_path", "series"]).join(pred.probs)
        series = series_table(slices, threshold)
        if d.main:
            undecodable = pd.DataFrame({"path": pred.failed, "reason": "pixel data could not be decoded"})
            write_outputs(cfg, rt, out_dir, scan, rows, pred.probs, slices, series, undecodable,
                          {"folder": folder, "checkpoint": checkpoint, "threshold": threshold})
        LOG.info(f"Predicted {len(slices)} slices in {len(series)} series "
                 f"({int((series['flag'] == 'positive').sum())} positive at {threshold:g}) in "
                 f"{time.perf_counter() - started:.0f}s: {out_dir / rundir.SERIES}, {out_dir / rundir.SLICES}, "
                 f"{out_dir / rundir.REPORT / rundir.PREDICT_HTML}")
        barrier(d)
        return 0


def write_outputs(cfg, rt: Runtime, out_dir: Path, scan, rows: pd.DataFrame, probs: pd.DataFrame,
                  slices: pd.DataFrame, series: pd.DataFrame, undecodable: pd.DataFrame, asked: dict) -> None:
    """slices.csv, series.csv, skipped.csv (the scan's and the undecodable) and predict.html;
    ``asked``: the folder, checkpoint and threshold of the command."""
    folder, checkpoint, threshold = asked["folder"], asked["checkpoint"], asked["threshold"]
    rundir.write_csv(out_dir / rundir.SLICES, slices, index=False)
    rundir.write_csv(out_dir / rundir.SERIES, series, index=False)
    rundir.write_csv(out_dir / rundir.SKIPPED, pd.concat([scan.skipped, undecodable], ignore_index=True), index=False)
    (out_dir / rundir.BAD_FILES).unlink()  # its rows are in skipped.csv
    top = top_slices(slices, series, HEATMAPS_PER_SERIES)
    maps = heatmaps(Path(checkpoint), cfg, rt, rows.loc[top["path"]], probs) if len(top) else {}
    notes = [f"{folder}: {scan.summary()}", f"Model: {checkpoint}; heatmaps (Grad-CAM) from "
             f"{rundir.first_checkpoint(Path(checkpoint))}, of the most probable subtype"]
    write_predict_html(out_dir / rundir.REPORT / rundir.PREDICT_HTML, slices, series, maps,
                       threshold=threshold, notes=notes)
