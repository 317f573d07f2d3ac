"""utils.engine: resumable sampling, schedule, loss, AUC and crash-safe checkpoints."""
import errno
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from utils import engine
from utils.engine import (Dist, ResumableSampler, gather_rows, model_state, roc_auc,
                          save_checkpoint, load_checkpoint, unwrap, warmup_cosine, weighted_bce)
from utils.labels import LABELS
from utils.metrics import weighted_log_loss


def test_sampler_order_is_a_seeded_permutation_per_epoch():
    s = ResumableSampler(10, batch_size=3, seed=1)
    s.set_epoch(0)
    e0 = list(s)
    assert sorted(e0) == list(range(10)) and len(s) == 10
    assert list(s) == e0  # the same epoch again: the same order
    s.set_epoch(1)
    assert list(s) != e0
    assert list(ResumableSampler(10, 3, seed=2)) != e0


def test_sampler_resumes_mid_epoch():
    s = ResumableSampler(10, batch_size=3, seed=1)
    s.set_epoch(4)
    full = list(s)
    s.set_epoch(4, start_batch=2)
    assert list(s) == full[6:] and len(s) == 4


def test_sampler_shares_among_ranks_and_drops_last():
    ranks = [ResumableSampler(11, batch_size=2, seed=0, rank=r, world=3) for r in range(3)]
    parts = [list(r) for r in ranks]
    assert all(len(p) == 4 for p in parts)  # padded to 12, 4 each: every rank the same steps
    assert set(sum(parts, [])) == set(range(11))
    dropped = ResumableSampler(11, batch_size=4, seed=0, drop_last=True)
    assert len(list(dropped)) == 8 and dropped.batches_per_epoch() == 2
    assert ResumableSampler(11, batch_size=4, seed=0).batches_per_epoch() == 3


def test_warmup_then_cosine():
    f = warmup_cosine(1000, warmup_frac=0.05, floor=0.02)
    assert f(0) == pytest.approx(1 / 50) and f(49) == pytest.approx(1.0)
    assert f(50) == pytest.approx(1.0)
    assert f(50 + 475) == pytest.approx(0.02 + 0.98 * 0.5)
    assert f(1000) == pytest.approx(0.02) and f(5000) == pytest.approx(0.02)


def test_weighted_bce_equals_the_competition_metric():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(50, 6)).astype(np.float32)
    logits = rng.normal(size=(50, 6)).astype(np.float32)
    loss = weighted_bce(torch.tensor(logits), torch.tensor(y), torch.ones(50))
    assert loss.item() == pytest.approx(weighted_log_loss(y, 1 / (1 + np.exp(-logits))), rel=1e-5)
    mask = torch.tensor([1.0] * 25 + [0.0] * 25)  # unreadable rows do not count
    masked = weighted_bce(torch.tensor(logits), torch.tensor(y), mask)
    assert masked.item() == pytest.approx(weighted_log_loss(y[:25], 1 / (1 + np.exp(-logits[:25]))), rel=1e-5)


def bce_batch(n=40, seed=0):
    """Logits (requiring grad), 0/1 targets with `subdural` unknown in every row, the
    column's index."""
    rng = np.random.default_rng(seed)
    logits = torch.tensor(rng.normal(0, 2, (n, 6)), dtype=torch.float32, requires_grad=True)
    target = torch.tensor(rng.integers(0, 2, (n, 6)), dtype=torch.float32)
    column = LABELS.index("subdural")
    target[:, column] = float("nan")
    return logits, target, column


def test_an_unknown_subtype_provably_does_not_enter_the_loss():
    logits, target, column = bce_batch()
    readable = torch.ones(len(target))
    readable[:5] = 0
    loss = weighted_bce(logits, target, readable)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert (logits.grad[:, column] == 0).all()  # exactly: no gradient reaches the unknown logits
    assert (logits.grad[5:, :column] != 0).all()  # while the known ones learn
    # the loss by hand, over the known entries of the readable rows only
    x, y = logits.detach().double()[5:], target.double()[5:]
    bce = torch.nn.functional.softplus(x) - y * x
    keep = [j for j in range(6) if j != column]
    w = torch.tensor([1.0, 1, 1, 1, 1, 2], dtype=torch.float64)[keep]
    assert loss.item() == pytest.approx(((bce[:, keep] * w).sum() / (w.sum() * len(x))).item(), rel=1e-6)
    # whatever the column's targets, masked entry by entry they give the identical loss
    entries = readable[:, None].repeat(1, 6)
    entries[:, column] = 0
    for value in (0.0, 1.0):
        filled = target.clone()
        filled[:, column] = value
        assert torch.equal(weighted_bce(logits, filled, entries), loss)
    assert torch.equal(weighted_bce(logits, target, entries), loss)


