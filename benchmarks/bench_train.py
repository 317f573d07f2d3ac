"""Training and inference speed: the model alone, and the model fed by the real loader.

    python benchmarks/bench_train.py [--arch resnet18] [--size 128] [--batch-size 32]
                                     [--workers 2] [--steps 10] [--amp]

Three figures per phase: the model alone on random tensors already on the device
(the ceiling), the loader alone reading DICOM files (``utils.data.SliceDataset`` from
512x512 files written like the real ones), and the model fed by that loader. Their ratio
says whether the loader is the bottleneck: fed/alone near 1 means it is not. On a GPU run
it with e.g. ``--arch resnext101_32x8d --size 512 --amp``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils import data as data_utils  # noqa: E402
from utils.demo import write_plain_slices  # noqa: E402
from utils.engine import weighted_bce  # noqa: E402
from utils.model import build_model  # noqa: E402


def loop(model, batches, device, train: bool, autocast, optimizer=None) -> float:
    """Images per second over the batches (the first two are warm-up and not timed)."""
    model.train(train)
    seen, t0 = 0, None
    for i, (images, target) in enumerate(batches):
        if i == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, seen = time.perf_counter(), 0
        x = data_utils.to_device_normalized(images, device)
        with torch.set_grad_enabled(train), autocast():
            logits = model(x)
        if train:
            loss = weighted_bce(logits, target.to(device), torch.ones(len(x), device=device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seen += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if args.amp and device.type == "cuda"
                else contextlib.nullcontext)
    model = build_model(args.arch).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    n_batches = args.steps + 2
    print(f"{args.arch} at {args.size}px, batch {args.batch_size}, {args.workers} loader workers, "
          f"{device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores), torch {torch.__version__}, amp {'bf16' if args.amp and device.type == 'cuda' else 'off'}")

    random_batches = [(torch.randint(0, 256, (args.batch_size, 3, args.size, args.size), dtype=torch.uint8),
                       torch.randint(0, 2, (args.batch_size, 6)).float())] * n_batches
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_plain_slices(tmp, 64)
        ds = data_utils.SliceDataset(paths * (n_batches * args.batch_size // len(paths) + 1),
                                     size=args.size, transform=data_utils.train_transform())
        loader = data_utils.make_loader(torch.utils.data.Subset(ds, range(n_batches * args.batch_size)),
                                        args.batch_size, workers=args.workers)

        def from_files():
            for images, target, _, _ in loader:
                yield images, target

        t0 = time.perf_counter()
        n = sum(len(images) for images, _ in from_files())
        loader_rate = n / (time.perf_counter() - t0)
        results = {}
        for phase, train in (("train", True), ("inference", False)):
            alone = loop(model, random_batches, device, train, autocast, optimizer)
            fed = loop(model, from_files(), device, train, autocast, optimizer)
            results[phase] = (alone, fed)
    print(f"loader alone (DICOM 512x512 -> {args.size}px, augmented): {loader_rate:8.1f} images/s")
    for phase, (alone, fed) in results.items():
        print(f"{phase:9s}: model alone {alone:8.1f} images/s, fed by the loader {fed:8.1f} images/s, "
              f"ratio {fed / alone:.2f}")


if __name__ == "__main__":
    main()
