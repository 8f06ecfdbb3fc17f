"""Parameter counts of the paper-size models equal REFERENCE §1.7 (80 classes) to within 0.1 M.

Counted: conv weights and biases plus BN weight and bias (`parameters()`; BN running statistics are
buffers). Models are built on the meta device, so no memory is allocated."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kpnet.backbones.dla import DeformConvBlock, bilinear_upsample, dla34
from kpnet.backbones.hourglass import hourglass52, hourglass104
from kpnet.detectors.centernet_points import CenterNetPoints
from kpnet.detectors.centernet_triplet import CenterNetTriplet
from kpnet.detectors.centripetalnet import CentripetalNetwork
from kpnet.detectors.corner import CornerNetwork

HG = {"HG-104": hourglass104, "HG-52": hourglass52}
BUILDERS = {
    "backbone": lambda backbone: backbone,
    "CornerNet": lambda backbone: CornerNetwork(backbone, 80),
    "CenterNet-triplets": lambda backbone: CenterNetTriplet(backbone, 80, cascade=True, center_pool=True),
    "CenterNet-points": lambda backbone: CenterNetPoints(backbone, 80, head_conv=256),
    "CentripetalNet": lambda backbone: CentripetalNetwork(backbone, 80),
}
REFERENCE_MILLIONS = [  # REFERENCE §1.7
    ("backbone", "HG-104", 187.7),
    ("backbone", "HG-52", 93.7),
    ("CornerNet", "HG-104", 201.0),
    ("CornerNet", "HG-52", 100.3),
    ("CenterNet-triplets", "HG-104", 210.1),
    ("CenterNet-triplets", "HG-52", 104.8),
    ("CenterNet-points", "HG-104", 191.3),
    ("CenterNet-points", "HG-52", 95.5),
    # CornerNet less the two embedding heads per stack, plus guiding-shift, DCN-offset, DCN and
    # centripetal-shift layers per stack and corner type (without the mask head)
    ("CentripetalNet", "HG-104", 205.8),
    ("CentripetalNet", "HG-52", 102.7),
]


def millions(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize("model,backbone,expected", REFERENCE_MILLIONS)
def test_parameter_count_matches_reference(model, backbone, expected):
    with torch.device("meta"):
        net = BUILDERS[model](HG[backbone]())
    assert abs(millions(net) - expected) < 0.1, f"{model} {backbone}: {millions(net):.3f} M"


def test_exact_counts_of_the_confirmed_rows():
    """REFERENCE §1.7: instantiating the official code gives 201.04 M and 191.28 M."""
    with torch.device("meta"):
        assert round(millions(CornerNetwork(hourglass104(), 80)), 2) == 201.04
        assert round(millions(CenterNetPoints(hourglass104(), 80, head_conv=256)), 2) == 191.28


def test_triplet_ablation_counts():
    """Table 4 switches: center pooling off keeps the parameter count; cascade adds 4 look layers per
    corner module (2 x (3x3 256->128 conv-BN) + 2 x (3x3 128->128)), i.e. 1.77 M per stack."""
    with torch.device("meta"):
        full = millions(CenterNetTriplet(hourglass52(), 80))
        no_ctp = millions(CenterNetTriplet(hourglass52(), 80, center_pool=False))
        no_ccp = millions(CenterNetTriplet(hourglass52(), 80, cascade=False))
        cornernet_ccp = millions(CornerNetwork(hourglass52(), 80, cascade=True))
    look = 2 * 2 * (256 * 128 * 9 + 2 * 128 + 128 * 128 * 9) / 1e6
    assert no_ctp == full
    assert full - no_ccp == pytest.approx(look)
    assert cornernet_ccp - 100.330278 == pytest.approx(look)


def test_dla34_dcn_backbone():
    """DLA-34 encoder 15.23 M (timm's dla34 is 15.74 M with its 0.51 M ImageNet classifier) plus the
    deformable up path; one 64-channel stride-4 map."""
    net = dla34()
    assert round(millions(net.base), 2) == 15.23
    assert round(millions(net), 2) == 19.17
    features = net(torch.randn(1, 3, 64, 96))
    assert net.num_stacks == 1 and [tuple(f.shape) for f in features] == [(1, 64, 16, 24)]


def test_dla_bilinear_upsample_interior():
    """The transposed convs start as bilinear x2 / x4 upsampling (equal to F.interpolate away from the border)."""
    x = torch.randn(1, 3, 6, 5)
    for factor in (2, 4):
        up = bilinear_upsample(3, factor)
        ref = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
        m = factor
        with torch.no_grad():
            torch.testing.assert_close(up(x)[..., m:-m, m:-m], ref[..., m:-m, m:-m])


def test_dla_deform_block_starts_as_half_masked_conv():
    """Zero-initialised offsets and mask logits: DCNv2 samples the regular grid with mask sigmoid(0) = 0.5;
    gradients still reach the offset/mask predictor."""
    torch.manual_seed(0)
    block = DeformConvBlock(4, 6).eval()
    x = torch.randn(2, 4, 9, 7, requires_grad=True)
    out = block(x)
    plain = F.conv2d(x, 0.5 * block.conv.weight, block.conv.bias, padding=1)
    torch.testing.assert_close(out, F.relu(block.bn(plain)), rtol=1e-4, atol=1e-5)
    (out * torch.randn_like(out)).sum().backward()
    assert block.offset_mask.weight.grad.abs().sum() > 0


def test_centripetalnet_mask_head_count():
    """The mask head as the paper builds it (§3.3): one head on the last stack, 4 × 3x3 256->256 conv (2.36 M),
    a 2x2 transposed conv 256->256 (0.26 M) and a 1x1 conv to 80 masks (0.02 M) = 2.643 M. REFERENCE §1.7's
    +4.8 M counts the official code's branch (4 × 3x3 256->256 + a 1x1 to 81, 2.38 M) once per stack (x2)."""
    with torch.device("meta"):
        plain = millions(CentripetalNetwork(hourglass104(), 80))
        masked = millions(CentripetalNetwork(hourglass104(), 80, mask=True))
    convs = 4 * (256 * 256 * 9 + 256)
    head = convs + 256 * 256 * 4 + 256 + 256 * 80 + 80
    assert masked - plain == pytest.approx(head / 1e6)
    assert round(head / 1e6, 3) == 2.643
    assert round(2 * (convs + 256 * 81 + 81) / 1e6, 1) == 4.8