def test_weighted_bce_masks_unknown_entries_one_by_one():
    logits, target, _ = bce_batch(seed=1)
    target = target.clone()
    rng = np.random.default_rng(1)
    unknown = torch.from_numpy(rng.random(target.shape) < 0.3)
    target[unknown] = float("nan")
    known = ~torch.isnan(target)
    probs = torch.sigmoid(logits.detach()).double().numpy()
    metric = weighted_log_loss(target.numpy(), probs)  # the one definition, in utils.metrics
    assert weighted_bce(logits, target, torch.ones(len(target))).item() == pytest.approx(metric, rel=1e-5)
    assert weighted_bce(logits, torch.nan_to_num(target), known.float()).item() == pytest.approx(metric, rel=1e-5)
    nothing = weighted_bce(logits, target, torch.zeros(len(target)))
    assert nothing.item() == 0  # no readable row: no loss, not 0 / 0
    nothing.backward()
    assert (logits.grad == 0).all()
    with pytest.raises(ValueError, match=r"mask must be \(n,\) per row or \(n, 6\) per label.*got \(40, 5\)"):
        weighted_bce(logits, target, torch.ones(40, 5))


def test_one_sgd_step_leaves_the_unknown_subtype_alone():
    # a tiny model, one optimizer step on a batch whose subdural labels are all unknown:
    # the subdural output's bias and weights are exactly as they were, the others moved
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6))
    head = model[-1]
    before = head.bias.detach().clone(), head.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # no weight decay, no momentum: exact
    _, target, column = bce_batch(n=32, seed=2)
    loss = weighted_bce(model(torch.randn(32, 8)), target, torch.ones(32))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert head.bias[column].item() == before[0][column].item()
    assert torch.equal(head.weight[column], before[1][column])
    others = [j for j in range(6) if j != column]
    assert (head.bias[others] != before[0][others]).all()


def test_roc_auc_matches_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = np.round(rng.random(200), 1)  # many ties
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert math.isnan(roc_auc(np.zeros(5), np.arange(5)))
    # an unknown label (NaN) leaves its row out: not a negative
    unknown = np.r_[y.astype(float), np.full(50, np.nan)]
    more = np.r_[p, np.random.default_rng(2).random(50)]
    assert roc_auc(unknown, more) == roc_auc(y, p)
    assert roc_auc(unknown, more) != roc_auc(np.nan_to_num(unknown), more)
    assert math.isnan(roc_auc(np.full(4, np.nan), np.arange(4)))


def test_gather_rows_without_processes():
    out = gather_rows(Dist(), np.array([2, 0]), np.array([[1.0], [2.0]]), 3, fill=-1)
    assert out.tolist() == [[2.0], [-1], [1.0]]


def test_checkpoint_write_is_atomic_under_disk_full(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": torch.tensor(1)})

    def full_disk(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(engine.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"step": torch.tensor(2)})
    assert load_checkpoint(path)["step"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_model_state_has_no_wrapper_prefixes():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m
    wrapped = Wrapper(model)
    assert unwrap(wrapped) is model
    assert list(model_state(wrapped)) == ["0.weight", "0.bias"]


def test_checkpoints_resume_only_under_the_settings_they_were_made_with(tmp_path):
    from utils.engine import CheckpointMismatch, Checkpoints
    config = {"arch": "resnet18", "image_size": 64, "windows": "brain", "seed": 1, "lr": 1e-3}
    ckpt = Checkpoints(tmp_path, config)
    assert ckpt.resumable() is None  # nothing to resume yet
    ckpt.save(ckpt.last, {"position": {"epoch": 1}})
    state = Checkpoints(tmp_path, {**config, "lr": 1e-4}).resumable()  # a lower lr after a NaN
    assert state["position"] == {"epoch": 1} and state["config"] == config
    with pytest.raises(CheckpointMismatch, match="--image-size 64 .now 128.*--overwrite"):
        Checkpoints(tmp_path, {**config, "image_size": 128}).resumable()
    with pytest.raises(CheckpointMismatch, match="--arch resnet18, --seed 1 .now resnet50, 2"):
        Checkpoints(tmp_path, {**config, "arch": "resnet50", "seed": 2}).resumable()
