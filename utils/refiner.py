"""Per-series refiners of per-slice predictions, fitted out of fold: a residual 1-D
convolution over the logits, and a bidirectional GRU over the logits and the CNN's embeddings.

Every top-5 team of the competition gained ~0.006-0.008 weighted log loss by reading a
slice with its neighbours. Here the per-slice model's logits, placed by utils.slices'
order, are refined series by series:

    from utils.refiner import fit_refiner, refine
    result = fit_refiner(val_logits, val_labels, order.loc[ids, "series"],
                         order.loc[ids, "position"], groups)     # out-of-fold, by patient
    test_probs = refine(result, test_logits, test_series, test_position)

The logit refiner is a convolution rather than a GRU because it is fast on CPU, sees a
fixed window of slices (hemorrhage spans a few neighbours, not the whole head) and, with its last layer
initialised to zero, is exactly the identity at step 0, so training starts from the
per-slice model's own answer. It is trained on the validation set's logits with
patient-grouped folds, so every validation row gets an out-of-fold refined probability
(an honest before/after score), and test rows get the mean of the fold models'
probabilities.

The embedding refiner (``features=``: each row's pooled backbone features, utils.embeddings)
is what the 2nd-place solution ran over each series: it also sees what the CNN saw but did
not put in a logit. A learned projection brings the 2,048 features down to PROJECTION per
slice; a bidirectional GRU reads the series with the logits; its zero-initialised head adds
to the logits, so it too starts as the identity. Features are gathered batch by batch from
what ``features`` indexes (an array, a memory map, utils.embeddings.RowSource), so memory
stays bounded at 752k x 2,048. It trains on ``device`` (the GPU when there is one).
"""
from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from utils.atomic import atomic_write
from utils.engine import weighted_bce
from utils.labels import LABELS, format_examples
from utils.metrics import fold_labels, sigmoid, weighted_log_loss
from utils.split import fold_count, kfold_by_patient, sorted_codes

N_LABELS = len(LABELS)
HIDDEN = 32
KERNELS = (5, 3)  # a receptive field of 7 slices, about 3.5 cm at the usual 5 mm spacing
EPOCHS = 10
LR = 3e-3
WEIGHT_DECAY = 1e-4
BATCH_SERIES = 64
INFER_BATCH_SERIES = 512
# the embedding refiner's
# A small, much regularised model: fitted on a few hundred out-of-fold rows (the demo's),
# the first one (projection 32, dropout 0.2, at least 200 steps) was the best on the test
# set once its five fold models were averaged (0.064 against the logit refiner's 0.085,
# three seeds) but the worst out of fold, one model at a time (0.134-0.160 against 0.089-
# 0.092), so --refine never chose it. This one gives 0.087-0.107 out of fold and 0.071 on
# the test set (bench_folds.py --compare-refiners; BENCHMARKS.md).
PROJECTION = 8
GRU_HIDDEN = 32  # 64 took twice the time (the GRU's backward is most of a CPU step) for 6 outputs
FEATURE_DROPOUT = 0.5
EMBEDDING_EPOCHS = 8
EMBEDDING_LR = 3e-3
# A GRU needs some steps to learn anything (measured on test_refiner's synthetic series:
# 1.50 per slice, 0.56 after 40 steps, 0.27 after 80): a small validation set, a few
# batches an epoch, gets more epochs. At full size a fold's epoch is ~270 steps, and
# EMBEDDING_EPOCHS rules.
EMBEDDING_MIN_STEPS = 100
KINDS = ("logits", "embeddings")  # what a refiner reads: refiner_kind()


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


def _check_batch(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The series' lengths, once x (B, L, C) and mask (B, L) are checked."""
    if x.ndim != 3 or mask.shape != x.shape[:2]:
        raise ValueError(f"expected x (B, L, C) and mask (B, L), got {tuple(x.shape)} and {tuple(mask.shape)}")
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("mask must mark a prefix of each row (as pack_series makes)")
    return mask.sum(dim=1)


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor, features: None = None) -> torch.Tensor:
        if features is not None:
            raise ValueError("the logit refiner reads no features")
        lengths = _check_batch(x, mask)
        last = (lengths - 1).clamp(min=0)
        slots = torch.arange(-self.halo, x.shape[1] + self.halo, device=x.device).clamp(min=0)
        take = torch.minimum(slots[None, :], last[:, None])
        extended = torch.gather(x, 1, take[..., None].expand(-1, -1, x.shape[2]))
        return x + self.body(extended.transpose(1, 2)).transpose(1, 2)


