"""Inputs and comparisons shared by the kernel tests (tests/test_cuda_emulator.py, tests/gpu): bit equality,
corner lists and boxes with exact ties."""

from __future__ import annotations

import torch

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    """Asserts a and b hold the same bits (NaN payloads and signed zeros included)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.contiguous().view(_INT_VIEW[a.element_size()]), b.contiguous().view(_INT_VIEW[b.element_size()]))


def corners(k: int, seed: int, scale: float = 40.0, classes: int = 3) -> list[torch.Tensor]:
    """(scores, classes, xs, ys) of 2 images × k corners; integer coordinates: exact ties on the box tests."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(2, k, generator=g)
    c = torch.randint(0, classes, (2, k), generator=g)
    x = (torch.rand(2, k, generator=g) * scale).round()
    y = (torch.rand(2, k, generator=g) * scale).round()
    return [s, c, x, y]


def nms_inputs(n: int = 300, seed: int = 11) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(boxes, scores, classes) of n integer boxes in 6 classes, the first 6 scores tied."""
    g = torch.Generator().manual_seed(seed)
    xy = (torch.rand(n, 2, generator=g) * 100).round()
    wh = (torch.rand(n, 2, generator=g) * 40).round()
    scores = torch.rand(n, generator=g)
    scores[:5] = scores[5]
    return torch.cat([xy, xy + wh], 1), scores, torch.randint(0, 6, (n,), generator=g)
