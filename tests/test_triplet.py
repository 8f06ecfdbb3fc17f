"""The triplet decode (triplet paper §3.1, §3.4; REFERENCE §4.2): central regions switched at area 22500
in original pixels, same-class centres strictly inside, (s_tl + s_br + s_ct)/3, unmatched boxes deleted,
centres from scale 1 only; and the centre terms of the loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kpnet.backbones.hourglass import hourglass_small
from kpnet.config import load_recipe
from kpnet.detectors import centernet_triplet as triplet
from kpnet.detectors.base import Detections, Keypoints, ScaleOutput
from kpnet.detectors.cornernet import CornerNetDetector

REPO = Path(__file__).resolve().parents[1]


def detector(*overrides: str, network: nn.Module | None = None) -> triplet.CenterNetTripletDetector:
    recipe = load_recipe(REPO / "recipes" / "centernet_triplet_small_shapes.yaml", ["model.num_classes=2", *overrides])
    return triplet.CenterNetTripletDetector(recipe, network if network is not None else nn.Identity())


def boxes(*rows: tuple[float, ...], score: float = 0.6, cls: int = 0) -> Detections:
    """Detections from (x1, y1, x2, y2) rows, all with one score and class."""
    n = len(rows)
    return Detections(torch.tensor(rows, dtype=torch.float32).reshape(n, 4), torch.full((n,), score),
                      torch.full((n,), cls, dtype=torch.long), torch.full((n, 2), score))


def centres(*points: tuple[float, ...]) -> Keypoints:
    """Centre keypoints from (x, y[, score[, class]]) rows (defaults: score 0.9, class 0)."""
    full = [(*p[:2], p[2] if len(p) > 2 else 0.9, p[3] if len(p) > 3 else 0) for p in points]
    xy = torch.tensor([f[:2] for f in full], dtype=torch.float32).reshape(-1, 2)
    return Keypoints(xy, torch.tensor([f[2] for f in full], dtype=torch.float32),
                     torch.tensor([f[3] for f in full], dtype=torch.long))


def kept(dets: Detections, ct: Keypoints) -> Detections:
    return detector().postprocess([ScaleOutput(dets, ct)], (1.0,))


def test_central_region_switches_at_area_22500() -> None:
    """150×150 (area 22500) uses n = 3: x ∈ (50, 100); 151×150 uses n = 5: x ∈ (60.4, 90.6)."""
    small, large = boxes((0, 0, 150, 150)), boxes((0, 0, 151, 150))
    regions = triplet.central_regions(torch.cat([small.boxes, large.boxes]), 22500.0, 3.0, 5.0)
    assert regions[0].tolist() == pytest.approx([50, 50, 100, 100])
    assert regions[1].tolist() == pytest.approx([60.4, 60, 90.6, 90])
    c = centres((55, 75))  # inside the n = 3 region only
    assert len(kept(small, c)) == 1 and len(kept(large, c)) == 0
    c = centres((62, 75))  # inside both
    assert len(kept(small, c)) == 1 and len(kept(large, c)) == 1


def test_centres_must_be_strictly_inside_and_of_the_same_class() -> None:
    b = boxes((0, 0, 30, 30))  # area 900: n = 3, region (10, 20)²
    assert len(kept(b, centres((10, 15)))) == 0  # on the boundary
    assert len(kept(b, centres((10.01, 15)))) == 1
    assert len(kept(b, centres((15, 20)))) == 0
    assert len(kept(b, centres((15, 15, 0.9, 1)))) == 0
    assert len(kept(b, centres())) == 0


def test_rescoring_is_the_mean_of_three_with_the_first_match() -> None:
    """score = (s_tl + s_br + s_ct)/3 = (2·s_pair + s_ct)/3 with the first matching centre in centre order."""
    dets = Detections.cat([boxes((0, 0, 30, 30), score=0.6), boxes((100, 100, 130, 130), score=0.5)])
    out = kept(dets, centres((50, 50, 0.99), (15, 15, 0.3), (14, 14, 0.9)))
    assert len(out) == 1 and out.scores[0].item() == pytest.approx((2 * 0.6 + 0.3) / 3)
    assert out.boxes[0].tolist() == [0, 0, 30, 30] and out.classes[0].item() == 0
    assert out.centres[0].tolist() == [15, 15]  # the centre that validated the box travels with it


def test_postprocess_takes_centres_from_scale_one_only() -> None:
    """A centre found only at scale 0.6 does not validate a box; with central_region off boxes pass unchanged."""
    at_06 = ScaleOutput(boxes((0, 0, 30, 30)), centres((15, 15)))
    at_1 = ScaleOutput(boxes((50, 50, 80, 80)), centres((65, 65)))
    out = detector().postprocess([at_06, at_1], (0.6, 1.0))
    assert len(out) == 1 and out.boxes[0].tolist() == [50, 50, 80, 80]
    out = detector("test.central_region=false").postprocess([at_06, at_1], (0.6, 1.0))
    assert len(out) == 2 and out.scores.tolist() == pytest.approx([0.6, 0.6]) and out.centres is None


def test_decode_returns_boxes_and_both_images_centres() -> None:
    """Under flip: CornerNet boxes, and K centres of the image then K un-flipped centres of its flipped copy."""
    h, w, k = 12, 16, 5
    heads = {name: torch.zeros(2, n, h, w) for name, n in (("tl_tag", 1), ("br_tag", 1), ("tl_regr", 2), ("br_regr", 2), ("ct_regr", 2))}
    for name in ("tl_heat", "br_heat", "ct_heat"):
        heads[name] = torch.full((2, 2, h, w), -10.0)
    heads["ct_heat"][0, 1, 6, 4] = 3.0
    heads["ct_heat"][1, 1, 6, w - 1 - 9] = 2.0
    heads["ct_regr"][1, :, 6, w - 1 - 9] = torch.tensor([0.5, 0.25])
    ct = detector(f"test.k={k}").decode(heads, flip=True).centres
    assert len(ct.scores) == 2 * k
    assert [*ct.xy[0].tolist(), ct.classes[0].item()] == [4, 6, 1]
    assert [*ct.xy[k].tolist(), ct.classes[k].item()] == pytest.approx([w - (w - 1 - 9 + 0.5), 6.25, 1])


def test_triplet_loss_adds_the_centre_terms() -> None:
    torch.manual_seed(0)
    net = triplet.CenterNetTriplet(
        hourglass_small(num_stacks=1, dims=(8, 8, 16), modules=(1, 1, 1), stem_channels=8, cnv_channels=8), 2
    ).train()
    ours = detector("targets.max_objs=4", "targets.radius_mode=legacy_bug", "targets.min_overlap=0.7", network=net)
    out = net(torch.randn(1, 3, 32, 32))
    gt = np.array([[1.0, 1.5, 6.0, 6.5]], np.float32)
    t = {k: torch.from_numpy(v)[None] for k, v in ours.target_renderer()(gt, np.array([1]), out_hw=(8, 8)).items()}
    full = ours.loss(out, t)
    corner = CornerNetDetector(ours.recipe, net).loss(out, t)
    from kpnet.losses import focal_loss, heat_sigmoid, reg_smooth_l1_loss

    ct = focal_loss(heat_sigmoid(out[0]["ct_heat"]), t["ct_heat"])
    ct_off = reg_smooth_l1_loss(out[0]["ct_regr"], t["ct_ind"], t["tag_mask"], t["ct_regr"])
    assert full["loss"].item() == pytest.approx((corner["loss"] + ct + ct_off).item(), rel=1e-5)
    full["loss"].backward()
    assert net.ct_heats[0][-1].weight.grad.abs().sum() > 0
