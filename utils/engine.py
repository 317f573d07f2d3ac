"""Training machinery: resumable sampling, checkpoints, loss, schedule, the loop's checks, torchrun (DDP).

Exact resumption is designed in rather than hoped for: the order of an epoch is a
permutation drawn from (seed, epoch) alone, each sample's augmentation from
(seed, epoch, index) alone, so a run restarted at batch k of epoch e sees exactly the
batches and augmentations the uninterrupted run saw, whatever the number of workers.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from utils.atomic import atomic_write
from utils.metrics import CLASS_WEIGHTS
from utils.model import clean_state_dict
from utils.rundir import BEST, LAST


# ---------------------------------------------------------------------------------------
# torchrun: one process per GPU, detected from the environment torchrun sets.

@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


# Rank 0 alone scans the headers (874k files uncached), fits the refiner and writes the
# report while the other ranks wait in a barrier: NCCL's default 10 minutes would end the run.
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)


def choose_backend(cuda: bool, gpus: int, local_processes: int) -> str:
    """NCCL when every local process has a GPU of its own; gloo otherwise (the CPU, or
    several processes sharing one GPU, which NCCL refuses)."""
    return "nccl" if cuda and gpus >= local_processes else "gloo"


def init_distributed() -> Dist:
    """Join the process group when started by torchrun; a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    if cuda:
        torch.cuda.set_device(local_rank % gpus)
    if not dist.is_initialized():
        dist.init_process_group(choose_backend(cuda, gpus, local_world), timeout=PROCESS_GROUP_TIMEOUT)
    return Dist(rank, world, local_rank)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def share(d: Dist, value) -> Path:
    """Rank 0's value of a path, on every rank (rank 0 alone creates folders and files)."""
    if d.enabled:
        box = [None if value is None else str(value)]
        dist.broadcast_object_list(box, src=0)
        barrier(d)
        value = box[0]
    return Path(value)


def gather_rows(d: Dist, index: np.ndarray, values: np.ndarray, n: int, fill=0) -> np.ndarray:
    """Reassemble per-rank predictions (rows ``index`` of an n-row table) on every rank."""
    out = np.full((n,) + values.shape[1:], fill, dtype=values.dtype)
    if not d.enabled:
        out[index] = values
        return out
    parts = [None] * d.world
    dist.all_gather_object(parts, (index, values))
    for part_index, part_values in parts:
        out[part_index] = part_values
    return out


def gather_lists(d: Dist, items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank."""
    if not d.enabled:
        return list(items)
    parts = [None] * d.world
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


# ----------------------------------------------------- the training loop's checks


@dataclass
class Tally:
    """What the steps between two checks add up, kept on the device so that no step waits
    for the GPU: summed loss, images, non-finite losses, fp16 steps the scaler skipped, and
    the current run of skipped steps."""
    values: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> Tally:
        return cls(torch.zeros(5, dtype=torch.float64, device=device))

    def add_batch(self, loss: torch.Tensor, n: int) -> None:
        loss = loss.detach().double()
        self.values[0] += loss * n
        self.values[1] += n
        self.values[2] += (~torch.isfinite(loss)).double()

    def add_step(self, skipped: torch.Tensor) -> None:
        skipped = skipped.double()
        self.values[3] += skipped
        self.values[4] = (self.values[4] + 1) * skipped  # back to 0 after a step taken


@dataclass
class Check:
    """The ranks' agreed view at a check: one all-reduce, one copy to the host."""
    loss_sum: float
    seen: int
    nonfinite: int
    skipped: int
    skipped_in_a_row: int
    stop: bool
    save: bool


def check_in(tally: Tally, d: Dist, stop_requested: bool, save_due: bool) -> Check:
    """Sum the ranks' tallies and flags. The step counts of the scaler and whether a
    checkpoint is due come from rank 0 alone: the first are the same on every rank (the
    gradients are all-reduced), and the second must be one clock's decision, or two ranks
    could enter different collectives (one saving, one stepping) and hang."""
    main = float(d.main)
    flags = torch.tensor([float(stop_requested), float(save_due) * main], dtype=torch.float64)
    values = torch.cat([tally.values, flags.to(tally.values.device)])
    values[3:5] *= main
    if d.enabled:
        dist.all_reduce(values)
    v = values.tolist()
    tally.values[:4] = 0  # the run of skipped steps goes on across checks
    return Check(v[0], int(v[1]), int(v[2]), int(v[3]), int(v[4]), v[5] > 0, v[6] > 0)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP and torch.compile wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ---------------------------------------------------------------------------------------
# Sampling that can stop and restart anywhere.

def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class ResumableSampler(Sampler):
    """This rank's share of a seeded per-epoch order, starting at batch ``start_batch``.

    With several ranks the order is padded by repetition to a multiple of the world size
    and dealt out round-robin, like DistributedSampler, so every rank runs the same
    number of steps.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world: int = 1, drop_last: bool = False):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _mine(self) -> np.ndarray:
        order = epoch_permutation(self.n, self.seed, self.epoch) if self.shuffle else np.arange(self.n)
        if self.world > 1:
            order = np.resize(order, math.ceil(self.n / self.world) * self.world)
            order = order[self.rank::self.world]
        if self.drop_last:
            order = order[:len(order) // self.batch_size * self.batch_size]
        return order

    def batches_per_epoch(self) -> int:
        return math.ceil(len(self._mine()) / self.batch_size)

    def __iter__(self):
        return iter(self._mine()[self.start_batch * self.batch_size:].tolist())

    def __len__(self) -> int:
        return max(0, len(self._mine()) - self.start_batch * self.batch_size)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch, independent of workers and order."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------
# Loss and schedule.

@functools.lru_cache(maxsize=None)
def _class_weights(device: torch.device) -> torch.Tensor:
    return torch.as_tensor(CLASS_WEIGHTS, dtype=torch.float32, device=device)


# The loss's denominator is kept off 0 (a batch with no readable, known label) by a
# floor far below its smallest real value (one subtype's weight, 1), so 0 / floor = 0.
LOSS_WEIGHT_FLOOR = 1e-6


def weighted_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE weighted like the competition metric ('any' counts twice) over the readable,
    known labels: sum(w_c * mask_ic * known_ic * bce_ic) / sum(w_c * mask_ic * known_ic).

    `target` (n, 6) may hold NaN, an unknown label: it adds nothing to the loss nor to any
    gradient (it is replaced before the BCE, not after, whose NaN would reach the
    gradients through 0 * NaN). `mask` is (n,) per row (the readable images) or (n, 6)
    per label. With every label known and a row mask this is the mean over readable rows
    of sum_c w_c * bce_ic / 7. The weights are copied to the device once, not at every step.
    """
    if mask.shape not in (target.shape[:1], target.shape):
        raise ValueError(f"mask must be (n,) per row or (n, {target.shape[-1]}) per label for "
                         f"targets of shape {tuple(target.shape)}, got {tuple(mask.shape)}")
    known = ~torch.isnan(target)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        logits.float(), torch.where(known, target, 0.0), reduction="none")
    weight = _class_weights(logits.device) * known * (mask[:, None] if mask.ndim == 1 else mask)
    return (bce * weight).sum() / weight.sum().clamp(min=LOSS_WEIGHT_FLOOR)


