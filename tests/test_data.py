"""utils.data: the dataset reads windowed slices, survives bad files, normalises on device."""
import numpy as np
import pytest
import torch
from factories import make_ct

from utils.data import (IMAGENET_MEAN, IMAGENET_STD, SliceDataset, make_loader,
                        to_device_normalized, train_transform)
from utils.dicom import read_windowed


def test_dataset_items(tmp_path):
    good = make_ct(tmp_path / "a.dcm", np.full((48, 48), 1064))
    bad = tmp_path / "b.dcm"
    bad.write_bytes(b"junk")
    labels = np.array([[0, 1, 0, 0, 0, 1], [1, 0, 0, 0, 0, 1]])
    ds = SliceDataset([good, bad], labels, size=32)
    image, target, index, ok = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    np.testing.assert_array_equal(image.numpy().transpose(1, 2, 0), read_windowed(good, size=32))
    assert target.tolist() == [0, 1, 0, 0, 0, 1] and index == 0 and ok
    image, target, index, ok = ds[1]
    assert not ok and index == 1 and image.sum() == 0 and target.tolist() == [1, 0, 0, 0, 0, 1]


def test_loader_batches_and_flags(tmp_path):
    paths = [make_ct(tmp_path / f"{i}.dcm", np.full((16, 16), 1000 + i)) for i in range(5)]
    (tmp_path / "x.dcm").write_bytes(b"")
    ds = SliceDataset([*paths, tmp_path / "x.dcm"], size=16, transform=train_transform())
    batches = list(make_loader(ds, 4, workers=0))
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == list(range(6))
    ok = torch.cat([b[3] for b in batches])
    index = torch.cat([b[2] for b in batches])
    assert ok[index == 5].tolist() == [False] and ok.sum() == 5


def test_augmentation_depends_only_on_seed_epoch_and_index(tmp_path):
    rng = np.random.default_rng(0)
    paths = [make_ct(tmp_path / f"{i}.dcm", rng.integers(900, 1200, size=(32, 32))) for i in range(3)]
    ds = SliceDataset(paths, size=32, transform=train_transform(), seed=7)
    first = [ds[i][0] for i in range(3)]
    again = [ds[i][0] for i in (2, 0, 1)]  # another order, as another worker would read them
    assert torch.equal(first[0], again[1]) and torch.equal(first[2], again[0])
    ds.epoch = 1
    assert any(not torch.equal(first[i], ds[i][0]) for i in range(3))


def test_train_transform_keeps_shape_and_dtype():
    img = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    out = train_transform()(image=img)["image"]
    assert out.shape == img.shape and out.dtype == np.uint8


def test_normalisation_on_device():
    images = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2).contiguous()
    x = to_device_normalized(images, torch.device("cpu"))
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    for c in range(3):
        assert x[0, c, 0, 0].item() == pytest.approx(-IMAGENET_MEAN[c] / IMAGENET_STD[c], rel=1e-5)
        assert x[0, c, 0, 1].item() == pytest.approx((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], rel=1e-5)
