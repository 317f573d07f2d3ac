"""Prediction with a model: a trained one in the run, or one a run saved.

    model, trained, prior = load_model(path, rt)       # a best.pt on rt's device
    probs, ok, _ = predict(model, rows, cfg, rt, "test")  # (n, 6) and a readable flag per row
    pred = predict_saved(path, cfg, rt, data, out)     # a run's submission, made again

``cfg`` is kernel.py's Config (any dataclass with its fields); ``rows`` are header rows
with a path per image and, under --context, the paths of the slices below and above.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from utils import data as data_utils
from utils import rundir
from utils.calibration import apply_temperatures
from utils.dicom import parse_windows
from utils.engine import MODEL_SETTINGS, gather_rows, load_checkpoint
from utils.ensemble import average
from utils.errors import UserError
from utils.labels import LABELS
from utils.metrics import logit, prior_probabilities
from utils.model import build_model, pooled_features
from utils.refiner import RefinerResult, load_refiner, refine
from utils.runtime import Runtime

LOG = logging.getLogger(__name__)

# what a prediction with a saved model takes from the run that trained it
PREDICTION_SETTINGS = (*MODEL_SETTINGS, "tta")
FINE_TUNE_SETTINGS = tuple(k for k in MODEL_SETTINGS if k != "batch_size")  # what --weights RUN/best.pt fixes


def slice_dataset(rows: pd.DataFrame, cfg, labels=None, transform=None) -> data_utils.SliceDataset:
    """The dataset of these header rows, with neighbouring slices as channels under --context."""
    neighbours = rows[["below", "above"]].to_numpy() if cfg.context else None
    return data_utils.SliceDataset(rows["path"].tolist(), labels, parse_windows(cfg.windows),
                                   cfg.image_size, transform, seed=cfg.seed, neighbours=neighbours,
                                   neighbour_windows=cfg.context_windows, crop=cfg.crop)


def input_layout(cfg) -> tuple[int, int]:
    """(input channels, slices they are stacked from). --context alone puts the slices
    below, at and above in the place of the three windows: one slice's worth of channels."""
    windows = len(parse_windows(cfg.windows))
    if cfg.context_windows:
        return 3 * windows, 3
    return (3 if cfg.context else windows), 1


class Predicted(NamedTuple):
    """predict()'s answer: probabilities (n, 6), a readable flag per row and, when asked
    for, the pooled features (n, D) float16 (zero where unreadable)."""
    probs: np.ndarray
    ok: np.ndarray
    features: np.ndarray | None = None


