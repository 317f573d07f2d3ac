"""utils.model: architectures, the 6-output head, and weights from local files only."""
import pickle

import pytest
import torch

from utils.model import (WeightsError, available_archs, build_model, clean_state_dict,
                         create_model, find_weights, load_pretrained)


def test_archs_and_head():
    assert {"resnext101_32x8d", "resnext50_32x4d", "resnet18"} <= set(available_archs())
    model = build_model("resnet18")
    assert model.fc.out_features == 6
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 6)
    with pytest.raises(ValueError, match="unknown arch"):
        create_model("vit_b_16")


@pytest.fixture
def imagenet_file(tmp_path):
    """A torchvision-style checkpoint: resnet18 with its 1000-class head."""
    torch.manual_seed(0)
    state = create_model("resnet18").state_dict()
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(state, path)
    return path, state


def test_loads_torchvision_file_and_replaces_head(imagenet_file):
    path, state = imagenet_file
    model = build_model("resnet18", path)
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert model.fc.out_features == 6


@pytest.mark.parametrize("wrap", [
    lambda s: {"state_dict": {"module." + k: v for k, v in s.items()}},
    lambda s: {"model": {"_orig_mod." + k: v for k, v in s.items()}, "epoch": 3},
    lambda s: {"module._orig_mod." + k: v for k, v in s.items()},
])
def test_loads_wrapped_checkpoints(tmp_path, imagenet_file, wrap):
    _, state = imagenet_file
    path = tmp_path / "wrapped.pt"
    torch.save(wrap(state), path)
    model = build_model("resnet18", path)
    assert torch.equal(model.conv1.weight, state["conv1.weight"])


def test_wrong_architecture_is_refused(imagenet_file):
    path, _ = imagenet_file
    with pytest.raises(WeightsError, match="wrong shape"):
        build_model("resnet50", path)


def test_missing_keys_fail_unless_not_strict(tmp_path, imagenet_file):
    _, state = imagenet_file
    partial = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    with pytest.raises(WeightsError, match="missing keys"):
        build_model("resnet18", path)
    missing, unexpected = load_pretrained(create_model("resnet18"), path, strict=False)
    assert missing and all(k.startswith("layer4.") for k in missing) and unexpected == []


