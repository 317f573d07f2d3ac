"""A per-series refiner of per-slice logits: a residual 1-D convolution along z, fitted out of fold.

Every top-5 team of the competition gained ~0.006-0.008 weighted log loss by reading a
slice with its neighbours. Here the per-slice model's logits, placed by utils.slices'
order, are refined series by series:

    from utils.refiner import fit_refiner, refine
    result = fit_refiner(val_logits, val_labels, order.loc[ids, "series"],
                         order.loc[ids, "position"], groups)     # out-of-fold, by patient
    test_probs = refine(result, test_logits, test_series, test_position)

A convolution rather than a GRU because it is fast on CPU, sees a fixed window of slices
(hemorrhage spans a few neighbours, not the whole head) and, with its last layer
initialised to zero, is exactly the identity at step 0, so training starts from the
per-slice model's own answer. It is trained on the validation set's logits with
patient-grouped folds, so every validation row gets an out-of-fold refined probability
(an honest before/after score), and test rows get the mean of the fold models'
probabilities.
"""
from __future__ import annotations

import numbers
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from utils.atomic import atomic_write
from utils.engine import weighted_bce
from utils.labels import LABELS, format_examples
from utils.metrics import sigmoid, weighted_log_loss
from utils.split import fold_count, kfold_by_patient, sorted_codes

N_LABELS = len(LABELS)
HIDDEN = 32
KERNELS = (5, 3)  # a receptive field of 7 slices, about 3.5 cm at the usual 5 mm spacing
EPOCHS = 10
LR = 3e-3
WEIGHT_DECAY = 1e-4
BATCH_SERIES = 64
INFER_BATCH_SERIES = 512


class RefinerWarning(UserWarning):
    """The refiner had to change what it was asked for (fewer folds than requested)."""


# ------------------------------------------------------------------- flat <-> padded


class PackedSeries(NamedTuple):
    """Series side by side: `padded` (B, L, C) float32, `mask` (B, L) bool marking real
    slices (a prefix of each row), `index` (n, 2) int64: flat row i sits at
    padded[index[i, 0], index[i, 1]]. Series are in sorted key order, slices by position."""

    padded: torch.Tensor
    mask: torch.Tensor
    index: np.ndarray