def _forward(model, x: torch.Tensor, tta: bool, embed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits and, with ``embed``, pooled features; with ``tta`` each the mean over the
    image and its mirror (heads are near-symmetric left to right)."""
    views = [x, torch.flip(x, dims=[3])] if tta else [x]
    if not embed:
        return sum(model(v).float() for v in views) / len(views), None
    features = [pooled_features(model, v) for v in views]
    logits = sum(model.fc(f).float() for f in features) / len(views)
    return logits, sum(f.float() for f in features) / len(views)


@torch.no_grad()
def predict(model, rows: pd.DataFrame, cfg, rt: Runtime, desc: str, tta: bool = False,
            embed: bool = False) -> Predicted:
    """Probabilities (n, 6) and a readable flag per header row, and with ``embed`` the
    features; each rank predicts a share. The results stay on the device until the end:
    no wait for the GPU per batch."""
    ds = slice_dataset(rows, cfg)
    mine = np.arange(len(ds))[rt.dist.rank::rt.dist.world]
    loader = data_utils.make_loader(torch.utils.data.Subset(ds, mine), cfg.batch_size * 2,
                                    workers=cfg.workers)
    model.eval()
    slices = input_layout(cfg)[1]
    index_parts, prob_parts, ok_parts, feature_parts = [], [], [], []
    for images, _, index, ok in tqdm(loader, desc=desc, leave=False, mininterval=2,
                                     disable=not rt.dist.main):
        x = data_utils.to_device_normalized(images, rt.device, slices)
        with rt.autocast():
            logits, features = _forward(model, x, tta, embed)
        index_parts.append(index.numpy())
        prob_parts.append(torch.sigmoid(logits))
        ok_parts.append(ok.numpy())
        if embed:
            feature_parts.append(features.to(torch.float16))
    index = np.concatenate(index_parts) if index_parts else np.zeros(0, np.int64)
    probs = (torch.cat(prob_parts).cpu().numpy() if prob_parts
             else np.zeros((0, len(LABELS)), np.float32))
    ok = gather_rows(rt.dist, index, np.concatenate(ok_parts) if ok_parts else np.zeros(0, bool),
                     len(ds), fill=False)
    features = None
    if embed:
        width = model.fc.in_features
        mine_features = (torch.cat(feature_parts).cpu().numpy() if feature_parts
                         else np.zeros((0, width), np.float16))
        features = gather_rows(rt.dist, index, mine_features, len(ds))
        features[~ok] = 0
    return Predicted(gather_rows(rt.dist, index, probs, len(ds)), ok, features)


def load_model(path: Path, rt: Runtime) -> tuple[torch.nn.Module, dict, np.ndarray]:
    """A checkpoint's model on the device, the settings it was trained with, its prior."""
    try:
        state = load_checkpoint(path)
        model = build_model(state["config"]["arch"], in_channels=state["model"]["conv1.weight"].shape[1])
        model.load_state_dict(state["model"])
    except Exception as err:  # unpickling refusals and bad contents come in many types
        raise UserError(f"{path}: not a checkpoint of this pipeline "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    return model.to(rt.device).to(memory_format=torch.channels_last), state["config"], state["prior"].numpy()


def run_checkpoint(path) -> dict | None:
    """The checkpoint of a run of this pipeline at ``path`` (weights, settings, prior), or
    None for anything else: no path, plain backbone weights, a file that does not load."""
    if not path or not Path(path).is_file():
        return None
    try:  # mapped, not read: plain backbone weights (350 MB for ResNeXt-101) are asked about too
        state = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not ours; utils.model's loader says what is wrong with it
        return None
    return state if isinstance(state, dict) and {"model", "config", "prior"} <= set(state) else None


def fine_tuning_settings(cfg, given: dict) -> tuple[object, list[str]]:
    """--weights a run's checkpoint: fine-tune its model. The settings that shape the model
    and its input (arch, windows, image size, context, crop) are the checkpoint's; one given
    otherwise is a problem, in the words of the options."""
    state = run_checkpoint(cfg.weights)
    if state is None:
        return cfg, []
    trained = {k: state["config"][k] for k in FINE_TUNE_SETTINGS if k in state["config"]}
    clash = [k for k, v in trained.items() if k in given and given[k] != v]
    problems = [f"--weights {cfg.weights} is the checkpoint of a run made with "
                + ", ".join(f"--{k.replace('_', '-')} {trained[k]}" for k in clash)
                + "; fine-tuning keeps the model's settings: leave those options out"] if clash else []
    return dataclasses.replace(cfg, **trained), problems


def training_prior(weights: str | None, train_df: pd.DataFrame) -> np.ndarray:
    """The labels' frequencies in training: an unreadable image's prediction. A class no
    training label knows (a site's CSV without it) takes the fine-tuned checkpoint's prior."""
    start = run_checkpoint(weights) if train_df.isna().all().any() else None
    try:
        return prior_probabilities(train_df.to_numpy(), fallback=None if start is None else start["prior"].numpy())
    except ValueError as err:
        raise UserError(f"{err}; a class unknown in every training label needs a run's checkpoint to fine-tune "
                        f"(--weights RUN/checkpoints/best.pt), whose prior it keeps") from None


def trained_settings(cfg, trained: dict):
    """``cfg`` with the settings the checkpoint was trained with (its config.json's)."""
    return dataclasses.replace(cfg, **{k: trained.get(k, getattr(type(cfg), k)) for k in PREDICTION_SETTINGS})


@dataclass
class TestPredictions:
    """Probabilities of every test image, in the sample's order; ``scanned`` are the images
    whose header was read (refinement runs along their series), ``failed`` those among them
    whose pixels could not be decoded. Unread images hold the training prior.
    ``features`` (len(scanned), D), when kept, are the model's pooled features of the
    scanned images; ``members`` are the predictions ``probs`` averages, one per model, each
    with its features (the embedding refiner runs on each model's own, then averages)."""
    probs: pd.DataFrame
    scanned: list[str]
    failed: list[str]
    features: np.ndarray | None = None
    members: list[TestPredictions] = dataclasses.field(default_factory=list)


def predict_test(model, cfg, test_ids: list[str], test_headers: pd.DataFrame, prior: np.ndarray,
                 out_dir: Path, rt: Runtime, embed: bool = False) -> TestPredictions:
    scanned = [i for i in test_ids if i in test_headers.index]
    probs, ok, features = predict(model, test_headers.loc[scanned], cfg, rt, "predict test", tta=cfg.tta,
                                  embed=embed)
    failed = [i for i, good in zip(scanned, ok) if not good]
    if failed and rt.dist.main:
        rundir.record_bad_files(out_dir, test_headers.loc[failed, "path"],
                                "pixel data could not be decoded; prior predicted")
    table = pd.DataFrame(np.tile(prior, (len(test_ids), 1)), columns=list(LABELS),
                         index=pd.Index(test_ids, name="image_id"))
    table.loc[scanned] = np.where(ok[:, None], probs, prior)
    return TestPredictions(table, scanned, failed, features)


def refine_test(refiner: RefinerResult, pred: TestPredictions, test_headers: pd.DataFrame) -> TestPredictions:
    """The refiner along each test series; an unreadable slice keeps what it had (the
    prior), and its neighbours are refined with that in its place. A logit refiner reads
    the averaged probabilities; an embedding refiner each member's probabilities with its
    features (a single model: ``pred`` itself), and the refined members are averaged."""
    rows = test_headers.loc[pred.scanned]
    series, position = rows["series"].to_numpy(), rows["position"].to_numpy()
    probs = pred.probs.copy()
    kept = probs.loc[pred.failed].copy()
    if refiner.kind == "logits":
        refined = refine(refiner, logit(probs.loc[pred.scanned].to_numpy()), series, position)
    else:
        members = pred.members or [pred]
        if any(m.features is None or m.scanned != pred.scanned for m in members):
            raise ValueError("the embedding refiner needs each model's features of the scanned test images")
        refined = np.mean([refine(refiner, logit(m.probs.loc[pred.scanned].to_numpy()), series, position,
                                  m.features) for m in members], axis=0)
    probs.loc[pred.scanned] = refined
    probs.loc[pred.failed] = kept
    return dataclasses.replace(pred, probs=probs)


def calibrate_test(decision: dict | None, pred: TestPredictions) -> TestPredictions:
    """The test predictions scaled by the fitted temperatures, where calibration is used;
    images predicted with the prior keep it."""
    if not decision or not decision["use"]:
        return pred
    probs, failed = pred.probs.copy(), set(pred.failed)
    read = [i for i in pred.scanned if i not in failed]
    probs.loc[read] = apply_temperatures(probs.loc[read].to_numpy(), np.asarray(decision["temperatures"]))
    return dataclasses.replace(pred, probs=probs)


def predict_saved(path: Path, cfg, rt: Runtime, data: dict, out_dir: Path, embed: bool = False) -> TestPredictions:
    """Test predictions re-made from what a run saved (``data``: test_ids, test_headers).
    A best.pt alone: that model (with ``embed``, its features too). A run folder: its model,
    or each fold's averaged, then its refiner and calibration; an ensemble folder: its runs,
    averaged with its weights."""
    what = rundir.kind(path)
    if what == "checkpoint":
        model, trained, prior = load_model(path, rt)
        run_cfg = trained_settings(cfg, trained)
        LOG.info(f"Predicting with {path} ({run_cfg.arch}, {run_cfg.image_size}px, windows {run_cfg.windows})")
        return predict_test(model, run_cfg, data["test_ids"], data["test_headers"], prior, out_dir, rt, embed)
    if what == "ensemble":
        runs, weights = rundir.ensemble_runs(path)
        parts = [predict_saved(run, cfg, rt, data, out_dir) for run in runs]
        return dataclasses.replace(parts[0], probs=average([p.probs for p in parts], weights))
    refiner = load_refiner(path / rundir.REFINER) if (path / rundir.REFINER).is_file() else None
    embed = refiner is not None and refiner.kind == "embeddings"
    parts = [predict_saved(c, cfg, rt, data, out_dir, embed) for c in rundir.model_checkpoints(path)]
    pred = TestPredictions(average([p.probs for p in parts]), parts[0].scanned, parts[0].failed, members=parts)
    if refiner is not None:
        pred = refine_test(refiner, pred, data["test_headers"])
    if (path / rundir.CALIBRATION).is_file():
        pred = calibrate_test(rundir.read_json(path / rundir.CALIBRATION), pred)
    return pred


def scanned_and_failed(out_dir: Path, test_ids: list[str], test_headers: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Which test images had a readable header, and which of those failed to decode."""
    scanned = [i for i in test_ids if i in test_headers.index]
    bad = rundir.bad_paths(rundir.fold_dirs(out_dir))
    paths = test_headers["path"].astype(str)
    return scanned, [i for i in scanned if paths[i] in bad]