def test_not_strict_loading_says_what_it_left_out(tmp_path, imagenet_file, caplog):
    _, state = imagenet_file
    partial = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    partial["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    with caplog.at_level("WARNING", logger="utils.model"):
        missing, _ = load_pretrained(create_model("resnet18"), path, strict=False)
    message = caplog.text
    assert len(missing) > 20 and f"{len(missing)} missing keys (first: {missing[0]}" in message
    assert "1 unexpected keys (first: extra.weight)" in message and str(path) in message


def test_adapt_input_conv_follows_timm_rule():
    from utils.model import adapt_input_conv
    w = torch.randn(4, 3, 5, 5)
    assert torch.equal(adapt_input_conv(w, 3), w)
    assert torch.allclose(adapt_input_conv(w, 1), w[:, :1] + w[:, 1:2] + w[:, 2:])
    five = adapt_input_conv(w, 5)
    assert torch.allclose(five, torch.cat([w, w[:, :2]], dim=1) * 3 / 5)
    # an image repeated on every channel gives the response it gives on three
    x = torch.randn(1, 1, 9, 9)
    conv = torch.nn.functional.conv2d
    for n in (1, 6, 9):
        assert torch.allclose(conv(x.expand(1, n, 9, 9), adapt_input_conv(w, n)),
                              conv(x.expand(1, 3, 9, 9), w), atol=1e-5)


@pytest.mark.parametrize("channels,slices", [(1, 1), (2, 1), (5, 1), (6, 3), (3, 3)])
def test_pretrained_weights_take_any_number_of_windows(imagenet_file, channels, slices):
    from utils.model import adapt_input_conv
    path, state = imagenet_file
    model = build_model("resnet18", path, in_channels=channels, slices=slices)
    per_slice = channels // slices
    w = model.conv1.weight
    assert w.shape[1] == channels and model.eval()(torch.zeros(1, channels, 32, 32)).shape == (1, 6)
    middle = slices // 2 * per_slice
    assert torch.allclose(w[:, middle:middle + per_slice], adapt_input_conv(state["conv1.weight"], per_slice))
    assert not w[:, :middle].any() and not w[:, middle + per_slice:].any()  # neighbours start at 0


class _Evil:
    def __reduce__(self):
        return (print, ("this code ran",))


def test_pickle_carrying_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": _Evil()}, f)
    torch.save({"x": _Evil()}, tmp_path / "evil2.pth")
    for p in (path, tmp_path / "evil2.pth"):
        with pytest.raises(WeightsError, match="cannot be loaded as plain weights"):
            build_model("resnet18", p)
    assert "this code ran" not in capsys.readouterr().out


def test_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(WeightsError, match="no state dict"):
        build_model("resnet18", path)
    with pytest.raises(WeightsError, match="no such weights file"):
        build_model("resnet18", tmp_path / "absent.pth")


def test_clean_state_dict_strips_prefixes():
    t = torch.zeros(1)
    assert list(clean_state_dict({"module.fc.weight": t, "conv1.weight": t})) == ["fc.weight", "conv1.weight"]


def test_find_weights_in_usual_places(tmp_path):
    assert find_weights("resnext101_32x8d", [tmp_path]) is None
    nested = tmp_path / "kaggle" / "input" / "wsl-weights"
    nested.mkdir(parents=True)
    (nested / "ig_resnext101_32x8-c38310e5.pth").write_bytes(b"x")
    (nested / "resnext50_32x4d-7cdf4587.pth").write_bytes(b"x")
    assert find_weights("resnext101_32x8d", [tmp_path]).name == "ig_resnext101_32x8-c38310e5.pth"
    assert find_weights("resnext50_32x4d", [tmp_path]).name == "resnext50_32x4d-7cdf4587.pth"
    assert find_weights("resnet18", [tmp_path]) is None


def test_widened_pretrained_input_starts_as_the_single_slice_network():
    import copy

    from utils.model import adapt_input
    torch.manual_seed(0)
    plain = create_model("resnet18").eval()
    wide = adapt_input(copy.deepcopy(plain), 9, slices=3).eval()
    assert wide.conv1.in_channels == 9 and adapt_input(plain, 3) is plain
    x, below, above = torch.randn(3, 2, 3, 32, 32)
    # whatever the neighbours show, the output is the pretrained network's on the middle slice
    assert torch.allclose(wide(torch.cat([below, x, above], dim=1)), plain(x), atol=1e-5)
    assert torch.equal(wide.conv1.weight[:, 3:6], plain.conv1.weight)
    assert not wide.conv1.weight[:, :3].any() and not wide.conv1.weight[:, 6:].any()
    for channels, slices in ((4, 3), (6, 2)):  # unequal slices, or no middle slice
        with pytest.raises(ValueError, match="odd number of slices"):
            adapt_input(copy.deepcopy(plain), channels, slices)


def test_widened_input_from_scratch_starts_on_the_average_of_the_slices():
    torch.manual_seed(0)
    plain = create_model("resnet18").conv1.weight
    torch.manual_seed(0)
    w = build_model("resnet18", in_channels=9).conv1.weight
    assert w.shape == (64, 9, 7, 7)
    for group in range(3):  # one random filter bank, a third of it on each slice
        assert torch.allclose(w[:, 3 * group:3 * group + 3], plain / 3)
    x = torch.randn(1, 3, 16, 16)
    below, above = torch.randn(2, 1, 3, 16, 16)
    stacked = torch.nn.functional.conv2d(torch.cat([below, x, above], dim=1), w)
    assert torch.allclose(stacked, torch.nn.functional.conv2d((below + x + above) / 3, plain), atol=1e-5)
    assert build_model("resnet18", in_channels=4).conv1.in_channels == 4
