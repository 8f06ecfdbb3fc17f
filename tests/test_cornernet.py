"""CornerNet targets, losses and decoding against the reference facts (REFERENCE §2-4, §9 items 4-8)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kpnet.backbones.hourglass import hourglass_small
from kpnet.config import load_recipe
from kpnet.detectors.corner import CornerNetwork
from kpnet.detectors.cornernet import CornerNetDetector
from kpnet.engine.inference import detect_with_heads
from kpnet.losses import ae_loss
from kpnet.targets import corner_targets, gaussian_radius, output_size

REPO = Path(__file__).resolve().parents[1]


def test_corner_targets_use_the_511_ratio_truncated_cells_and_offsets() -> None:
    """A 511-pixel box maps by 128/511 (not 1/4): integer cell = truncation, offset = fraction, index = y·W + x."""
    ratio = output_size(511) / 511
    box = np.array([[100.0, 50.0, 300.0, 200.0]], np.float32) * ratio
    t = corner_targets(box, np.array([2]), 3, (128, 128), 4, "cornernet_fixed", 0.3)
    x1, y1, x2, y2 = box[0]
    assert t["tl_ind"][0] == int(y1) * 128 + int(x1) and t["br_ind"][0] == int(y2) * 128 + int(x2)
    np.testing.assert_allclose(t["tl_regr"][0], [x1 - int(x1), y1 - int(y1)], rtol=1e-6)
    np.testing.assert_allclose(t["br_regr"][0], [x2 - int(x2), y2 - int(y2)], rtol=1e-6)
    assert int(300 * ratio) == 75 and int(300 / 4) == 75 and t["br_regr"][0, 0] == pytest.approx(300 * ratio - 75, abs=1e-5)
    assert t["tl_heat"][2, int(y1), int(x1)] == 1 and t["tl_heat"].sum(axis=(1, 2))[[0, 1]].tolist() == [0, 0]
    assert t["tag_mask"].tolist() == [1, 0, 0, 0]
    r = gaussian_radius(math.ceil(y2 - y1), math.ceil(x2 - x1), 0.3, "cornernet_fixed")
    row = t["tl_heat"][2, int(y1)]
    assert row[int(x1) + r] > 0 and row[int(x1) + r + 1] == 0  # the fixed radius with t = 0.3


def test_corner_targets_clip_drop_and_keep_order() -> None:
    """Boxes are clipped to the grid (truncated objects get border corners), empty ones dropped, order kept."""
    boxes = np.array([[-5, 2, 10, 9], [3, 3, 3, 8], [20, 20, 40, 31]], np.float32)
    t = corner_targets(boxes, np.array([0, 1, 0]), 2, (32, 32), 3, "cornernet_fixed", 0.3)
    assert t["tag_mask"].tolist() == [1, 1, 0]
    assert t["tl_ind"][0] == 2 * 32 + 0 and t["br_ind"][1] == 31 * 32 + 31
    assert t["br_regr"][1].tolist() == [0, 0]


def test_center_heatmap_uses_sigma_diameter_over_five() -> None:
    """Centre gaussians share the corner radius with σ = (2r+1)/5, wider than the corners' /6 (REFERENCE §2.3)."""
    box = np.array([[10, 10, 50, 50]], np.float32)
    t = corner_targets(box, np.array([0]), 1, (64, 64), 128, "cornernet_fixed", 0.3, centers=True)
    r = gaussian_radius(40, 40, 0.3, "cornernet_fixed")
    assert t["ct_heat"][0, 30, 30] == 1 and t["ct_ind"][0] == 30 * 64 + 30
    sigma5, sigma6 = (2 * r + 1) / 5, (2 * r + 1) / 6
    assert t["ct_heat"][0, 30, 31] == pytest.approx(math.exp(-1 / (2 * sigma5**2)), rel=1e-5)
    assert t["tl_heat"][0, 10, 11] == pytest.approx(math.exp(-1 / (2 * sigma6**2)), rel=1e-5)


