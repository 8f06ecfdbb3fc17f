"""Corner pooling, cascade corner pooling and center pooling modules (REFERENCE §1.3-1.5).

The expected pooled maps are computed here by brute force (max over an explicit slice per
position), independently of kpnet.ops, from intermediate activations captured with hooks."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from kpnet.detectors.corner_modules import BOTTOM_RIGHT, TOP_LEFT, CascadeCornerPool, CenterPool, CornerPool

DIM, MID = 8, 4


def brute_pool(x: Tensor, direction: str) -> Tensor:
    """top: max over rows k >= i; left: columns k >= j; bottom: rows k <= i; right: columns k <= j."""
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    for i in range(h):
        for j in range(w):
            region = {
                "top": x[..., i:, j],
                "bottom": x[..., : i + 1, j],
                "left": x[..., i, j:],
                "right": x[..., i, : j + 1],
            }[direction]
            out[..., i, j] = region.amax(-1)
    return out


def capture(module: nn.Module, names: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """Record (input, output) of the named submodules on the next forward."""
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    for name in names:
        def hook(_module, args, out, name=name):
            seen[name] = (args[0].clone(), out.clone())

        module.get_submodule(name).register_forward_hook(hook)
    return seen


def features() -> Tensor:
    torch.manual_seed(0)
    return torch.randn(2, DIM, 7, 9)


@pytest.mark.parametrize("module", [
    CornerPool(TOP_LEFT, DIM, MID), CascadeCornerPool(BOTTOM_RIGHT, DIM, MID), CenterPool(DIM, MID),
    CenterPool(DIM, MID, pooling=False),
])
def test_module_output_shape(module):
    out = module(features())
    assert out.shape == (2, DIM, 7, 9)
    out.sum().backward()
    assert all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("directions", [TOP_LEFT, BOTTOM_RIGHT])
def test_corner_pool_composition(directions):
    """P1 + P2 = pool1(p1_conv1(x)) + pool2(p2_conv1(x)) feeds p_conv1 (§1.3)."""
    module = CornerPool(directions, DIM, MID)
    seen = capture(module, ["p1_conv1", "p2_conv1", "p_conv1"])
    module(features())
    pool1, pool2 = directions
    expected = brute_pool(seen["p1_conv1"][1], pool1) + brute_pool(seen["p2_conv1"][1], pool2)
    torch.testing.assert_close(seen["p_conv1"][0], expected)


@pytest.mark.parametrize("directions", [TOP_LEFT, BOTTOM_RIGHT])
def test_cascade_corner_pool_composition(directions):
    """Each branch looks along the other axis first, adds, 3x3 conv, then pools along its own (§1.4)."""
    module = CascadeCornerPool(directions, DIM, MID)
    names = ["look_conv1", "look_conv2", "p1_conv1", "p2_conv1", "P1_look_conv", "P2_look_conv", "p_conv1"]
    seen = capture(module, names)
    module(features())
    pool1, pool2 = directions
    out = {name: io[1] for name, io in seen.items()}
    torch.testing.assert_close(seen["P1_look_conv"][0], out["p1_conv1"] + brute_pool(out["look_conv1"], pool2))
    torch.testing.assert_close(seen["P2_look_conv"][0], out["p2_conv1"] + brute_pool(out["look_conv2"], pool1))
    expected = brute_pool(out["P1_look_conv"], pool1) + brute_pool(out["P2_look_conv"], pool2)
    torch.testing.assert_close(seen["p_conv1"][0], expected)


def test_center_pool_composition():
    """P1 = max over the whole column, P2 = max over the whole row (§1.5)."""
    module = CenterPool(DIM, MID)
    seen = capture(module, ["p1_conv1", "p2_conv1", "p_conv1"])
    module(features())
    p1, p2 = seen["p1_conv1"][1], seen["p2_conv1"][1]
    column = brute_pool(brute_pool(p1, "top"), "bottom")
    row = brute_pool(brute_pool(p2, "left"), "right")
    torch.testing.assert_close(column, p1.amax(2, keepdim=True).expand_as(p1))
    torch.testing.assert_close(seen["p_conv1"][0], column + row)


def identity_like(module: CenterPool, dim: int) -> CenterPool:
    """Branch convs and p_conv1/conv2 pass channels through (centre tap 1; p2_conv1 doubles them, so the
    two branches are told apart), the skip is zeroed and BN is the identity in eval mode: the module
    output is pool1(x) + 2 pool2(x) for a non-negative input."""
    with torch.no_grad():
        for conv in (module.p1_conv1.conv, module.p2_conv1.conv, module.p_conv1, module.conv2.conv):
            conv.weight.zero_()
            conv.weight[torch.arange(dim), torch.arange(dim), 1, 1] = 1.0
            if conv.bias is not None:
                conv.bias.zero_()
        module.p2_conv1.conv.weight.mul_(2.0)
        module.conv1.weight.zero_()
    return module.eval()


def test_center_pool_equals_column_plus_row_max_hand_built():
    """A hand-built map through an identity-like center pooling module gives column max + 2 x row max."""
    x = torch.zeros(1, 2, 4, 5)
    x[0, 0, 1, 3] = 5.0  # a strong response: its column and row light up, the cross of Fig. 4a
    x[0, 0, 3, 0] = 2.0
    x[0, 1, 2, 2] = 1.0
    module = identity_like(CenterPool(2, 2), 2)
    expected = torch.zeros(1, 2, 4, 5)
    expected[0, 0] = torch.tensor([[2, 0, 0, 5, 0], [12, 10, 10, 15, 10], [2, 0, 0, 5, 0], [6, 4, 4, 9, 4.0]])
    expected[0, 1] = torch.tensor([[0, 0, 1, 0, 0], [0, 0, 1, 0, 0], [2, 2, 3, 2, 2], [0, 0, 1, 0, 0.0]])
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-4)  # BN eps
        ablated = identity_like(CenterPool(2, 2, pooling=False), 2)
        torch.testing.assert_close(ablated(x), 3 * x, rtol=1e-4, atol=1e-4)  # Table 4 without CTP: no line maxima


def test_cascade_adds_only_look_layers():
    """Cascade corner pooling keeps every §1.3 layer and adds two look convs and two plain 3x3 convs."""
    plain = sum(p.numel() for p in CornerPool(TOP_LEFT, 256, 128).parameters())
    cascade = sum(p.numel() for p in CascadeCornerPool(TOP_LEFT, 256, 128).parameters())
    look = 2 * (256 * 128 * 9 + 2 * 128) + 2 * 128 * 128 * 9
    assert cascade - plain == look
    assert CascadeCornerPool(TOP_LEFT, 256, 128).P1_look_conv.bias is None
