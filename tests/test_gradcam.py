"""utils.gradcam: the heatmap points at the lesion, and leaves the model as it found it."""
import matplotlib
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from utils.gradcam import grad_cam, overlay
from utils.model import build_model

H, W = 40, 56  # not square: a swapped axis moves the peak off the blob
BLOBS = [(slice(8, 14), slice(36, 44)), (slice(26, 33), slice(6, 12))]  # one per image


def bright_spot_net() -> nn.Module:
    """Fixed weights: a box filter thresholded at half brightness (fires on bright areas),
    a stride-2 average (a coarser map, as in a real backbone), global average pooling and a
    head whose class 0 counts bright area and class 1 counts against it."""
    conv1, conv2 = nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, stride=2, padding=1)
    head = nn.Linear(1, 2)
    with torch.no_grad():
        conv1.weight.fill_(1 / 9), conv1.bias.fill_(-0.5)
        conv2.weight.fill_(1 / 9), conv2.bias.zero_()
        head.weight.copy_(torch.tensor([[1.0], [-1.0]])), head.bias.zero_()
    return nn.Sequential(conv1, nn.ReLU(), conv2, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def blob_images() -> tuple[torch.Tensor, np.ndarray]:
    images, masks = torch.zeros(len(BLOBS), 1, H, W), np.zeros((len(BLOBS), H, W), bool)
    for i, (rows, cols) in enumerate(BLOBS):
        images[i, 0, rows, cols] = 1.0
        masks[i, rows, cols] = True
    return images, masks


def test_heatmap_peaks_on_the_bright_blob_and_is_zero_far_from_it():
    images, masks = blob_images()
    with torch.no_grad():  # as in predict(): grad_cam turns gradients back on itself
        cam = grad_cam(bright_spot_net(), images, 0)
    assert cam.shape == (len(BLOBS), H, W) and cam.dtype == np.float32
    for i in range(len(BLOBS)):
        peak = np.unravel_index(cam[i].argmax(), (H, W))
        assert ndimage.binary_dilation(masks[i], iterations=2)[peak], (i, peak)
        assert cam[i].max() == pytest.approx(1.0)
        far = ~ndimage.binary_dilation(masks[i], iterations=6)
        assert cam[i][far].max() < 1e-6  # the other image's blob included: no cross-talk
    # class 1 counts against bright area: no positive evidence anywhere, an all-zero map
    assert not grad_cam(bright_spot_net(), images, 1).any()


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    model = build_model("resnet18")
    with torch.no_grad():  # random heads differ per class; make sure they differ a lot
        model.fc.weight[1] = -model.fc.weight[0]
    return model


def test_resnet_maps_leave_no_hooks_grads_or_changed_state(resnet):
    x = torch.randn(3, 3, 64, 64)
    resnet.train()  # batch norm would update its running statistics if it ran in train mode
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    cam = grad_cam(resnet, x, 0)
    assert cam.shape == (3, 64, 64) and cam.dtype == np.float32
    assert cam.min() >= 0 and cam.max() <= 1 and np.allclose(cam.max(axis=(1, 2)), 1)
    for name, module in resnet.named_modules():
        assert not (module._forward_hooks or module._backward_hooks or module._forward_pre_hooks), name
        assert module.training, name
    assert all(p.grad is None for p in resnet.parameters())
    assert all(torch.equal(before[k], v) for k, v in resnet.state_dict().items())
    assert np.array_equal(cam, grad_cam(resnet, x, 0, layer=resnet.layer4))  # the default layer


def test_per_image_class_index(resnet):
    x = torch.randn(3, 3, 64, 64)
    resnet.eval()
    zero, one = grad_cam(resnet, x, 0), grad_cam(resnet, x, 1)
    assert np.abs(zero - one).max() > 0.1
    mixed = grad_cam(resnet, x, [0, 1, 0])
    np.testing.assert_allclose(mixed[[0, 2]], zero[[0, 2]], atol=1e-5)
    np.testing.assert_allclose(mixed[1], one[1], atol=1e-5)
    with pytest.raises(ValueError, match="one per image"):
        grad_cam(resnet, x, [0, 1])
    with pytest.raises(ValueError, match="outside"):
        grad_cam(resnet, x, 6)
    assert not any(m._forward_hooks for m in resnet.modules())  # not even after an error


def test_wrapped_and_frozen_models_give_the_same_map(resnet):
    class Compiled(nn.Module):  # what torch.compile puts around a model
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

        def forward(self, x):
            return self._orig_mod(x)

    x = torch.randn(2, 3, 64, 64)
    plain = grad_cam(resnet, x, 2)
    np.testing.assert_allclose(grad_cam(Compiled(resnet), x, 2), plain, atol=1e-6)
    resnet.requires_grad_(False)
    np.testing.assert_allclose(grad_cam(resnet, x, 2), plain, atol=1e-6)
    assert not any(p.requires_grad for p in resnet.parameters())


def test_a_layer_without_a_feature_map_is_refused(resnet):
    with pytest.raises(ValueError, match="no feature map"):
        grad_cam(resnet, torch.randn(1, 3, 64, 64), 0, layer=resnet.avgpool)  # 1x1: no place
    assert not resnet.avgpool._forward_hooks


def test_overlay_mixes_colour_by_heat():
    gray = np.full((4, 5), 100, np.uint8)
    cam = np.zeros((4, 5), np.float32)
    cam[1, 2] = 1.0
    out = overlay(gray, cam, alpha=0.5)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    assert (out[cam == 0] == 100).all()  # no heat: the slice unchanged
    hot = np.array(matplotlib.colormaps["turbo"](1.0)[:3]) * 255
    np.testing.assert_array_equal(out[1, 2], np.rint(0.5 * 100 + 0.5 * hot).astype(np.uint8))
    with pytest.raises(ValueError, match="same shape"):
        overlay(gray, cam.T)
    with pytest.raises(ValueError, match="uint8"):
        overlay(gray.astype(np.float32), cam)
