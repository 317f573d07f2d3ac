"""utils.embeddings: features saved in a run folder and read back row by row, and the
features a prediction pass keeps (utils.inference)."""
import numpy as np
import pytest
import torch

from utils import embeddings, rundir
from utils.embeddings import RowSource
from utils.inference import _forward
from utils.model import build_model, pooled_features


def test_saved_features_come_back_for_the_ids_asked_from_the_folder_that_holds_them(tmp_path):
    rng = np.random.default_rng(0)
    ids = np.array([f"ID_{i:09x}" for i in range(30)])
    values = rng.normal(0, 3, (30, 8)).astype(np.float32)
    embeddings.save(tmp_path / "fold_0", rundir.VAL_SPLIT, ids[:12], values[:12])
    embeddings.save(tmp_path / "fold_1", rundir.VAL_SPLIT, ids[12:], values[12:])
    assert not list(tmp_path.rglob("*.tmp"))
    stored = np.load(rundir.embedding_files(tmp_path / "fold_1", rundir.VAL_SPLIT)[0], mmap_mode="r")
    assert stored.dtype == np.float16 and stored.shape == (18, 8)
    asked = rng.permutation(ids)  # the out-of-fold table's order, not the folds'
    source = embeddings.load([tmp_path / "fold_0", tmp_path / "fold_1"], rundir.VAL_SPLIT, asked)
    assert source.shape == (30, 8) and len(source) == 30
    where = {key: i for i, key in enumerate(ids)}
    expected = values[[where[key] for key in asked]].astype(np.float16)
    assert np.array_equal(source[np.arange(30)], expected)
    rows = np.array([29, 0, 5, 5, 17])
    assert np.array_equal(source[rows], expected[rows])
    # what is missing makes no source: the refiner then goes without features
    assert embeddings.load([tmp_path / "fold_0"], rundir.VAL_SPLIT, asked) is None
    assert embeddings.load([tmp_path / "fold_0", tmp_path / "none"], rundir.VAL_SPLIT, ids[:3]) is None
    assert embeddings.load([tmp_path / "fold_0"], rundir.TEST_SPLIT, ids[:3]) is None
    with pytest.raises(ValueError, match="a row per ID"):
        embeddings.save(tmp_path, rundir.TEST_SPLIT, ids[:3], values[:4])
    with pytest.raises(ValueError, match="different widths or types"):
        RowSource([values[:3], values[:3, :4]], np.array([0, 1]), np.array([0, 0]))


def test_the_features_of_a_prediction_are_what_its_logits_are_made_of():
    torch.manual_seed(0)
    model = build_model("resnet18", in_channels=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.fc(pooled_features(model, x)), model(x))
        for tta in (False, True):
            plain, none = _forward(model, x, tta, embed=False)
            logits, features = _forward(model, x, tta, embed=True)
            assert none is None and torch.equal(logits, plain)  # keeping features changes no probability
            views = [x, torch.flip(x, dims=[3])] if tta else [x]
            expected = sum(pooled_features(model, v) for v in views) / len(views)
            assert features.shape == (2, model.fc.in_features) and torch.allclose(features, expected)
        assert not torch.allclose(_forward(model, x, True, True)[1], _forward(model, x, False, True)[1])
