"""Backbone + 6-output head, and pretrained weights loaded from a local file only.

Kaggle submissions run without internet, so weights come as an attached file; nothing
here ever downloads. Files load with ``weights_only=True``: a pickle carrying code is
refused instead of executed.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
import torchvision
from torch import nn

NUM_CLASSES = 6
_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
# Where the usual files are named differently from the arch (the WSL weights).
_EXTRA_NAMES = {"resnext101_32x8d": ("ig_resnext101_32x8*.pth",)}
log = logging.getLogger(__name__)


class WeightsError(Exception):
    """A weights file that cannot be used for the requested model."""


def available_archs() -> list[str]:
    return sorted(n for n in torchvision.models.list_models(module=torchvision.models)
                  if n.startswith(("resnet", "resnext", "wide_resnet")))


def create_model(arch: str) -> nn.Module:
    """An untrained torchvision ResNet/ResNeXt with the usual 1000-class head."""
    if arch not in available_archs():
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(available_archs())}")
    return getattr(torchvision.models, arch)(weights=None)


def replace_head(model: nn.Module, num_classes: int = NUM_CLASSES) -> nn.Module:
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def clean_state_dict(state: dict) -> dict:
    """Unwrap checkpoint dicts and strip DDP / compile prefixes so any file loads."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError("the file holds no state dict of tensors")
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def load_pretrained(model: nn.Module, path, strict: bool = True) -> tuple[list, list]:
    """Load backbone weights from ``path`` into a model that still has its 1000-class head.

    The file's classifier (``fc.*``) is dropped: its class count never matches ours.
    Returns (missing, unexpected) keys; with ``strict`` any of them is a WeightsError.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refusals come as several exception types
        raise WeightsError(f"{path}: cannot be loaded as plain weights "
                           f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    try:
        state = clean_state_dict(state)
    except WeightsError as err:
        raise WeightsError(f"{path}: {err}") from None
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise WeightsError(f"{path}: {len(mismatched)} tensors have the wrong shape for this "
                           f"architecture (first: {mismatched[0]} {tuple(state[mismatched[0]].shape)} "
                           f"vs {tuple(own[mismatched[0]].shape)}); is it the right --arch?")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    unexpected = list(result.unexpected_keys)
    if not (missing or unexpected):
        return missing, unexpected
    keys = (f"{len(missing)} missing keys (first: {', '.join(missing[:3]) or '-'}), "
            f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3]) or '-'})")
    if strict:
        raise WeightsError(f"{path}: {keys}; pass --weights-strict false to load anyway")
    log.warning(f"Weights {path}: {keys}; the rest loaded (--weights-strict false), the "
                f"missing ones keep their random initialisation")
    return missing, unexpected


def find_weights(arch: str, search_dirs=None) -> Path | None:
    """A local weights file for ``arch`` in the usual places, or None."""
    if search_dirs is None:
        torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
        search_dirs = [torch_home / "hub" / "checkpoints", Path("/kaggle/input")]
    patterns = (f"{arch}-*.pth", f"{arch}.pth", *_EXTRA_NAMES.get(arch, ()))
    for folder in map(Path, search_dirs):
        if not folder.is_dir():
            continue
        for pattern in patterns:
            hits = sorted(folder.rglob(pattern))
            if hits:
                return hits[0]
    return None


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB filters (out, 3, k, k) for ``in_channels`` inputs, the way timm adapts them: one
    channel gets their sum; N channels get them in turn, repeated, scaled by 3/N. An image
    repeated on every channel then gives the response it gives on three (exactly for 1 and
    multiples of 3, in scale for the rest)."""
    rgb = weight.shape[1]
    if in_channels == rgb:
        return weight.clone()
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = math.ceil(in_channels / rgb)
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (rgb / in_channels)


def adapt_input(model: nn.Module, in_channels: int, slices: int = 1,
                pretrained: bool = True) -> nn.Module:
    """Take ``in_channels`` inputs: ``slices`` neighbouring slices (the one classified in
    the middle, as utils.data.SliceDataset stacks them) of in_channels / slices windows.

    Each slice's windows get the first conv's filters through adapt_input_conv.
    Pretrained, with several slices: the filters go to the middle slice and the neighbours'
    start at zero, so training starts from exactly the single-slice network, whatever the
    neighbours show, and learns what they add. (Spreading the filters over all slices
    would show the network their average at first: a thin bleed on one slice at a third
    of its contrast.)
    From scratch there is no network to keep: the random filters are spread over all the
    channels, so it starts on the slices' average, a less noisy image, and learns to tell
    them apart. On the demo that trained better than filters drawn independently for each
    slice (BENCHMARKS.md, "Slice context").
    """
    old = model.conv1
    if in_channels == old.in_channels and slices == 1:
        return model
    per_slice, extra = divmod(in_channels, slices)
    if extra or slices % 2 == 0:
        raise ValueError(f"in_channels must be an odd number of slices of equal width "
                         f"(a middle slice and its neighbours), got {in_channels} over {slices}")
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    bias=old.bias is not None)
    with torch.no_grad():
        if pretrained and slices > 1:
            new.weight.zero_()
            middle = slices // 2 * per_slice
            new.weight[:, middle:middle + per_slice] = adapt_input_conv(old.weight, per_slice)
        else:
            new.weight.copy_(adapt_input_conv(old.weight, in_channels))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    model.conv1 = new
    return model


def build_model(arch: str, weights=None, strict: bool = True, in_channels: int = 3,
                slices: int = 1) -> nn.Module:
    """The classifier for the task: ``weights`` a local file or None for random init."""
    model = create_model(arch)
    if weights is not None:
        load_pretrained(model, weights, strict=strict)
    return replace_head(adapt_input(model, in_channels, slices, pretrained=weights is not None))


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's pooled features (N, fc.in_features) of a torchvision ResNet or ResNeXt:
    its forward without the head, so ``model.fc(pooled_features(model, x))`` is ``model(x)``.
    What the embedding refiner reads besides the logits (utils/refiner.py)."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return torch.flatten(model.avgpool(x), 1)


def resolve_weights(weights: str | None, arch: str) -> str | None:
    """The weights file to start from: ``weights``, None for "none" (random init), or the
    one find_weights finds for ``arch``; a WeightsError saying what to do when none is."""
    if weights is not None and weights.lower() == "none":
        return None
    if weights is not None:
        return weights
    found = find_weights(arch)
    if found is None:
        raise WeightsError(
            f"no pretrained weights for {arch} were found (searched $TORCH_HOME/hub/checkpoints "
            f"and /kaggle/input). Attach them as a file and pass --weights PATH (for example "
            f"ig_resnext101_32x8-c38310e5.pth or torchvision's {arch}-*.pth), or pass "
            f"--weights none to train from random initialisation on purpose.")
    log.info(f"Weights: found {found}")
    return str(found)