def _check_series(series, position, n_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Series codes (0..S-1 in sorted key order), integer positions and the keys, validated."""
    keys = np.asarray(series)
    pos = np.asarray(position)
    for name, values in (("series", keys), ("position", pos)):
        if values.ndim != 1 or len(values) != n_rows:
            raise ValueError(f"{name} must be 1-D with {n_rows} rows, got shape {values.shape}")
    if n_rows and not np.issubdtype(pos.dtype, np.integer):
        raise ValueError(f"position must be integers, got dtype {pos.dtype}")
    codes, uniques = sorted_codes(keys, "series keys")
    return codes, pos.astype(np.int64), uniques


def pack_series(values, series, position) -> PackedSeries:
    """Rows (n, C) to padded series (B, L, C), ordered by position within each series.

    Positions need only be unique within a series: gaps close up (a dropped slice's
    neighbours become each other's), since the refiner sees slots, not millimetres.
    """
    array = np.asarray(values, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"values must be 2-D (rows x channels), got shape {array.shape}")
    if len(array) == 0:
        raise ValueError("values have no rows")
    codes, pos, _ = _check_series(series, position, len(array))
    rows = np.lexsort((pos, codes))
    sorted_codes = codes[rows]
    repeated = (sorted_codes[1:] == sorted_codes[:-1]) & (pos[rows][1:] == pos[rows][:-1])
    if repeated.any():
        first = int(rows[1:][repeated][0])
        raise ValueError(f"{int(repeated.sum())} rows repeat a position within their series "
                         f"(e.g. row {first}: series {np.asarray(series)[first]!r}, position {pos[first]})")
    n_in = np.bincount(codes)
    slot = np.empty(len(rows), dtype=np.int64)
    slot[rows] = np.arange(len(rows)) - (np.cumsum(n_in) - n_in)[sorted_codes]
    padded = np.zeros((len(n_in), int(n_in.max()), array.shape[1]), dtype=np.float32)
    padded[codes, slot] = array
    mask = np.zeros(padded.shape[:2], dtype=bool)
    mask[codes, slot] = True
    return PackedSeries(torch.from_numpy(padded), torch.from_numpy(mask), np.stack([codes, slot], axis=1))


def unpack_series(padded, index: np.ndarray):
    """pack_series inverted: the (n, C) rows back in their original order (same type as
    `padded`, a tensor or an array)."""
    index = np.asarray(index)
    if index.ndim != 2 or index.shape[1] != 2:
        raise ValueError(f"index must be (n, 2) as pack_series returns, got shape {index.shape}")
    if len(index) and (index[:, 0].max() >= padded.shape[0] or index[:, 1].max() >= padded.shape[1]):
        raise ValueError(f"index points outside padded of shape {tuple(padded.shape)}")
    if isinstance(padded, torch.Tensor):
        return padded[torch.from_numpy(index[:, 0]), torch.from_numpy(index[:, 1])]
    return np.asarray(padded)[index[:, 0], index[:, 1]]


# ---------------------------------------------------------------------------- model


class SeriesRefiner(nn.Module):
    """Per-slice logits (B, L, C) + mask (B, L) -> refined logits (B, L, C).

    out = x + conv(relu(conv(x))) over the slice axis. The last convolution starts at
    zero, so an untrained refiner returns its input exactly. Each series is extended
    beyond its ends (and over its padding) by repeating its edge slices, the same
    convention as neighbour_ids, so a series' output does not depend on what it was
    padded with or batched alongside. Outputs at padded slots are meaningless.
    """

    def __init__(self, n_labels: int = N_LABELS, hidden: int = HIDDEN, kernels: tuple[int, int] = KERNELS):
        super().__init__()
        if len(kernels) != 2 or any(k < 1 or k % 2 == 0 for k in kernels):
            raise ValueError(f"kernels must be two odd sizes, got {kernels!r}")
        self.halo = sum((k - 1) // 2 for k in kernels)
        self.body = nn.Sequential(
            nn.Conv1d(n_labels, hidden, kernels[0]),
            nn.ReLU(),
            nn.Conv1d(hidden, n_labels, kernels[1]),
        )
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or mask.shape != x.shape[:2]:
            raise ValueError(f"expected x (B, L, C) and mask (B, L), got {tuple(x.shape)} and {tuple(mask.shape)}")
        lengths = mask.sum(dim=1)
        if (mask[:, 1:] & ~mask[:, :-1]).any():
            raise ValueError("mask must mark a prefix of each row (as pack_series makes)")
        last = (lengths - 1).clamp(min=0)
        slots = torch.arange(-self.halo, x.shape[1] + self.halo, device=x.device).clamp(min=0)
        take = torch.minimum(slots[None, :], last[:, None])
        extended = torch.gather(x, 1, take[..., None].expand(-1, -1, x.shape[2]))
        return x + self.body(extended.transpose(1, 2)).transpose(1, 2)


# ---------------------------------------------------------------------- fit / apply


def _check_logits(logits, name: str = "logits") -> np.ndarray:
    array = np.asarray(logits, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != N_LABELS or len(array) == 0:
        raise ValueError(f"{name} must be (n, {N_LABELS}) in LABELS order with n > 0, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} have {int((~np.isfinite(array)).sum())} NaN or infinite values")
    return array


def _check_targets(labels, n_rows: int) -> np.ndarray:
    array = np.asarray(labels, dtype=np.float32)
    if array.shape != (n_rows, N_LABELS):
        raise ValueError(f"labels must have shape ({n_rows}, {N_LABELS}), got {array.shape}")
    if not np.isin(array, (0.0, 1.0)).all():
        raise ValueError("labels must all be 0 or 1")
    return array


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


@contextmanager
def _one_thread():
    # The tensors are a few thousand numbers: handing them between threads costs more
    # than the work (and on a busy machine, 40x more), and one thread sums in one order
    # whatever the machine's core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_refiner(logits, labels, series, position, *, seed: int = 0, epochs: int = EPOCHS,
                  lr: float = LR, batch_size: int = BATCH_SERIES, hidden: int = HIDDEN,
                  kernels: tuple[int, int] = KERNELS) -> SeriesRefiner:
    """One SeriesRefiner fitted to these rows (all of them), with the metric's weighted BCE.

    Deterministic for a seed: the weights are drawn from a forked torch RNG (the caller's
    global RNG is left untouched) and the batch order from numpy's generator of (seed, epoch).
    """
    x = _check_logits(logits)
    y = _check_targets(labels, len(x))
    epochs, batch_size = _check_positive_int(epochs, "epochs"), _check_positive_int(batch_size, "batch_size")
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    packed = pack_series(np.concatenate([x, y], axis=1), series, position)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SeriesRefiner(hidden=hidden, kernels=kernels)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    model.train()
    with _one_thread():
        _train_epochs(model, optimizer, packed, epochs, batch_size, seed)
    return model.eval()


def _train_epochs(model: SeriesRefiner, optimizer, packed: PackedSeries, epochs: int,
                  batch_size: int, seed: int) -> None:
    inputs, targets = packed.padded[..., :N_LABELS], packed.padded[..., N_LABELS:]
    lengths = packed.mask.sum(dim=1)
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(inputs))
        for first in range(0, len(order), batch_size):
            batch = torch.from_numpy(order[first:first + batch_size])
            width = int(lengths[batch].max())  # trim the padding this batch does not need
            mask = packed.mask[batch, :width]
            out = model(inputs[batch, :width], mask)
            loss = weighted_bce(out.reshape(-1, N_LABELS), targets[batch, :width].reshape(-1, N_LABELS),
                                mask.reshape(-1).float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


@torch.no_grad()
def apply_refiner(model: SeriesRefiner, logits, series, position) -> np.ndarray:
    """Refined logits (n, 6) float32 of one model, rows in the input's order."""
    x = _check_logits(logits)
    packed = pack_series(x, series, position)
    lengths = packed.mask.sum(dim=1)
    out = torch.zeros_like(packed.padded)
    was_training = model.training
    model.eval()
    with _one_thread():
        for first in range(0, len(out), INFER_BATCH_SERIES):
            rows = slice(first, first + INFER_BATCH_SERIES)
            width = int(lengths[rows].max())
            out[rows, :width] = model(packed.padded[rows, :width], packed.mask[rows, :width])
    model.train(was_training)
    return unpack_series(out, packed.index).numpy()


def _fold_seed(seed: int, fold: int) -> int:
    # SeedSequence mixes (seed, fold) so neighbouring seeds give unrelated folds' inits.
    return int(np.random.SeedSequence([seed, fold]).generate_state(1)[0])


@dataclass
class RefinerResult:
    """What fit_refiner learnt, and the evidence that it was honest about it.

    models[k] was trained on rows train_index[k] only, which exclude every row with
    folds == k, and produced oof_probs for those rows. Test rows get the mean of all
    models' probabilities (refine). Losses are the weighted log loss of the validation
    rows before (sigmoid of the input logits) and after (out of fold) refinement.
    """

    models: list[SeriesRefiner]
    folds: np.ndarray
    oof_probs: np.ndarray
    train_index: list[np.ndarray]
    fold_seeds: list[int]
    loss_before: float
    loss_after: float
    settings: dict = field(default_factory=dict)

    @property
    def n_folds(self) -> int:
        return len(self.models)

    @property
    def train_rows(self) -> list[int]:
        return [len(rows) for rows in self.train_index]


def fit_refiner(logits, labels, series, position, groups, n_folds: int = 5, seed: int = 0,
                epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH_SERIES,
                hidden: int = HIDDEN, kernels: tuple[int, int] = KERNELS) -> RefinerResult:
    """Out-of-fold refiners over validation rows: per-slice logits (n, 6), labels (n, 6) 0/1,
    series key and position of each row, and its patient group (see resolve_groups).

    Folds come from kfold_by_patient, so no model sees a patient it refines. With fewer
    patients than n_folds the folds are reduced to one per patient, with a RefinerWarning;
    fewer than two patients is an error (there would be nothing to train on).
    """
    x = _check_logits(logits)
    y = _check_targets(labels, len(x))
    codes, pos, series_keys = _check_series(series, position, len(x))
    group_array = np.asarray(groups)
    if group_array.shape != (len(x),):
        raise ValueError(f"groups must be 1-D with {len(x)} rows, got shape {group_array.shape}")
    group_codes, group_keys = sorted_codes(group_array, "groups", "; use resolve_groups")
    per_series = pd.Series(group_codes).groupby(codes).nunique()
    if (per_series > 1).any():
        bad = series_keys[per_series.index[per_series > 1]]
        raise ValueError(f"{len(bad)} series span several patient groups, which would leak "
                         f"labels across folds: {format_examples(bad)}")
    n_folds = _check_positive_int(n_folds, "n_folds")
    n_folds = fold_count(len(group_keys), n_folds, "fit_refiner", RefinerWarning, stacklevel=2)

    folds = kfold_by_patient(y.astype(np.int64), group_array, n_folds, seed)
    oof_logits = np.empty_like(x)
    models, train_index, fold_seeds = [], [], []
    for fold in range(n_folds):
        train, held = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
        fold_seed = _fold_seed(seed, fold)
        model = train_refiner(x[train], y[train], codes[train], pos[train], seed=fold_seed,
                              epochs=epochs, lr=lr, batch_size=batch_size, hidden=hidden,
                              kernels=kernels)
        oof_logits[held] = apply_refiner(model, x[held], codes[held], pos[held])
        models.append(model)
        train_index.append(train)
        fold_seeds.append(fold_seed)
    oof = sigmoid(oof_logits)
    return RefinerResult(
        models=models, folds=folds, oof_probs=oof, train_index=train_index, fold_seeds=fold_seeds,
        loss_before=weighted_log_loss(y, sigmoid(x)), loss_after=weighted_log_loss(y, oof),
        settings=dict(n_folds=n_folds, seed=seed, epochs=epochs, lr=lr, batch_size=batch_size,
                      hidden=hidden, kernels=tuple(kernels), weight_decay=WEIGHT_DECAY),
    )


def refine(result: RefinerResult, logits, series, position) -> np.ndarray:
    """Refined probabilities (n, 6) float64 of new rows: the mean over the fold models.

    Probabilities, not logits, are averaged: the mean is never more confident than its
    most confident member, which is the safer side of a log loss.
    """
    if not result.models:
        raise ValueError("result holds no models")
    probs = [sigmoid(apply_refiner(model, logits, series, position)) for model in result.models]
    return np.mean(probs, axis=0)


def save_refiner(result: RefinerResult, path) -> None:
    """The fold models and their settings: what refine() needs, written atomically."""
    state = {"models": [m.state_dict() for m in result.models],
             "hidden": int(result.settings.get("hidden", HIDDEN)),
             "kernels": list(result.settings.get("kernels", KERNELS)),
             "loss_before": float(result.loss_before), "loss_after": float(result.loss_after)}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_refiner(path) -> RefinerResult:
    """A saved refiner, ready for refine(); its training evidence (OOF rows) is not kept."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    models = []
    for weights in state["models"]:
        model = SeriesRefiner(hidden=state["hidden"], kernels=tuple(state["kernels"]))
        model.load_state_dict(weights)
        models.append(model.eval())
    return RefinerResult(models=models, folds=np.zeros(0, np.int64), oof_probs=np.zeros((0, N_LABELS)),
                         train_index=[], fold_seeds=[], loss_before=state["loss_before"],
                         loss_after=state["loss_after"], settings={"hidden": state["hidden"],
                                                                   "kernels": tuple(state["kernels"])})