class EmbeddingRefiner(nn.Module):
    """Per-slice logits (B, L, C), mask (B, L) and the pooled features of the real slots
    (mask.sum(), D), in the mask's row-major order -> refined logits (B, L, C).

    out = scale * x + head(GRU([x, project(features)])) along each series, both directions,
    with a learned scale per class (the features may say more than a noisy logit); the
    scale starts at one and the head at zero, so an untrained refiner returns its input
    exactly. Only the real slots are projected and the GRU reads each series to its own
    length (packed), so a series' output does not depend on its padding or batch. Outputs
    at padded slots are meaningless.
    """

    def __init__(self, n_features: int, n_labels: int = N_LABELS, projection: int = PROJECTION,
                 hidden: int = GRU_HIDDEN):
        super().__init__()
        # dropout after the projection: on the 2,048 inputs its mask cost more than the rest
        # of a CPU step (49 of ~150 ms), on PROJECTION it costs nothing
        self.project = nn.Sequential(nn.Linear(n_features, projection), nn.LayerNorm(projection), nn.ReLU(),
                                     nn.Dropout(FEATURE_DROPOUT))
        self.gru = nn.GRU(n_labels + projection, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, n_labels)
        self.scale = nn.Parameter(torch.ones(n_labels))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        lengths = _check_batch(x, mask)
        n_real = int(lengths.sum())
        if features is None or features.ndim != 2 or len(features) != n_real:
            raise ValueError(f"expected the features of the {n_real} real slots (n, D), got "
                             f"{None if features is None else tuple(features.shape)}")
        projected = x.new_zeros(*mask.shape, self.project[0].out_features)
        projected[mask] = self.project(features)
        packed = pack_padded_sequence(torch.cat([x, projected], dim=2), lengths.cpu().clamp(min=1),
                                      batch_first=True, enforce_sorted=False)
        read = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=x.shape[1])[0]
        return self.scale * x + self.head(read)


def refiner_kind(model: nn.Module) -> str:
    """What a refiner reads (KINDS)."""
    return "embeddings" if isinstance(model, EmbeddingRefiner) else "logits"


# ---------------------------------------------------------------------- fit / apply