def warmup_cosine(total_steps: int, warmup_frac: float = 0.05, max_warmup: int = 200,
                  floor: float = 0.02):
    """LR multiplier: linear warm-up over a few percent of the steps, then cosine to ``floor``."""
    warmup = max(1, min(max_warmup, int(total_steps * warmup_frac)))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum formula (ties count half) over the rows
    whose label is known (NaN: unknown); NaN when one class is absent."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p)
    known = ~np.isnan(y)
    y, p = y[known], p[known]
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(p).rank().to_numpy()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# ---------------------------------------------------------------------------------------
# Checkpoints: one dict, written to a temporary file and renamed into place.

def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash (or a full disk) leaves the previous file as it was."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


class CheckpointMismatch(ValueError):
    """A checkpoint made with other settings than the run that would resume from it."""


# What a saved model was made with, and a prediction with it must use again (the batch too:
# float sums on the CPU); a resume must not change these nor the rest of Checkpoints.SHAPING.
MODEL_SETTINGS = ("arch", "image_size", "windows", "context", "context_windows", "crop", "batch_size")


class Checkpoints:
    """A run's ``last.pt`` (to resume from) and ``best.pt`` (its best validation epoch),
    in the spirit of timm's CheckpointSaver: each is one dict, written atomically, holding
    the run's settings; a resume under settings that shape the model, the data or the
    order of the batches is refused instead of silently mixing two runs."""

    # the processes too: the sampler deals each epoch out among them, and the position
    # (the batch) and the schedule's steps count batches of one process
    SHAPING = (*MODEL_SETTINGS, "seed", "val_frac", "folds", "fold", "demo_patients", "processes", "accum")

    def __init__(self, folder: Path, config: dict):
        self.folder, self.config = Path(folder), config
        self.last, self.best = self.folder / LAST, self.folder / BEST

    def save(self, path: Path, state: dict) -> None:
        save_checkpoint(path, {**state, "config": self.config})

    def resumable(self) -> dict | None:
        """last.pt, when there is one; CheckpointMismatch when it was made differently."""
        if not self.last.is_file():
            return None
        state = load_checkpoint(self.last)
        saved = state.get("config", {})
        changed = [k for k in self.SHAPING if k in saved and saved[k] != self.config.get(k)]
        if changed:
            raise CheckpointMismatch(
                f"{self.last} was made with " + ", ".join(
                    f"--{k.replace('_', '-')} {saved[k]}" for k in changed) + " (now " + ", ".join(
                    f"{self.config.get(k)}" for k in changed) + "); resuming would mix two runs. "
                "Resume with the same settings, or start again with --overwrite")
        return state


def model_state(model: torch.nn.Module) -> dict:
    """Weights without DDP / compile prefixes, so any checkpoint loads into a plain model."""
    return clean_state_dict(unwrap(model).state_dict())


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