def tag_maps(tl_values: list[float], br_values: list[float], width: int = 8) -> tuple[torch.Tensor, ...]:
    """Embedding maps with object k's tl at cell k and br at cell width + k of a 1-row... 2-row map."""
    n = len(tl_values)
    tl = torch.zeros(1, 1, 2, width)
    br = torch.zeros(1, 1, 2, width)
    tl[0, 0, 0, :n] = torch.tensor(tl_values)
    br[0, 0, 1, :n] = torch.tensor(br_values)
    tl_ind = torch.arange(n)[None]
    br_ind = (width + torch.arange(n))[None]
    return tl, br, tl_ind, br_ind


def test_pull_push_equal_hand_computed_values() -> None:
    """3 objects, e_tl = (0, 1, 2.6), e_br = (0.2, 0.6, 2.4): means 0.1, 0.8, 2.5.
    pull = (2·0.1² + 2·0.2² + 2·0.1²)/3 = 0.04; the only pair closer than 1 is (0.1, 0.8):
    push = 2 ordered pairs · (1 − 0.7) / (3·2) = 0.1 (CornerNet eq. 4-5, REFERENCE §3.2)."""
    tl, br, tl_ind, br_ind = tag_maps([0.0, 1.0, 2.6], [0.2, 0.6, 2.4])
    mask = torch.ones(1, 3)
    pull, push = ae_loss(tl, br, tl_ind, br_ind, mask)
    assert pull.item() == pytest.approx(0.04, abs=1e-6)
    assert push.item() == pytest.approx(0.1, abs=1e-6)
    # padded slots are ignored, and images are summed, not averaged
    tl2, br2, tl_ind2, br_ind2 = tag_maps([0.0, 1.0, 2.6, 9.0], [0.2, 0.6, 2.4, 9.0])
    pull2, push2 = ae_loss(
        torch.cat([tl2, tl2]), torch.cat([br2, br2]), torch.cat([tl_ind2, tl_ind2]), torch.cat([br_ind2, br_ind2]),
        torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 0]]),
    )
    assert pull2.item() == pytest.approx(0.08, abs=1e-6) and push2.item() == pytest.approx(0.2, abs=1e-6)


def test_pull_push_with_one_or_no_object_are_zero() -> None:
    tl, br, tl_ind, br_ind = tag_maps([0.3, 0.0], [0.5, 0.0])
    pull, push = ae_loss(tl, br, tl_ind, br_ind, torch.tensor([[1.0, 0.0]]))
    assert pull.item() == pytest.approx(0.02) and push.item() == 0
    pull, push = ae_loss(tl, br, tl_ind, br_ind, torch.zeros(1, 2))
    assert pull.item() == 0 and push.item() == 0


def small_detector(*overrides: str) -> CornerNetDetector:
    """The small CornerNet recipe (3 classes, K = 10) on a tiny one-stack hourglass."""
    recipe = load_recipe(REPO / "recipes" / "cornernet_small_shapes.yaml",
                         ["model.num_classes=3", "test.k=10", "targets.max_objs=8", *overrides])
    torch.manual_seed(0)
    backbone = hourglass_small(num_stacks=1, dims=(8, 8, 16), modules=(1, 1, 1), stem_channels=8, cnv_channels=8)
    return CornerNetDetector(recipe, CornerNetwork(backbone, 3))


