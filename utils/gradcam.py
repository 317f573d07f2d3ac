"""Grad-CAM heatmaps: where in a slice the network found the class it predicts.

Grad-CAM (Selvaraju et al. 2017) weighs each channel of the last convolutional block's
feature map by the spatial mean of the class logit's gradient over it, sums, and keeps the
positive part: a coarse map (8x8 at 256 px for a ResNet) upsampled to the image. It is
computed with plain torch hooks and ``torch.autograd.grad`` (gradients of the activations
only), so the model's parameters, their ``.grad`` and its train/eval flags are as they were.
"""
from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.engine import unwrap

OVERLAY_ALPHA = 0.5   # at the hottest pixel; where the map is 0 the slice shows unchanged
OVERLAY_CMAP = "turbo"  # jet's hues, without its false bands


def grad_cam(model: nn.Module, images: torch.Tensor, class_index: int | Sequence[int],
             layer: nn.Module | None = None) -> np.ndarray:
    """Heatmaps (N, H, W) float32 in [0, 1] of ``class_index`` (one for all images, or one
    per image) for the already normalised batch ``images`` (N, C, H, W) on the model's device.

    ``layer`` defaults to the last module, in the order the forward pass runs them, whose
    output is a feature map (4-D, more than one pixel): ``layer4`` of a torchvision
    ResNet/ResNeXt (its blocks finish before it; the 1x1 average pool is not a map), the
    last conv or activation of a plain stack. A module called several times counts by its
    last call. The class score is the logit, before the sigmoid. Each map is divided by its
    maximum; a map with no positive evidence stays all zero. The model runs in eval mode
    (batch norm on its running statistics, so images do not see each other), whatever mode
    it is in; DDP and torch.compile wrappers are looked through.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be a (N, C, H, W) batch, got shape {tuple(images.shape)}")
    net = unwrap(model)
    modes = {m: m.training for m in net.modules()}
    found: dict[str, torch.Tensor] = {}

    def keep(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[2] * output.shape[3] > 1:
            found["map"] = output
        elif module is layer:
            raise ValueError(f"layer {type(layer).__name__} gives no feature map "
                             f"(its output: {type(output).__name__} {tuple(getattr(output, 'shape', ()))})")

    watched = [layer] if layer is not None else list(net.modules())
    handles = [m.register_forward_hook(keep) for m in watched]
    try:
        net.eval()
        with torch.enable_grad():
            # Gradients flow from the input even through a frozen (requires_grad False) model.
            logits = net(images.detach().requires_grad_(True))
            if "map" not in found:
                raise ValueError("the model produced no feature map to explain")
            score = _class_logits(logits, class_index).sum()  # image i's logit depends on image i only
            grads, = torch.autograd.grad(score, found["map"])
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.train(training)
    return _weigh_and_scale(found["map"].detach().float(), grads.float(), images.shape[2:])


def _class_logits(logits: torch.Tensor, class_index) -> torch.Tensor:
    """Each image's logit of its class; class_index an int or one per image."""
    if logits.ndim != 2:
        raise ValueError(f"the model must return (N, classes) logits, got shape {tuple(logits.shape)}")
    n, classes = logits.shape
    index = torch.as_tensor(class_index, dtype=torch.long, device=logits.device)
    if index.ndim > 1 or (index.ndim == 1 and len(index) != n):
        raise ValueError(f"class_index must be an int or one per image ({n}), got {class_index!r}")
    if ((index < 0) | (index >= classes)).any():
        raise ValueError(f"class_index {class_index!r} is outside the model's {classes} classes")
    return logits.gather(1, index.expand(n)[:, None])[:, 0]


def _weigh_and_scale(acts: torch.Tensor, grads: torch.Tensor, size) -> np.ndarray:
    """relu(sum over channels of mean gradient x activation), upsampled, each map over its max."""
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * acts).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    peak = cam.amax(dim=(1, 2), keepdim=True)
    cam = torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))
    return cam.clamp_(0, 1).cpu().numpy().astype(np.float32)


def overlay(gray: np.ndarray, cam: np.ndarray, alpha: float = OVERLAY_ALPHA,
            cmap: str = OVERLAY_CMAP) -> np.ndarray:
    """RGB uint8 (H, W, 3): the heatmap ``cam`` (H, W, in [0, 1]) in colour over the uint8
    slice ``gray`` (H, W), e.g. its brain window. Each pixel mixes in ``alpha`` x cam of the
    colour, so the slice shows unchanged where the network did not look."""
    gray, cam = np.asarray(gray), np.asarray(cam, dtype=np.float32)
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"gray must be a (H, W) uint8 image, got {gray.dtype} {gray.shape}")
    if cam.shape != gray.shape:
        raise ValueError(f"cam {cam.shape} and gray {gray.shape} must have the same shape")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    cam = np.clip(np.nan_to_num(cam), 0, 1)
    colour = matplotlib.colormaps[cmap](cam)[..., :3] * 255.0
    weight = alpha * cam[..., None]
    out = (1 - weight) * gray[..., None].astype(np.float32) + weight * colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
