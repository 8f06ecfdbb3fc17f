"""Ground-truth rendering (REFERENCE §2): radius in both forms, gaussian splat, centre targets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kpnet.targets import center_targets, dense_from_centers, draw_gaussian, gaussian_kernel, gaussian_radius


def iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
    return inter / (area(a) + area(b) - inter)


@pytest.mark.parametrize(
    "h,w,fixed03,legacy07,fixed07",
    [(8, 8, 1, 2, 0), (16, 16, 3, 4, 1), (32, 32, 7, 8, 2), (64, 64, 14, 17, 5), (8, 32, 2, 3, 1)],
)
def test_radius_matches_reference_table(h: int, w: int, fixed03: int, legacy07: int, fixed07: int) -> None:
    assert gaussian_radius(h, w, 0.3, "cornernet_fixed") == fixed03
    assert gaussian_radius(h, w, 0.7, "legacy_bug") == legacy07
    assert gaussian_radius(h, w, 0.7, "cornernet_fixed") == fixed07


def test_legacy_radius_is_4t_times_correct_r3() -> None:
    # REFERENCE §2.2: the buggy min() always returns r3_bug = 4t * r3_correct.
    for h, w in [(10, 30), (50, 50), (7, 90)]:
        t = 0.7
        a, b, c = 4 * t, 2 * t * (h + w), (t - 1) * w * h
        r3 = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
        assert gaussian_radius(h, w, t, "legacy_bug") == int(4 * t * r3)


@pytest.mark.parametrize("min_overlap", [0.3, 0.5, 0.7])
def test_fixed_radius_keeps_iou_for_any_displacement(min_overlap: float) -> None:
    rng = np.random.default_rng(0)
    for _ in range(400):
        h, w = rng.uniform(4, 120, size=2)
        r = gaussian_radius(h, w, min_overlap, "cornernet_fixed")
        box = np.array([0.0, 0.0, w, h])
        for _ in range(10):
            # Each corner moves independently anywhere within the (square) radius r.
            d = rng.uniform(-r, r, size=4)
            moved = box + d
            if moved[2] <= moved[0] or moved[3] <= moved[1]:
                continue
            assert iou(box, moved) >= min_overlap - 1e-9, (h, w, r, d)


def test_unknown_radius_mode_is_rejected() -> None:
    with pytest.raises(ValueError):
        gaussian_radius(10, 10, 0.7, "paper")


def test_gaussian_sigma_and_merge_by_max() -> None:
    k = gaussian_kernel(2)
    sigma = 5 / 6
    assert k[2, 2] == 1.0
    assert k[2, 3] == pytest.approx(math.exp(-1 / (2 * sigma * sigma)), rel=1e-6)
    assert gaussian_kernel(0).tolist() == [[1.0]]
    heat = np.zeros((10, 10), np.float32)
    draw_gaussian(heat, 3, 3, 2)
    draw_gaussian(heat, 4, 3, 2)
    assert heat[3, 3] == 1.0 and heat[3, 4] == 1.0  # max, not sum
    assert heat.max() == 1.0
    edge = np.zeros((5, 5), np.float32)
    draw_gaussian(edge, 0, 4, 3)  # clipped at the border
    assert edge[4, 0] == 1.0


def test_center_targets_values() -> None:
    boxes = np.array([[2.0, 3.0, 10.5, 7.0], [20.0, 20.0, 20.0, 25.0]], np.float32)  # the second is empty
    t = center_targets(boxes, np.array([1, 0]), 2, (32, 32), 4, "legacy_bug", 0.7)
    assert t["reg_mask"].tolist() == [1, 0, 0, 0]
    cx, cy = 6.25, 5.0
    assert t["ind"][0] == 5 * 32 + 6
    assert t["reg"][0].tolist() == pytest.approx([cx - 6, cy - 5])
    assert t["wh"][0].tolist() == pytest.approx([8.5, 4.0])
    assert t["hm"][1, 5, 6] == 1.0 and t["hm"][0].max() == 0.0


def test_center_targets_clip_and_cap() -> None:
    boxes = np.array([[-5.0, -5.0, 4.0, 4.0]] * 5, np.float32)
    t = center_targets(boxes, np.zeros(5, np.int64), 1, (16, 16), 3, "legacy_bug", 0.7)
    assert t["reg_mask"].sum() == 3
    assert t["wh"][0].tolist() == [4.0, 4.0]  # clipped to the grid before measuring


def test_dense_from_centers_reads_nearest_object() -> None:
    values = np.array([[1.0, 2.0], [5.0, 6.0]], np.float32)
    ind = np.array([0 * 8 + 1, 6 * 8 + 6])
    dense = dense_from_centers(values, ind, np.array([1.0, 1.0]), (8, 8))
    assert dense[:, 0, 0].tolist() == [1.0, 2.0]
    assert dense[:, 7, 7].tolist() == [5.0, 6.0]