def test_batch_of_one_trains_and_stacks_are_averaged() -> None:
    """A batch of one gives finite loss and gradients (no squeeze, CNL #27) and the loss falls in a few steps."""
    detector = small_detector()
    net = detector.network.train()
    boxes = np.array([[1.0, 1.5, 6.0, 6.5], [2.0, 4.0, 7.0, 7.5]], np.float32)
    t = detector.target_renderer()(boxes, np.array([0, 2]), out_hw=(8, 8))
    targets = {k: torch.from_numpy(v)[None] for k, v in t.items()}
    image = torch.randn(1, 3, 32, 32)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        out = net(image)
        assert len(out) == 1 and out[0]["tl_heat"].shape == (1, 3, 8, 8)
        terms = detector.loss(out, targets)
        assert set(terms) == {"loss", "focal_loss", "pull_loss", "push_loss", "off_loss"}
        opt.zero_grad()
        terms["loss"].backward()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
        opt.step()
        losses.append(terms["loss"].item())
    assert losses[-1] < losses[0]
    one = detector.loss(out[:1], targets)
    avg = detector.loss([out[0], out[0]], targets)
    assert avg["loss"].item() == pytest.approx(one["loss"].item(), rel=1e-6)
    expected = one["focal_loss"] + 0.1 * one["pull_loss"] + 0.1 * one["push_loss"] + one["off_loss"]
    assert one["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def heads_from(tl: list[tuple], br: list[tuple], c: int = 2, hw: tuple[int, int] = (16, 20)) -> dict[str, torch.Tensor]:
    """Hand-built logits: each corner (cls, x, y, prob, embedding, dx, dy) written at its cell."""
    h, w = hw
    out = {k: torch.zeros(1, n, h, w) for k, n in (("tl_tag", 1), ("br_tag", 1), ("tl_regr", 2), ("br_regr", 2))}
    for kind, corners in (("tl", tl), ("br", br)):
        heat = torch.full((1, c, h, w), -20.0)
        for cls, x, y, p, e, dx, dy in corners:
            heat[0, cls, y, x] = math.log(p / (1 - p))
            out[f"{kind}_tag"][0, 0, y, x] = e
            out[f"{kind}_regr"][0, :, y, x] = torch.tensor([dx, dy])
        out[f"{kind}_heat"] = heat
    return out


def test_decode_rules_of_reference_4_1() -> None:
    """Pairs score the mean of corner scores; class mismatch, |Δe| > 0.5 (strict) and br < tl are rejected;
    zero-size boxes are allowed; offsets are added."""
    tl = [(0, 2, 3, 0.9, 0.0, 0.25, 0.5), (1, 10, 4, 0.6, 5.0, 0.0, 0.0)]
    br = [(0, 8, 9, 0.7, 0.5, 0.5, 0.25), (1, 10, 4, 0.8, 5.4, 0.0, 0.0), (0, 1, 12, 0.95, 0.0, 0, 0)]
    detector = small_detector()
    dets = detector.decode(heads_from(tl, br), flip=False).detections
    valid = dets.select(dets.scores > 0.5)  # pairs with a zero-score (non-peak) corner score below 0.5
    got = {(*(round(v, 2) for v in b), round(s, 3), c)
           for b, s, c in zip(valid.boxes.tolist(), valid.scores.tolist(), valid.classes.tolist())}
    assert got == {(2.25, 3.5, 8.5, 9.25, 0.8, 0), (10, 4, 10, 4, 0.7, 1)}
    top = valid.corner_scores[valid.scores.argmax()]
    assert top.tolist() == pytest.approx([0.9, 0.7])  # s_tl, s_br
    # |Δe| = 0.5 exactly is kept (strict >), 0.51 rejected
    br_far = [(0, 8, 9, 0.7, 0.51, 0.0, 0.0)]
    assert (detector.decode(heads_from(tl[:1], br_far), False).detections.scores > 0.5).sum() == 0


def test_flip_concatenates_unflipped_boxes() -> None:
    """Under flip both images are decoded and the flipped boxes come back as x ↦ W − x (REFERENCE §4.6)."""
    tl = [(0, 2, 3, 0.9, 0.0, 0.25, 0.5)]
    br = [(0, 8, 9, 0.7, 0.0, 0.5, 0.25)]
    a = heads_from(tl, br)
    w = a["tl_heat"].shape[-1]
    b = heads_from([(0, w - 1 - 8, 3, 0.8, 0.0, 0.0, 0.5)], [(0, w - 1 - 2, 9, 0.6, 0.0, 0.0, 0.25)])
    both = {k: torch.cat([a[k], b[k]]) for k in a}
    dets = small_detector("test.k=5").decode(both, flip=True).detections
    valid = dets.select(dets.scores > 0.5)
    assert len(valid) == 2
    flipped = valid.boxes[valid.scores.argmin()]
    assert flipped.tolist() == pytest.approx([w - (w - 1 - 2), 3.5, w - (w - 1 - 8), 9.25])


def test_test_input_pads_to_128k_minus_1() -> None:
    """CornerNet/DK pad to h | 127 (480 -> 511, 512 -> 639), XZ to (h | 127) + 1 (REFERENCE §4.6)."""
    from kpnet.data.transforms import test_input

    image = np.zeros((480, 512, 3), np.uint8)
    inp, meta = test_input(image, 1.0, 127, 0)
    assert inp.shape[1:] == (511, 639) and meta["border_x"] == 639 // 2 - 256
    assert test_input(image, 1.0, 127)[0].shape[1:] == (512, 640)
    recipe = load_recipe(REPO / "recipes" / "cornernet_hg104.yaml")
    assert (recipe.test.pad, recipe.test.pad_add, recipe.test.k, recipe.test.num_dets) == (127, 0, 100, 1000)


def test_soft_nms_in_the_pipeline_returns_no_stale_rows() -> None:
    """Duplicates suppressed by soft-NMS do not come back as stale copies (REFERENCE §4.5 known bug)."""
    recipe = load_recipe(REPO / "recipes" / "cornernet_hg104.yaml", ["model.num_classes=2", "test.flip=false"])
    detector = CornerNetDetector(recipe, nn.Identity())
    tl = [(0, 2, 3, 0.9, 10.0, 0.0, 0.0), (0, 4, 3, 0.85, 10.0, 0.0, 0.0)]  # embeddings far from the empty cells' 0
    br = [(0, 12, 12, 0.9, 10.0, 0.0, 0.0)]
    heads = heads_from(tl, br, hw=(32, 32))
    dets = detect_with_heads(lambda batch, meta: heads, detector, np.zeros((127, 127, 3), np.uint8), recipe.test)
    ratio = 127 / 32
    first, second = [2 * ratio, 3 * ratio, 12 * ratio, 12 * ratio], [4 * ratio, 3 * ratio, 12 * ratio, 12 * ratio]
    rows = {name: [s for b, s in zip(dets.boxes.tolist(), dets.scores.tolist()) if b == pytest.approx(box, abs=1e-3)]
            for name, box in (("a", first), ("b", second))}
    assert len(rows["a"]) == 1 and len(rows["b"]) == 1  # each pair once: no stale duplicates
    assert rows["a"][0] == pytest.approx(0.9, abs=1e-4)
    iou = (8 * ratio + 1) / (10 * ratio + 1)  # +1-pixel IoU of the two boxes (same height)
    assert rows["b"][0] == pytest.approx(0.875 * math.exp(-iou**2 / 0.5), rel=1e-4)


def test_hard_nms_from_the_recipe_removes_the_overlapping_pair() -> None:
    """test.nms: hard reaches the pipeline's per-class NMS: the second pair (IoU 0.8 > 0.5) is removed, not decayed."""
    recipe = load_recipe(REPO / "recipes" / "cornernet_hg104.yaml",
                         ["model.num_classes=2", "test.flip=false", "test.nms=hard"])
    tl = [(0, 2, 3, 0.9, 10.0, 0.0, 0.0), (0, 4, 3, 0.85, 10.0, 0.0, 0.0)]
    heads = heads_from(tl, [(0, 12, 12, 0.9, 10.0, 0.0, 0.0)], hw=(32, 32))
    detector = CornerNetDetector(recipe, nn.Identity())
    dets = detect_with_heads(lambda batch, meta: heads, detector, np.zeros((127, 127, 3), np.uint8), recipe.test)
    ratio = 127 / 32
    assert any(b == pytest.approx([2 * ratio, 3 * ratio, 12 * ratio, 12 * ratio], abs=1e-3) for b in dets.boxes.tolist())
    assert not any(b == pytest.approx([4 * ratio, 3 * ratio, 12 * ratio, 12 * ratio], abs=1e-3) for b in dets.boxes.tolist())
