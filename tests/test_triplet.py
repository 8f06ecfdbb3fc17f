"""The triplet decode (triplet paper §3.1, §3.4; REFERENCE §4.2): central regions switched at area 22500
in original pixels, same-class centres strictly inside, (s_tl + s_br + s_ct)/3, unmatched boxes deleted,
centres from scale 1 only; and the centre terms of the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kpnet.backbones.hourglass import hourglass_small
from kpnet.detectors import centernet_triplet as triplet
from kpnet.detectors import cornernet
from kpnet.ops import group_corners


def box(x1: float, y1: float, x2: float, y2: float, score: float = 0.6, cls: int = 0) -> list[float]:
    return [x1, y1, x2, y2, score, cls, score, score]


def centre(x: float, y: float, score: float = 0.9, cls: int = 0) -> list[float]:
    return [x, y, x, y, score, cls, score, score]


def kept(boxes: list[list[float]], centres: list[list[float]]) -> torch.Tensor:
    return triplet.rescore(torch.tensor(boxes), torch.tensor(centres).reshape(-1, 8))


def test_central_region_switches_at_area_22500() -> None:
    """150×150 (area 22500) uses n = 3: x ∈ (50, 100); 151×150 uses n = 5: x ∈ (60.4, 90.6)."""
    small, large = box(0, 0, 150, 150), box(0, 0, 151, 150)
    regions = triplet.central_regions(torch.tensor([small[:4], large[:4]]), 22500.0, 3.0, 5.0)
    assert regions[0].tolist() == pytest.approx([50, 50, 100, 100])
    assert regions[1].tolist() == pytest.approx([60.4, 60, 90.6, 90])
    c = [centre(55, 75)]  # inside the n = 3 region only
    assert len(kept([small], c)) == 1 and len(kept([large], c)) == 0
    c = [centre(62, 75)]  # inside both
    assert len(kept([small], c)) == 1 and len(kept([large], c)) == 1


def test_centres_must_be_strictly_inside_and_of_the_same_class() -> None:
    b = box(0, 0, 30, 30)  # area 900: n = 3, region (10, 20)²
    assert len(kept([b], [centre(10, 15)])) == 0  # on the boundary
    assert len(kept([b], [centre(10.01, 15)])) == 1
    assert len(kept([b], [centre(15, 20)])) == 0
    assert len(kept([b], [centre(15, 15, cls=1)])) == 0
    assert len(kept([b], [])) == 0


def test_rescoring_is_the_mean_of_three_with_the_first_match() -> None:
    """score = (s_tl + s_br + s_ct)/3 = (2·s_pair + s_ct)/3 with the first matching centre in centre order."""
    b = box(0, 0, 30, 30, score=0.6)
    out = kept([b, box(100, 100, 130, 130, 0.5)], [centre(50, 50, 0.99), centre(15, 15, 0.3), centre(14, 14, 0.9)])
    assert len(out) == 1 and out[0, 4].item() == pytest.approx((2 * 0.6 + 0.3) / 3)
    assert out[0, :4].tolist() == b[:4] and out[0, 5].item() == 0


def test_rescore_agrees_with_the_grouping_op_in_one_frame() -> None:
    """Boxes kept and scores equal kpnet.ops.group_corners(mode="triplet") on the same corners and centres."""
    g = torch.Generator().manual_seed(0)
    n, m = 16, 400
    tl = torch.rand(1, n, 2, generator=g) * 200
    br = tl + torch.rand(1, n, 2, generator=g) * 200 + 1
    s_tl, s_br = torch.rand(1, n, generator=g), torch.rand(1, n, generator=g)
    cls = torch.randint(0, 2, (1, n), generator=g)
    ct = torch.rand(1, m, 2, generator=g) * 300
    ct_s, ct_c = torch.rand(1, m, generator=g), torch.randint(0, 2, (1, m), generator=g)
    emb = torch.zeros(1, n)
    groups = group_corners(
        s_tl, cls, tl[..., 0], tl[..., 1], s_br, cls, br[..., 0], br[..., 1], mode="triplet", tl_embed=emb, br_embed=emb,
        ct_scores=ct_s, ct_classes=ct_c, ct_xs=ct[..., 0], ct_ys=ct[..., 1], num_dets=n * n,
    )
    pair = groups.tl_index == groups.br_index  # the diagonal: the n boxes (tl_i, br_i)
    op = {int(i): s for i, s in zip(groups.tl_index[pair].tolist(), groups.scores[pair].tolist()) if s > -1}
    boxes = torch.cat([tl[0], br[0], ((s_tl + s_br) / 2)[0, :, None], cls[0, :, None].float(), torch.zeros(n, 2)], 1)
    boxes = torch.cat([boxes, torch.arange(n, dtype=torch.float32)[:, None]], 1)
    centres = torch.cat([ct[0], ct[0], ct_s[0, :, None], ct_c[0, :, None].float(), torch.zeros(m, 2)], 1)
    ours = {int(r[8]): r[4] for r in triplet.rescore(boxes, centres).tolist()}
    assert 0 < len(ours) < n
    assert ours.keys() == op.keys()
    for i in ours:
        assert ours[i] == pytest.approx(op[i], rel=1e-5)


def test_postprocess_takes_centres_from_scale_one_only() -> None:
    """A centre found only at scale 0.6 does not validate a box; with central_region off boxes pass unchanged."""
    b = box(0, 0, 30, 30)
    kinds = lambda rows, kind: torch.cat([torch.tensor(rows), torch.full((len(rows), 1), float(kind))], 1)
    at_06 = torch.cat([kinds([b], 0), kinds([centre(15, 15)], 1)])
    at_1 = torch.cat([kinds([box(50, 50, 80, 80)], 0), kinds([centre(65, 65)], 1)])
    out = triplet.postprocess([at_06, at_1], (0.6, 1.0))
    assert out.shape == (1, 8) and out[0, :4].tolist() == [50, 50, 80, 80]
    out = triplet.postprocess([at_06, at_1], (0.6, 1.0), central_region=False)
    assert out.shape == (2, 8) and out[:, 4].tolist() == pytest.approx([0.6, 0.6])


def test_detect_returns_boxes_and_both_images_centres() -> None:
    """Under flip: CornerNet boxes (kind 0) then K centres of the image and K un-flipped centres (kind 1)."""
    h, w, k = 12, 16, 5
    heads = {name: torch.zeros(2, n, h, w) for name, n in (("tl_tag", 1), ("br_tag", 1), ("tl_regr", 2), ("br_regr", 2), ("ct_regr", 2))}
    for name in ("tl_heat", "br_heat", "ct_heat"):
        heads[name] = torch.full((2, 2, h, w), -10.0)
    heads["ct_heat"][0, 1, 6, 4] = 3.0
    heads["ct_heat"][1, 1, 6, w - 1 - 9] = 2.0
    heads["ct_regr"][1, :, 6, w - 1 - 9] = torch.tensor([0.5, 0.25])
    rows = triplet.detect(heads, flip=True, k=k)
    centres = rows[rows[:, triplet.KIND_COLUMN] == 1]
    assert len(centres) == 2 * k
    assert centres[0, [0, 1, 5]].tolist() == [4, 6, 1]
    assert centres[k, [0, 1, 5]].tolist() == pytest.approx([w - (w - 1 - 9 + 0.5), 6.25, 1])


def test_triplet_loss_adds_the_centre_terms() -> None:
    torch.manual_seed(0)
    net = triplet.CenterNetTriplet(
        hourglass_small(num_stacks=1, dims=(8, 8, 16), modules=(1, 1, 1), stem_channels=8, cnv_channels=8), 2
    ).train()
    out = net(torch.randn(1, 3, 32, 32))
    boxes = np.array([[1.0, 1.5, 6.0, 6.5]], np.float32)
    t = {k: torch.from_numpy(v)[None] for k, v in triplet.encode(boxes, np.array([1]), 2, (8, 8), 4, "legacy_bug", 0.7).items()}
    full = triplet.loss(out, t)
    corner = cornernet.loss(out, t)
    from kpnet.losses import focal_loss, heat_sigmoid, reg_smooth_l1_loss

    ct = focal_loss(heat_sigmoid(out[0]["ct_heat"]), t["ct_heat"])
    ct_off = reg_smooth_l1_loss(out[0]["ct_regr"], t["ct_ind"], t["tag_mask"], t["ct_regr"])
    assert full["loss"].item() == pytest.approx((corner["loss"] + ct + ct_off).item(), rel=1e-5)
    full["loss"].backward()
    assert net.ct_heats[0][-1].weight.grad.abs().sum() > 0