def _check_logits(logits, name: str = "logits") -> np.ndarray:
    array = np.asarray(logits, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != N_LABELS or len(array) == 0:
        raise ValueError(f"{name} must be (n, {N_LABELS}) in LABELS order with n > 0, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} have {int((~np.isfinite(array)).sum())} NaN or infinite values")
    return array


def _check_targets(labels, n_rows: int) -> np.ndarray:
    """Labels (n, 6) float32 of 0, 1 or NaN (unknown: left out of the loss, never a 0)."""
    array = np.asarray(labels, dtype=np.float32)
    if array.shape != (n_rows, N_LABELS):
        raise ValueError(f"labels must have shape ({n_rows}, {N_LABELS}), got {array.shape}")
    bad = ~(np.isin(array, (0.0, 1.0)) | np.isnan(array))
    if bad.any():
        raise ValueError(f"labels must all be 0 or 1, or NaN (unknown); found {int(bad.sum())} "
                         f"other values, e.g. {float(array[bad][0])}")
    return array


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


@contextlib.contextmanager
def _one_thread():
    # The tensors are a few thousand numbers (a batch of embeddings, a few million): handing
    # them between threads costs more than the work (on a busy machine 40x more, and 17x
    # for the GRU), and one thread sums in one order whatever the machine's core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_features(features, n_rows: int):
    """``features`` (an array, a memory map, a RowSource) as a refiner reads it: indexed by
    row, 2-D, one row per input row; None stays None."""
    if features is None:
        return None
    shape = getattr(features, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != n_rows or shape[1] < 1:
        raise ValueError(f"features must be (n, D) with {n_rows} rows, got shape {shape}")
    return features


def _gather(features, rows: np.ndarray, device) -> torch.Tensor:
    """features[rows] as float32 on the device: read as stored (float16 from a run folder),
    moved, then widened by torch (10x faster than numpy's float16 conversion)."""
    block = torch.from_numpy(np.ascontiguousarray(features[rows])).to(device).float()
    sums = block.sum(dim=1)  # not finite where a row is not: 5x cheaper than isfinite on all
    if not torch.isfinite(sums).all():
        bad = rows[~torch.isfinite(sums).cpu().numpy()]
        raise ValueError(f"features have NaN or infinite values (e.g. row {int(bad[0])})")
    return block


class _Batches:
    """The series of one packing, batch by batch, on a device: logits, mask, targets and the
    features of the real slots (gathered from ``features`` at ``rows``, the global row of each
    packed row), each batch trimmed to its longest series."""

    def __init__(self, packed: PackedSeries, n_inputs: int, features, rows: np.ndarray, device):
        self.packed, self.n_inputs, self.features, self.device = packed, n_inputs, features, device
        self.lengths = packed.mask.sum(dim=1)
        self.rows = np.full(packed.mask.shape, -1, dtype=np.int64)
        self.rows[packed.index[:, 0], packed.index[:, 1]] = rows

    def take(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Batch ``batch`` (series numbers): inputs, mask, targets, features."""
        which = torch.from_numpy(batch)
        width = int(self.lengths[which].max())
        mask = self.packed.mask[which, :width]
        values = self.packed.padded[which, :width].to(self.device)
        features = None
        if self.features is not None:
            features = _gather(self.features, self.rows[batch, :width][mask.numpy()], self.device)
        return values[..., :self.n_inputs], mask.to(self.device), values[..., self.n_inputs:], features


def _new_model(n_features: int | None, hidden: int, kernels: tuple[int, int]) -> nn.Module:
    if n_features is None:
        return SeriesRefiner(hidden=hidden, kernels=kernels)
    return EmbeddingRefiner(n_features)  # PROJECTION, GRU_HIDDEN


def train_refiner(logits, labels, series, position, *, features=None, rows=None, device="cpu",
                  seed: int = 0, epochs: int | None = None, lr: float | None = None,
                  batch_size: int = BATCH_SERIES, hidden: int = HIDDEN,
                  kernels: tuple[int, int] = KERNELS, min_steps: int | None = None) -> nn.Module:
    """One refiner fitted to these rows (all of them), with the metric's weighted BCE over
    the known labels (NaN: unknown): a SeriesRefiner, or with ``features`` (row ``rows[i]``
    of it for input row i; default row i) an EmbeddingRefiner, trained for at least
    ``min_steps`` steps (default EMBEDDING_MIN_STEPS). Epochs and learning rate default by kind.

    Deterministic for a seed on the CPU: the weights and dropout draw from a forked torch
    RNG (the caller's global RNG is left untouched), the batch order from numpy's generator
    of (seed, epoch).
    """
    x = _check_logits(logits)
    y = _check_targets(labels, len(x))
    rows = np.arange(len(x)) if rows is None else np.asarray(rows, dtype=np.int64)
    if features is not None and (rows.shape != (len(x),) or rows.min() < 0 or rows.max() >= features.shape[0]):
        raise ValueError(f"rows must give a row of features for each of the {len(x)} rows")
    embedding = features is not None
    epochs = _check_positive_int((EMBEDDING_EPOCHS if embedding else EPOCHS) if epochs is None else epochs, "epochs")
    lr = (EMBEDDING_LR if embedding else LR) if lr is None else lr
    batch_size = _check_positive_int(batch_size, "batch_size")
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    batches = _Batches(pack_series(np.concatenate([x, y], axis=1), series, position), N_LABELS,
                       features, rows, device)
    if embedding:
        per_epoch = -(-len(batches.lengths) // batch_size)
        epochs = max(epochs, -(-(min_steps or EMBEDDING_MIN_STEPS) // per_epoch))
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _one_thread():
        torch.manual_seed(seed)
        model = _new_model(features.shape[1] if embedding else None, hidden, kernels).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
        model.train()
        _train_epochs(model, optimizer, batches, epochs, batch_size, seed)
    _pass_through(model, np.isnan(y).all(axis=0))
    return model.eval()


@torch.no_grad()
def _pass_through(model: nn.Module, unknown: np.ndarray) -> None:
    """Classes no training row knows (`unknown`, (6,) bool) keep their input logits. Their
    weights get no gradient, and the logit refiner's stay at their zero start; but Adam's
    weight decay would still shrink the embedding refiner's scale, at the optimiser's full
    step (Adam normalises even a gradient of wd * 1: 1 -> 0.72 in 100 steps), moving the
    class towards 0.5 with nothing learnt."""
    if isinstance(model, EmbeddingRefiner) and unknown.any():
        model.scale[torch.from_numpy(unknown).to(model.scale.device)] = 1.0


def _train_epochs(model: nn.Module, optimizer, batches: _Batches, epochs: int, batch_size: int,
                  seed: int) -> None:
    n_series = len(batches.lengths)
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n_series)
        for first in range(0, n_series, batch_size):
            inputs, mask, targets, features = batches.take(order[first:first + batch_size])
            out = model(inputs, mask, features)
            # padded slots are masked by row, unknown (NaN) targets by weighted_bce itself
            loss = weighted_bce(out.reshape(-1, N_LABELS), targets.reshape(-1, N_LABELS),
                                mask.reshape(-1).float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


@torch.no_grad()
def apply_refiner(model: nn.Module, logits, series, position, features=None, rows=None,
                  device="cpu") -> np.ndarray:
    """Refined logits (n, 6) float32 of one model, rows in the input's order; an embedding
    refiner reads row ``rows[i]`` of ``features`` for input row i (default row i)."""
    x = _check_logits(logits)
    if (features is None) != (refiner_kind(model) == "logits"):
        raise ValueError(f"a refiner of {refiner_kind(model)} was given "
                         f"{'no features' if features is None else 'features'}")
    rows = np.arange(len(x)) if rows is None else np.asarray(rows, dtype=np.int64)
    packed = pack_series(x, series, position)
    batches = _Batches(packed, N_LABELS, features, rows, device)
    out = torch.zeros_like(packed.padded)
    was_training = model.training
    model.eval()
    with _one_thread():
        for first in range(0, len(out), INFER_BATCH_SERIES):
            batch = np.arange(first, min(first + INFER_BATCH_SERIES, len(out)))
            inputs, mask, _, batch_features = batches.take(batch)
            out[first:first + len(batch), :mask.shape[1]] = model(inputs, mask, batch_features).cpu()
    model.train(was_training)
    return unpack_series(out, packed.index).numpy()


def _crossing_seed(seed: int) -> int:
    """The seed of the refiner's patient folds. A --fold all run's CNN folds come from
    kfold_by_patient(labels, groups, K, seed): with the same seed the refiner's folds over
    its out-of-fold rows were the CNN's own, so each refiner was trained on the features of
    four CNN models and judged on those of the fifth, which it never saw; on the test set it
    runs on all five. Measured on the demo (bench_folds.py --compare-refiners, seed 44): out
    of fold 0.145, on the test set 0.059; one refiner on the one CNN model it had not seen,
    0.11-0.22, on the others 0.05-0.16. Folds that cross the CNN's put every model's
    features into every refiner's training rows, as on the test set."""
    return int(np.random.SeedSequence([seed, 7919]).generate_state(1)[0])


def _fold_seed(seed: int, fold: int) -> int:
    # SeedSequence mixes (seed, fold) so neighbouring seeds give unrelated folds' inits.
    return int(np.random.SeedSequence([seed, fold]).generate_state(1)[0])


@dataclass
class RefinerResult:
    """What fit_refiner learnt, and the evidence that it was honest about it.

    models[k] was trained on rows train_index[k] only, which exclude every row with
    folds == k, and produced oof_probs for those rows. Test rows get the mean of all
    models' probabilities (refine). Losses are the weighted log loss of the validation
    rows before (sigmoid of the input logits) and after (out of fold) refinement, over
    their known labels (utils.metrics.weighted_log_loss).
    """

    models: list[nn.Module]
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

    @property
    def kind(self) -> str:
        """What its models read (KINDS): refine() needs features for "embeddings"."""
        return refiner_kind(self.models[0])


def fit_refiner(logits, labels, series, position, groups, n_folds: int = 5, seed: int = 0,
                epochs: int | None = None, lr: float | None = None, batch_size: int = BATCH_SERIES,
                hidden: int = HIDDEN, kernels: tuple[int, int] = KERNELS, features=None,
                device="cpu", min_steps: int | None = None) -> RefinerResult:
    """Out-of-fold refiners over validation rows: per-slice logits (n, 6), labels (n, 6) 0/1
    or NaN (unknown: left out of the training loss and of loss_before/loss_after),
    series key and position of each row, and its patient group (see resolve_groups); with
    ``features`` (n, D), indexed by row, embedding refiners (EmbeddingRefiner) on ``device``.

    Folds come from kfold_by_patient, so no model sees a patient it refines; for the same
    rows, groups and seed both kinds get the same folds. With fewer patients than n_folds the
    folds are reduced to one per patient, with a RefinerWarning; fewer than two patients is
    an error (there would be nothing to train on).
    """
    x = _check_logits(logits)
    y = _check_targets(labels, len(x))
    features = _check_features(features, len(x))
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

    folds = kfold_by_patient(fold_labels(y).astype(np.int64), group_array, n_folds, _crossing_seed(seed))
    oof_logits = np.empty_like(x)
    models, train_index, fold_seeds = [], [], []
    for fold in range(n_folds):
        train, held = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
        fold_seed = _fold_seed(seed, fold)
        model = train_refiner(x[train], y[train], codes[train], pos[train], features=features, rows=train,
                              device=device, seed=fold_seed, epochs=epochs, lr=lr, batch_size=batch_size,
                              hidden=hidden, kernels=kernels, min_steps=min_steps)
        oof_logits[held] = apply_refiner(model, x[held], codes[held], pos[held], features,
                                         None if features is None else held, device)
        models.append(model.cpu())
        train_index.append(train)
        fold_seeds.append(fold_seed)
    oof = sigmoid(oof_logits)
    kind = refiner_kind(models[0])
    return RefinerResult(
        models=models, folds=folds, oof_probs=oof, train_index=train_index, fold_seeds=fold_seeds,
        loss_before=weighted_log_loss(y, sigmoid(x)), loss_after=weighted_log_loss(y, oof),
        settings=dict(kind=kind, n_folds=n_folds, seed=seed, batch_size=batch_size, weight_decay=WEIGHT_DECAY,
                      epochs=(EPOCHS if kind == "logits" else EMBEDDING_EPOCHS) if epochs is None else epochs,
                      lr=(LR if kind == "logits" else EMBEDDING_LR) if lr is None else lr,
                      **(dict(hidden=hidden, kernels=tuple(kernels)) if kind == "logits" else
                         dict(n_features=int(features.shape[1]), projection=PROJECTION, hidden=GRU_HIDDEN,
                              feature_dropout=FEATURE_DROPOUT, min_steps=min_steps or EMBEDDING_MIN_STEPS))),
    )


def fit_refiners(logits, labels, series, position, groups, seed: int, features=None,
                 device="cpu") -> dict[str, RefinerResult]:
    """The refiners --refine weighs against each other, by kind (KINDS): over the logits
    and, with ``features``, over the logits and the features; 5 patient folds each, the
    same for both (fit_refiner)."""
    fitted = {"logits": fit_refiner(logits, labels, series, position, groups, n_folds=5, seed=seed)}
    if features is not None:
        fitted["embeddings"] = fit_refiner(logits, labels, series, position, groups, n_folds=5, seed=seed,
                                           features=features, device=device)
    return fitted


def choose_refiner(losses: dict, per_slice: float) -> str | None:
    """The kind of refiner with the lowest out-of-fold loss, or None where none beats the
    per-slice predictions' ``per_slice``: trained on a small validation set a refiner can
    overfit, so it is used only where its out-of-fold loss shows it helps."""
    best = min(losses, key=losses.get, default=None)
    return best if best is not None and losses[best] < per_slice else None


def refine(result: RefinerResult, logits, series, position, features=None) -> np.ndarray:
    """Refined probabilities (n, 6) float64 of new rows: the mean over the fold models
    (on the CPU); an embedding refiner needs each row's ``features`` (n, D).

    Probabilities, not logits, are averaged: the mean is never more confident than its
    most confident member, which is the safer side of a log loss.
    """
    if not result.models:
        raise ValueError("result holds no models")
    features = _check_features(features, len(np.asarray(logits)))
    probs = [sigmoid(apply_refiner(model, logits, series, position, features)) for model in result.models]
    return np.mean(probs, axis=0)


def save_refiner(result: RefinerResult, path) -> None:
    """The fold models, their kind and settings: what refine() needs, written atomically."""
    settings = {k: v for k, v in result.settings.items()
                if k in ("kind", "hidden", "kernels", "n_features", "projection")}
    settings.setdefault("kind", result.kind)
    settings.setdefault("hidden", HIDDEN)
    settings.setdefault("kernels", KERNELS)
    state = {"models": [m.state_dict() for m in result.models], **settings,
             "kernels": list(settings["kernels"]),
             "loss_before": float(result.loss_before), "loss_after": float(result.loss_after)}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_refiner(path) -> RefinerResult:
    """A saved refiner, ready for refine(); its training evidence (OOF rows) is not kept.
    A file written before the embedding refiner existed is a logit refiner."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    kind = state.get("kind", "logits")
    models = []
    for weights in state["models"]:
        model = (SeriesRefiner(hidden=state["hidden"], kernels=tuple(state["kernels"])) if kind == "logits"
                 else EmbeddingRefiner(state["n_features"], projection=state["projection"], hidden=state["hidden"]))
        model.load_state_dict(weights)
        models.append(model.eval())
    settings = {"kind": kind, "hidden": state["hidden"], "kernels": tuple(state["kernels"])}
    if kind == "embeddings":
        settings.update(n_features=state["n_features"], projection=state["projection"])
    return RefinerResult(models=models, folds=np.zeros(0, np.int64), oof_probs=np.zeros((0, N_LABELS)),
                         train_index=[], fold_seeds=[], loss_before=state["loss_before"],
                         loss_after=state["loss_after"], settings=settings)
