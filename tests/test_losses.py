"""Loss terms against hand-computed values (REFERENCE §3)."""

from __future__ import annotations

import math

import torch

from kpnet.losses import focal_loss, heat_sigmoid, reg_l1_loss


def test_focal_loss_hand_computed() -> None:
    pred = torch.tensor([[[[0.9, 0.2], [0.3, 0.5]]]])
    gt = torch.tensor([[[[1.0, 0.5], [0.0, 1.0]]]])
    pos = math.log(0.9) * 0.1**2 + math.log(0.5) * 0.5**2
    neg = math.log(0.8) * 0.2**2 * 0.5**4 + math.log(0.7) * 0.3**2 * 1.0
    expected = -(pos + neg) / 2
    assert abs(focal_loss(pred, gt).item() - expected) < 1e-6


def test_focal_loss_without_positives_is_not_divided() -> None:
    pred = torch.tensor([[[[0.1, 0.2]]]])
    gt = torch.tensor([[[[0.0, 0.5]]]])
    neg = math.log(0.9) * 0.01 + math.log(0.8) * 0.04 * 0.5**4
    assert abs(focal_loss(pred, gt).item() + neg) < 1e-6


def test_heat_sigmoid_clamps() -> None:
    p = heat_sigmoid(torch.tensor([-50.0, 0.0, 50.0]))
    assert torch.allclose(p, torch.tensor([1e-4, 0.5, 1 - 1e-4]))


def test_reg_l1_is_per_coordinate_mean() -> None:
    pred = torch.zeros(1, 2, 4, 4)
    pred[0, :, 1, 2] = torch.tensor([3.0, 5.0])
    ind = torch.tensor([[1 * 4 + 2, 0]])
    mask = torch.tensor([[1.0, 0.0]])
    target = torch.tensor([[[1.0, 1.0], [9.0, 9.0]]])
    # |3-1| + |5-1| = 6 over 2 coordinates of 1 object (+1e-4).
    assert abs(reg_l1_loss(pred, ind, mask, target).item() - 6 / (2 + 1e-4)) < 1e-6
