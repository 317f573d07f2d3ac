"""Dataset, augmentation and loaders: DICOM files windowed on the fly into uint8 tensors.

Images leave the workers as uint8 (a quarter of float32's bytes through the pipes and
the PCIe bus); conversion to float and ImageNet normalisation happen on the device.
"""
from __future__ import annotations

import functools
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network: skip its version check

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from utils.dicom import DEFAULT_WINDOWS, DicomError
from utils.sources import read_windowed, read_windowed_box
from utils.engine import sample_seed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform() -> A.Compose:
    """Mild geometric and intensity jitter; heads are roughly centred and upright."""
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10),
                 fill=0, p=0.7),
        A.RandomBrightnessContrast(brightness_limit=0.08, contrast_limit=0.08, p=0.5),
    ])


class SliceDataset(Dataset):
    """Slices read from DICOM files, their frames or NIfTI volumes (``paths`` are
    utils.sources' slice references): (uint8 CxHxW image, float targets, index, readable).

    An unreadable file yields a zero image with ``readable`` False instead of killing a
    worker mid-epoch; the training loop leaves it out of the loss and the caller lists it.
    Augmentation is seeded per sample from (seed, epoch, index): set ``epoch`` before each
    epoch, and the same sample gets the same augmentation in any worker, in any run.

    With ``crop`` "head" each slice is cut to its head before resizing (utils.crop); its
    neighbours are cut to the same box.

    With ``neighbours`` (the paths of the slices below and above each one, from
    utils.slices.neighbour_paths) the channels become neighbouring slices: with
    ``neighbour_windows`` False, the first window of the slice below, the slice, and the
    slice above (3 channels: pretrained weights apply unchanged); with it True, every
    window of each of the three (3 x windows channels).
    """

    def __init__(self, paths, labels: np.ndarray | None = None, windows=DEFAULT_WINDOWS,
                 size: int = 256, transform=None, seed: int = 0, neighbours=None,
                 neighbour_windows: bool = False, crop: str = "none"):
        self.paths = [str(p) for p in paths]
        n_labels = 6 if labels is None else labels.shape[1]
        self.labels = (np.zeros((len(self.paths), n_labels), np.float32) if labels is None
                       else np.asarray(labels, dtype=np.float32))
        if len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} label rows")
        self.windows, self.size, self.transform = tuple(windows), int(size), transform
        self.seed, self.epoch = seed, 0
        self.neighbours = None if neighbours is None else [tuple(map(str, n)) for n in neighbours]
        if self.neighbours is not None and len(self.neighbours) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(self.neighbours)} neighbour pairs")
        if self.neighbours is not None and not neighbour_windows:
            self.windows = self.windows[:1]
        self.channels = len(self.windows) * (1 if self.neighbours is None else 3)
        self.crop = crop

    def _read(self, i: int) -> np.ndarray:
        img, box = read_windowed_box(self.paths[i], self.windows, size=self.size, crop=self.crop)
        if self.neighbours is None:
            return img
        below, above = self.neighbours[i]
        stack = []
        for path in (below, above):  # cut to the slice's own box: the channels stay aligned
            try:
                stack.append(img if path == self.paths[i] else read_windowed(path, self.windows, size=self.size, crop=box))
            except DicomError:
                stack.append(img)  # an unreadable neighbour: repeat the slice, as at an edge
        return np.concatenate([stack[0], img, stack[1]], axis=2)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img, ok = self._read(i), True
        except DicomError:
            img, ok = np.zeros((self.size, self.size, self.channels), np.uint8), False
        if self.transform is not None and ok:
            self.transform.set_random_seed(sample_seed(self.seed, self.epoch, i))
            img = self.transform(image=img)["image"]
        image = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        return image, torch.from_numpy(self.labels[i]), i, ok


def make_loader(dataset: Dataset, batch_size: int, *, workers: int, sampler=None) -> DataLoader:
    """Batches in the sampler's order (the dataset's order without one)."""
    if workers:
        # torch gives each worker one thread, OpenCV (resize, albumentations) one per core:
        # 8 workers on 16 cores would run 128 threads, N processes under torchrun N times
        # more. Set before the workers fork: set in a forked worker, OpenCV waits forever
        # for the parent's pool threads, which the fork did not copy.
        cv2.setNumThreads(1)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)


def channel_stats(channels: int, slices: int = 1) -> tuple[list[float], list[float]]:
    """ImageNet mean and std for each input channel: those of the RGB channel whose filters
    it was given (utils.model.adapt_input_conv, slice by slice). A lone window got the sum
    of the three filters, so it gets their average."""
    per_slice = channels // slices
    if per_slice == 1:
        pairs = [(sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3)]
    else:
        pairs = [(IMAGENET_MEAN[j % 3], IMAGENET_STD[j % 3]) for j in range(per_slice)]
    pairs = pairs * slices
    return [m for m, _ in pairs], [s for _, s in pairs]


@functools.lru_cache(maxsize=None)
def _normalization(channels: int, slices: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """channel_stats as (1, C, 1, 1) tensors on the device, made once: a copy from the host
    at every step would wait for the GPU."""
    mean, std = channel_stats(channels, slices)
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1),
            torch.tensor(std, device=device).view(1, -1, 1, 1))


def to_device_normalized(images: torch.Tensor, device: torch.device, slices: int = 1) -> torch.Tensor:
    """uint8 NCHW batch of ``slices`` stacked slices -> normalised float on the device,
    channels_last for the convs."""
    x = images.to(device, non_blocking=True).float().div_(255.0)
    mean, std = _normalization(x.shape[1], slices, torch.device(device))
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)
