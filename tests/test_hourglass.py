"""CornerNet-modified hourglass (REFERENCE §1.1) and the corner/triplet networks built on it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kpnet.backbones.hourglass import HourglassModule, Residual, hourglass52, hourglass104, hourglass_small
from kpnet.detectors.centernet_triplet import CenterNetTriplet
from kpnet.detectors.corner import CornerNetwork
from kpnet.errors import KpnetError
from kpnet.layers import HEAT_BIAS

CORNER_KEYS = {"tl_heat", "br_heat", "tl_tag", "br_tag", "tl_regr", "br_regr"}
TRIPLET_KEYS = CORNER_KEYS | {"ct_heat", "ct_regr"}


def small_triplet(num_stacks: int = 2, num_classes: int = 3) -> CenterNetTriplet:
    torch.manual_seed(0)
    return CenterNetTriplet(hourglass_small(num_stacks=num_stacks), num_classes)


@pytest.mark.parametrize("build,stacks", [(hourglass104, 2), (hourglass52, 1)])
def test_full_hourglass_strides_on_meta(build, stacks):
    """511 and 512 inputs both give 128x128 stride-4 maps of 256 channels, one per stack."""
    with torch.device("meta"):
        net = build()
        for side in (511, 512):
            features = net(torch.empty(1, 3, side, side))
            assert [tuple(f.shape) for f in features] == [(1, 256, 128, 128)] * stacks
    assert net.num_stacks == stacks and net.out_channels == 256


def test_full_hourglass_structure():
    """Five reductions with channels 256/256/384/384/384/512, 2 residuals per branch, 4 in the middle,
    stride-2 residual downsampling and no max-pool anywhere."""
    with torch.device("meta"):
        net = hourglass104()
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in net.modules())
    level, dims = net.kps[0], []
    while isinstance(level, HourglassModule):
        assert len(level.up1) == len(level.low1) == len(level.low3) == 2
        assert level.low1[0].conv1.stride == (2, 2) and level.low1[0].skip[0].stride == (2, 2)
        dims.append(level.up1[0].conv1.in_channels)
        inner = level.low1[-1].conv2.out_channels
        level = level.low2
    assert dims + [inner] == [256, 256, 384, 384, 384, 512]
    assert len(level) == 4 and all(r.conv1.in_channels == r.conv2.out_channels == 512 for r in level)
    assert net.pre[0].conv.kernel_size == (7, 7) and net.pre[0].conv.stride == (2, 2)
    assert net.pre[0].conv.bias is None and net.pre[1].conv1.stride == (2, 2)


def test_residual_skip_only_when_shape_changes():
    assert isinstance(Residual(8, 8).skip, nn.Identity)
    assert isinstance(Residual(8, 16).skip, nn.Sequential)
    assert isinstance(Residual(8, 8, stride=2).skip, nn.Sequential)


def test_hourglass_module_is_nearest_x2_merge():
    """On a divisible input the merge is up1 + nearest x2 upsample of low3(low2(low1(x)))."""
    torch.manual_seed(0)
    module = HourglassModule([4, 6, 8], [1, 1, 2]).eval()
    x = torch.randn(2, 4, 16, 12)
    low = module.low3(module.low2(module.low1(x)))
    expected = module.up1(x) + F.interpolate(low, scale_factor=2, mode="nearest")
    torch.testing.assert_close(module(x), expected)
    assert module(torch.randn(1, 4, 13, 9)).shape == (1, 4, 13, 9)  # odd sides still merge


@pytest.mark.parametrize("side", [64, 127, 100])
def test_small_hourglass_shapes(side):
    net = hourglass_small(num_stacks=2)
    features = net(torch.randn(2, 3, side, side))
    stride4 = ((side + 1) // 2 + 1) // 2
    assert [tuple(f.shape) for f in features] == [(2, net.out_channels, stride4, stride4)] * 2


def test_triplet_train_returns_every_stack_eval_only_last():
    net = small_triplet()
    images = torch.randn(2, 3, 64, 64)
    outputs = net(images)
    assert len(outputs) == 2
    for out in outputs:
        assert set(out) == TRIPLET_KEYS
        assert out["tl_heat"].shape == out["ct_heat"].shape == (2, 3, 16, 16)
        assert out["tl_tag"].shape == (2, 1, 16, 16) and out["ct_regr"].shape == (2, 2, 16, 16)
    net.eval()
    with torch.no_grad():
        (last,) = net(images)
        expected = net.stack_outputs(1, net.backbone(images)[1])
    assert set(last) == TRIPLET_KEYS
    for key in TRIPLET_KEYS:
        torch.testing.assert_close(last[key], expected[key])


def test_cornernet_keys_and_heat_bias():
    net = CornerNetwork(hourglass_small(num_stacks=1), 5)
    (out,) = net(torch.randn(1, 3, 128, 128))
    assert set(out) == CORNER_KEYS
    for heads in (net.tl_heats, net.br_heats):
        torch.testing.assert_close(heads[0][-1].bias, torch.full((5,), HEAT_BIAS))
    assert net.tl_pools[0].directions == ("top", "left") and net.br_pools[0].directions == ("bottom", "right")
    triplet = small_triplet(num_stacks=1, num_classes=5)
    torch.testing.assert_close(triplet.ct_heats[0][-1].bias, torch.full((5,), HEAT_BIAS))


def test_stack1_predictions_not_fed_back():
    """Stack 2's outputs do not depend on stack 1's heads: no gradient reaches them, and changing them
    leaves stack 2 unchanged; stack 1's hourglass does get gradient (its features are merged)."""
    net = small_triplet()
    images = torch.randn(2, 3, 64, 64)
    outputs = net(images)
    sum(o.sum() for o in outputs[1].values()).backward()
    for heads in (net.tl_pools, net.ct_pools, net.tl_heats, net.br_tags, net.ct_regrs):
        assert all(p.grad is None for p in heads[0].parameters())
    assert net.backbone.kps[0].up1[0].conv1.weight.grad.abs().sum() > 0
    net.eval()
    with torch.no_grad():
        before = net(images)[0]["br_heat"].clone()
        for heads in (net.tl_pools, net.br_pools, net.ct_pools, net.tl_heats, net.br_heats, net.ct_heats):
            for p in heads[0].parameters():
                p.add_(1.0)
        torch.testing.assert_close(net(images)[0]["br_heat"], before)


@pytest.mark.slow
def test_hg52_triplet_forward_backward_511_cpu():
    """The full paper-size CenterNet-52 (cascade + center pooling, 80 classes) trains a step on CPU."""
    torch.manual_seed(0)
    net = CenterNetTriplet(hourglass52(), 80)
    outputs = net(torch.randn(1, 3, 511, 511))
    assert len(outputs) == 1 and set(outputs[0]) == TRIPLET_KEYS
    assert outputs[0]["tl_heat"].shape == (1, 80, 128, 128)
    loss = sum(o.float().pow(2).mean() for o in outputs[0].values())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("kwargs", [{"num_stacks": 0}, {"dims": (32, 48), "modules": (1,)}, {"modules": (1, 0, 1, 1, 2)}])
def test_bad_hourglass_configuration_is_a_usage_error(kwargs):
    with pytest.raises(KpnetError, match="hourglass"):
        hourglass_small(**kwargs)
