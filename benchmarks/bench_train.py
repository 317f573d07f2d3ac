"""Training and inference speed: the model alone, and the model fed by the real loader.

    python benchmarks/bench_train.py [--arch resnet18] [--size 128] [--batch-size 32]
                                     [--workers 2] [--steps 10] [--precision fp32]
                                     [--no-channels-last] [--compile [BACKEND]]
                                     [--phases train inference] [--json FIGURES.json]

Three figures per phase: the model alone on random tensors already on the device
(the ceiling), the loader alone reading DICOM files (``utils.data.SliceDataset`` from
512x512 files written like the real ones), and the model fed by that loader. Their ratio
says whether the loader is the bottleneck: fed/alone near 1 means it is not. On a GPU run
it with e.g. ``--arch resnext101_32x8d --size 512 --precision bf16 --workers 16``
(``--amp`` is the older spelling of ``--precision auto``: bf16 on CUDA, fp32 on the CPU).
``--json`` also writes the figures to a file (benchmarks/gpu_check.sh collects them).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.runtime import PRECISIONS, Runtime, setup_runtime  # noqa: E402
from utils import data as data_utils  # noqa: E402
from utils.atomic import atomic_write  # noqa: E402
from utils.demo import write_plain_slices  # noqa: E402
from utils.engine import Dist, weighted_bce  # noqa: E402
from utils.model import build_model  # noqa: E402

PHASES = ("train", "inference")


@dataclass
class Bench:
    """What one timed step needs: the model as called (compiled or not) and how."""
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 alone
    rt: Runtime
    channels_last: bool

    def step(self, images: torch.Tensor, target: torch.Tensor, train: bool) -> None:
        x = data_utils.to_device_normalized(images, self.rt.device)
        if not self.channels_last:
            x = x.contiguous()
        with torch.set_grad_enabled(train), self.rt.autocast():
            logits = self.net(x)
        if train:
            loss = weighted_bce(logits, target.to(self.rt.device), torch.ones(len(x), device=self.rt.device))
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()

    def sync(self) -> None:
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize()


def images_per_second(batches, warmup: int, step=lambda images, target: None, sync=lambda: None) -> float:
    """Images per second over the batches after the first ``warmup`` (at least one), which
    are not timed (compilation, cuDNN's algorithm search, the loader's workers starting).
    The clock starts once the last of them is done: each timed batch is read and stepped."""
    seen, t0 = 0, None
    for i, (images, target) in enumerate(batches):
        step(images, target)
        if i == warmup - 1:
            sync()
            t0 = time.perf_counter()
        elif i >= warmup:
            seen += len(images)
    sync()
    return seen / (time.perf_counter() - t0)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--steps", type=int, default=10, help="timed batches per figure")
    ap.add_argument("--precision", choices=("auto", *PRECISIONS), default="fp32",
                    help="autocast dtype, as kernel.py's --precision (auto: bf16 on CUDA, fp32 on the CPU)")
    ap.add_argument("--amp", action="store_true", help="the same as --precision auto")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                    help="model and inputs in channels_last, as kernel.py trains")
    ap.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                    help="torch.compile the model (default backend inductor)")
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures here")
    args = ap.parse_args(argv)
    if args.amp:
        args.precision = "auto"
    return args


def make_bench(args: argparse.Namespace) -> Bench:
    rt = setup_runtime(Dist(), args.precision)
    model = build_model(args.arch).to(rt.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(rt.device.type) if rt.amp_dtype == torch.float16 else None
    net = torch.compile(model, backend=args.compile) if args.compile else model
    return Bench(net, optimizer, scaler, rt, args.channels_last)


def measure(args: argparse.Namespace, bench: Bench) -> dict:
    """The figures: loader alone, then per phase the model alone and fed by the loader."""
    # The workers prefetch two batches each before the first is used: a shorter warm-up
    # would time batches read while the model was starting, and flatter a slow loader.
    fed_warmup = 2 + 2 * args.workers
    random_batches = [(torch.randint(0, 256, (args.batch_size, 3, args.size, args.size), dtype=torch.uint8),
                       torch.randint(0, 2, (args.batch_size, 6)).float())] * (2 + args.steps)
    n_images = (fed_warmup + args.steps) * args.batch_size
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_plain_slices(tmp, 64)
        ds = data_utils.SliceDataset(paths * (n_images // len(paths) + 1), size=args.size,
                                     transform=data_utils.train_transform())
        loader = data_utils.make_loader(torch.utils.data.Subset(ds, range(n_images)), args.batch_size,
                                        workers=args.workers)

        def from_files():
            for images, target, _, _ in loader:
                yield images, target

        figures["loader_alone"] = images_per_second(from_files(), fed_warmup)
        for phase in args.phases:
            train = phase == "train"
            bench.net.train(train)
            step = functools.partial(bench.step, train=train)
            alone = images_per_second(random_batches, 2, step, bench.sync)
            fed = images_per_second(from_files(), fed_warmup, step, bench.sync)
            figures[phase] = {"alone": alone, "fed": fed, "ratio": fed / alone}
    return figures


def main(argv=None) -> dict:
    args = parse_args(argv)
    bench = make_bench(args)
    device = bench.rt.device
    precision = next(name for name, dtype in PRECISIONS.items() if dtype == bench.rt.amp_dtype)
    processor = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"{args.arch} at {args.size}px, batch {args.batch_size}, {args.workers} loader workers, "
          f"{device} ({processor}, {os.cpu_count()} cores), torch {torch.__version__}, {precision}, "
          f"channels_last {args.channels_last}, compile {args.compile or 'off'}")
    figures = measure(args, bench)
    print(f"loader alone (DICOM 512x512 -> {args.size}px, augmented): {figures['loader_alone']:8.1f} images/s")
    for phase in args.phases:
        f = figures[phase]
        print(f"{phase:9s}: model alone {f['alone']:8.1f} images/s, fed by the loader {f['fed']:8.1f} "
              f"images/s, ratio {f['ratio']:.2f}")
    result = {"arch": args.arch, "size": args.size, "batch_size": args.batch_size, "workers": args.workers,
              "steps": args.steps, "precision": precision, "channels_last": args.channels_last,
              "compile": args.compile, "device": processor, "torch": torch.__version__, **figures}
    if args.json is not None:
        atomic_write(args.json, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    return result


if __name__ == "__main__":
    main()
