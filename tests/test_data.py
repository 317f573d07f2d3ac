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


def test_each_slice_gets_the_statistics_its_filters_were_trained_with():
    from utils.data import channel_stats
    mean, std = channel_stats(9, slices=3)  # three slices of brain, subdural, soft tissue
    assert mean == list(IMAGENET_MEAN) * 3 and std == list(IMAGENET_STD) * 3
    assert channel_stats(3) == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    one = channel_stats(1)  # the summed filters: their average
    assert one == ([pytest.approx(sum(IMAGENET_MEAN) / 3)], [pytest.approx(sum(IMAGENET_STD) / 3)])
    assert channel_stats(5)[0] == [*IMAGENET_MEAN, *IMAGENET_MEAN[:2]]


def test_pretrained_context_network_starts_as_the_single_slice_one():
    """With its neighbours' filters at zero and every slice normalised like the middle one,
    the 9-channel network gives the 3-channel network's output on the middle slice."""
    import copy

    from utils.model import adapt_input, create_model
    torch.manual_seed(0)
    plain = create_model("resnet18").eval()
    wide = adapt_input(copy.deepcopy(plain), 9, slices=3).eval()
    images = torch.randint(0, 256, (2, 9, 32, 32), dtype=torch.uint8)
    x9 = to_device_normalized(images, torch.device("cpu"), slices=3)
    x3 = to_device_normalized(images[:, 3:6].contiguous(), torch.device("cpu"))
    assert torch.allclose(x9[:, 3:6], x3)
    with torch.no_grad():
        assert torch.allclose(wide(x9), plain(x3), atol=1e-4)


def test_neighbour_channels_are_below_slice_above_and_share_one_augmentation(tmp_path):
    # Three slices of one series, each a distinct constant in the brain window (40, 80):
    # HU 10, 40, 70 -> 64, 159, 255 after windowing (stored = HU + 1024).
    hu = {"low": 10, "mid": 40, "top": 70}
    paths = {k: make_ct(tmp_path / f"{k}.dcm", np.full((16, 16), v + 1024)) for k, v in hu.items()}
    low, mid, top = (str(paths[k]) for k in ("low", "mid", "top"))
    neighbours = [(low, mid), (low, top), (mid, top), (tmp_path / "gone.dcm", top)]
    ds = SliceDataset([low, mid, top, mid], size=16, neighbours=neighbours)
    assert ds.channels == 3
    first = [int(ds[i][0][:, 8, 8][c]) for i in range(4) for c in range(3)]
    levels = {k: int(read_windowed(p, ds.windows, size=16)[8, 8, 0]) for k, p in paths.items()}
    assert first == [levels[k] for k in ("low", "low", "mid",     # an edge repeats itself
                                         "low", "mid", "top",
                                         "mid", "top", "top",
                                         "mid", "mid", "top")]    # unreadable: the slice again
    # Every window of each of the three slices, one augmentation for all: three copies of
    # one slice must come out as three identical copies, however each was moved.
    square = np.full((32, 32), 1024)
    square[4:12, 18:28] = 200 + 1024  # off centre, so a flip, shift or turn moves it
    below, at, above = (make_ct(tmp_path / f"sq{i}.dcm", square) for i in range(3))
    plain = SliceDataset([at], size=32, neighbours=[(below, above)], neighbour_windows=True)
    wide = SliceDataset([at], size=32, neighbours=[(below, above)], neighbour_windows=True,
                        transform=train_transform())
    still = plain[0][0].numpy()
    assert plain.channels == wide.channels == 9 and still.shape == (9, 32, 32)
    np.testing.assert_array_equal(still[:3], read_windowed(at, size=32).transpose(2, 0, 1))
    moved = 0
    for seed in range(12):
        wide.seed = seed
        image = wide[0][0].numpy()
        np.testing.assert_array_equal(image[0:3], image[3:6])
        np.testing.assert_array_equal(image[3:6], image[6:9])
        moved += (image[:3] != still[:3]).mean() > 0.05
    assert moved >= 6


class _ThreadsSeen(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        import cv2
        return cv2.getNumThreads()


def test_loader_workers_run_opencv_on_one_thread_each():
    # 8 workers with OpenCV's default (a thread per core) would each start a core's worth
    seen = torch.cat(list(make_loader(_ThreadsSeen(), 2, workers=2)))
    assert seen.tolist() == [1, 1, 1, 1]
