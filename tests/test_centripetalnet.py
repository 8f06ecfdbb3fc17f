"""CentripetalNet (papers/centripetalnet §3; REFERENCE §1.6, §2.4, §3.4, §4.4): shift targets, the loss
structure, corner matching on hand-built heads (the μ rules on both sides of the area switch, the strict
region boundary, classes, corner order), the emulator kernel against the reference, and decoding
ground-truth heads back to the boxes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kpnet import evaluation
from kpnet.analysis.error_analysis import predict_with_replacement
from kpnet.backbones.hourglass import hourglass_small
from kpnet.config import load_recipe
from kpnet.cuda import dispatch
from kpnet.data.dataset import load_index
from kpnet.detectors.centripetalnet import CentripetalNetDetector, CentripetalNetwork
from kpnet.ops import group_corners

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "centripetalnet_small_shapes.yaml"
GRID = 32  # a 127-pixel input (pad 31, pad_add 0): 127/32 input pixels per cell, 15.75 px² per cell²


def detector(*overrides: str, network: nn.Module | None = None) -> CentripetalNetDetector:
    recipe = load_recipe(RECIPE, ["model.num_classes=2", "test.k=4", *overrides])
    return CentripetalNetDetector(recipe, network if network is not None else nn.Identity())


def test_shift_targets_follow_eq_1_and_7() -> None:
    """Guiding shift: box centre minus the integer corner cell (linear); centripetal: log of centre minus float corner."""
    render = detector().target_renderer()
    t = render(np.array([[2.5, 3.25, 12.75, 9.5]], np.float32), np.array([1]), out_hw=(GRID, GRID))
    cx, cy = (2.5 + 12.75) / 2, (3.25 + 9.5) / 2
    assert t["tl_guiding_shift"][0].tolist() == pytest.approx([cx - 2, cy - 3])
    assert t["br_guiding_shift"][0].tolist() == pytest.approx([12 - cx, 9 - cy])
    assert t["tl_centripetal_shift"][0].tolist() == pytest.approx([math.log(cx - 2.5), math.log(cy - 3.25)])
    assert t["br_centripetal_shift"][0].tolist() == pytest.approx([math.log(12.75 - cx), math.log(9.5 - cy)])
    assert "tl_tag" not in t and t["tl_ind"][0] == 3 * GRID + 2


def test_loss_sums_stacks_averages_corners_and_weights_the_shifts() -> None:
    torch.manual_seed(0)
    backbone = hourglass_small(num_stacks=2, dims=(8, 8, 16), modules=(1, 1, 1), stem_channels=8, cnv_channels=8)
    det = detector(network=CentripetalNetwork(backbone, 2))
    out = det.network.train()(torch.randn(1, 3, 32, 32))
    assert len(out) == 2 and "tl_tag" not in out[0]
    t = det.target_renderer()(np.array([[1.0, 1.5, 6.0, 6.5]], np.float32), np.array([1]), out_hw=(8, 8))
    targets = {k: torch.from_numpy(v)[None] for k, v in t.items()}
    both = det.loss(out, targets)
    one = det.loss(out[:1], targets)
    two = det.loss(out[1:], targets)
    for term in ("focal_loss", "off_loss", "guiding_loss", "centripetal_loss"):
        assert both[term].item() == pytest.approx(one[term].item() + two[term].item(), rel=1e-5)  # stacks summed
    expected = both["focal_loss"] + both["off_loss"] + 0.05 * both["guiding_loss"] + both["centripetal_loss"]
    assert both["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    both["centripetal_loss"].backward()
    shifts = det.network.tl_shifts[0]
    assert shifts.dcn.weight.grad.abs().sum() > 0 and shifts.dcn_offset.weight.grad.abs().sum() > 0
    guiding = shifts.guiding_shift[0].weight.grad  # the DCN offsets read the guiding shift detached (§3.2)
    assert guiding is None or guiding.abs().sum() == 0


def pair_heads(x1: float, y1: float, x2: float, y2: float, d: float, cls: tuple[int, int] = (0, 0),
               p: float = 0.9) -> dict[str, torch.Tensor]:
    """Logits for one tl/br corner pair whose centripetal centres sit d cells left and right of the box centre."""
    heads = {name: torch.zeros(1, 2, GRID, GRID) for name in
             ("tl_regr", "br_regr", "tl_guiding_shift", "br_guiding_shift", "tl_centripetal_shift", "br_centripetal_shift")}
    for kind, (x, y), c in (("tl", (x1, y1), cls[0]), ("br", (x2, y2), cls[1])):
        heat = torch.full((1, 2, GRID, GRID), -20.0)
        cx, cy = int(x), int(y)
        heat[0, c, cy, cx] = math.log(p / (1 - p))
        heads[f"{kind}_heat"] = heat
        heads[f"{kind}_regr"][0, :, cy, cx] = torch.tensor([x - cx, y - cy])
        heads[f"{kind}_centripetal_shift"][0, :, cy, cx] = torch.tensor(
            [math.log((x2 - x1) / 2 - d), math.log((y2 - y1) / 2)])
    return heads


def kept(det: CentripetalNetDetector, heads: dict[str, torch.Tensor]) -> torch.Tensor:
    dets = det.decode(heads, flip=False).detections
    return dets.boxes[dets.scores > 0.5]


# A 16-cell-wide box: its region's half-width is 16/2/2.1 = 3.81 cells with μ = 1/2.1 and 3.33 with 1/2.4;
# centres 3.6 cells off the box centre lie inside only the wider region. Heights 13.8 and 14 put the box's
# area just below (3478 px²) and above (3528 px²) the 3500 px² switch in input pixels.
SMALL, LARGE = (4.0, 4.0, 20.0, 17.8), (4.0, 4.0, 20.0, 18.0)


@pytest.mark.parametrize("rule, small_kept, large_kept", [
    ("official", True, False),  # KD: μ = 1/2.1 at area <= 3500, 1/2.4 above
    ("paper", False, True),  # paper §4.1: 1/2.1 for boxes larger than 3500
    ("mmdetection", False, True),
])
def test_mu_rules_switch_at_area_3500(rule: str, small_kept: bool, large_kept: bool) -> None:
    det = detector(f"test.centripetal_mu={rule}")
    stride = 127 / GRID
    assert (16 * 13.8 * stride**2 < 3500 < 16 * 14 * stride**2)
    assert (len(kept(det, pair_heads(*SMALL, d=3.6))) == 1) is small_kept
    assert (len(kept(det, pair_heads(*LARGE, d=3.6))) == 1) is large_kept
    assert len(kept(det, pair_heads(*SMALL, d=3.0))) == 1 and len(kept(det, pair_heads(*LARGE, d=3.0))) == 1
    assert len(kept(det, pair_heads(*SMALL, d=4.0))) == 0 and len(kept(det, pair_heads(*LARGE, d=4.0))) == 0


def test_classes_and_corner_order_are_checked() -> None:
    det = detector()
    assert len(kept(det, pair_heads(*SMALL, d=1.0))) == 1
    assert len(kept(det, pair_heads(*SMALL, d=1.0, cls=(0, 1)))) == 0
    heads = pair_heads(*SMALL, d=1.0)
    heads["br_heat"] = pair_heads(1.0, 4.0, 2.0, 17.8, d=0.0)["br_heat"]  # br at x = 2, left of tl at x = 4
    heads["br_regr"] = torch.zeros_like(heads["br_regr"])
    assert len(kept(det, heads)) == 0


def test_a_centre_exactly_on_the_region_boundary_is_rejected() -> None:
    """Strictly inside (REFERENCE §4.4 step 5): the boundary value is computed as the op computes it, in float32."""
    f = lambda v: torch.tensor([[v]], dtype=torch.float32)  # noqa: E731
    x1, y1, x2, y2 = 4.0, 4.0, 20.0, 12.0
    mu = torch.tensor(1 / 2.1, dtype=torch.float32)
    lo_x = (f(x1) + f(x2)) / 2 - mu * (f(x2) - f(x1)) / 2

    def score(tl_cx: torch.Tensor) -> float:
        g = group_corners(f(0.9), torch.zeros(1, 1, dtype=torch.long), f(x1), f(y1), f(0.9),
                          torch.zeros(1, 1, dtype=torch.long), f(x2), f(y2), mode="centripetal",
                          tl_ct_xs=tl_cx, tl_ct_ys=f(8.0), br_ct_xs=f(12.0), br_ct_ys=f(8.0),
                          mu_area=1e9, mu_small=1 / 2.1, mu_large=1 / 2.4, num_dets=1)
        return float(g.scores[0, 0])

    assert score(lo_x) == -1
    assert score(torch.nextafter(lo_x, f(100.0))) == pytest.approx(0.9)


def test_emulator_kernel_matches_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    ok, why = dispatch.emulator_status()
    if not ok:
        pytest.skip(f"emulator unavailable: {why}")
    g = torch.Generator().manual_seed(0)
    heads = {name: torch.randn(1, c, GRID, GRID, generator=g) * s for name, c, s in (
        ("tl_heat", 2, 2.0), ("br_heat", 2, 2.0), ("tl_regr", 2, 0.3), ("br_regr", 2, 0.3),
        ("tl_guiding_shift", 2, 1.0), ("br_guiding_shift", 2, 1.0),
        ("tl_centripetal_shift", 2, 0.8), ("br_centripetal_shift", 2, 0.8))}
    heads["tl_centripetal_shift"] += 2.0
    heads["br_centripetal_shift"] += 2.0
    results = {}
    for backend in ("torch", "emulate"):
        monkeypatch.setenv("KPNET_KERNELS", backend)
        for rule in ("official", "paper"):
            for weighting in ("false", "true"):
                det = detector(f"test.centripetal_mu={rule}", f"test.centripetal_weighting={weighting}", "test.k=30")
                dets = det.decode(heads, flip=False).detections
                results[backend, rule, weighting] = dets
    for rule in ("official", "paper"):
        for weighting in ("false", "true"):
            ref, emu = results["torch", rule, weighting], results["emulate", rule, weighting]
            assert len(ref) > 0 and torch.equal(ref.boxes, emu.boxes) and torch.equal(ref.classes, emu.classes)
            torch.testing.assert_close(ref.scores, emu.scores, rtol=1e-6, atol=1e-7)


def all_gt_ap(root: Path, ann: str, images: str, num_classes: int) -> float:
    recipe = load_recipe(REPO / "recipes" / "centripetalnet_hg104.yaml", [f"data.root={root}", f"model.num_classes={num_classes}"])
    index = load_index(root / ann, root / images)
    det = CentripetalNetDetector(recipe, nn.Identity())  # every head replaced: the network never runs
    results = predict_with_replacement(det, index, set(det.heads))
    return evaluation.bbox_stats(index.coco, evaluation.load_dets(results, index.coco, source="all-gt"))["AP"]


def test_all_gt_decode_on_shapes(shapes_small: Path) -> None:
    """Heads rendered from ground truth and decoded through the test pipeline (flip, soft-NMS σ 0.7) give the boxes back."""
    assert all_gt_ap(shapes_small, "annotations/instances_val.json", "val", 6) >= 0.99


@pytest.mark.slow
def test_all_gt_decode_on_coco_tiny(data_dir: Path) -> None:
    assert all_gt_ap(data_dir / "coco_tiny", "annotations/instances_val2017.json", "val2017", 80) >= 0.99


def test_trains_under_bfloat16_autocast_on_cpu() -> None:
    """torchvision's CPU deformable convolution has no bfloat16 kernel; the cross-star DCN runs in float32 there."""
    torch.manual_seed(0)
    backbone = hourglass_small(num_stacks=1, dims=(8, 8, 16), modules=(1, 1, 1), stem_channels=8, cnv_channels=8)
    net = CentripetalNetwork(backbone, 2).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 3, 32, 32))
    sum(v.float().sum() for v in out[0].values()).backward()
    assert net.tl_shifts[0].dcn.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("flip", [False, True])
def test_graph_decode_equals_the_decode(flip: bool) -> None:
    """`export_decode` (the exported graph's matching: one pair-score grid, one TopK) keeps the pairs `decode` keeps,
    with the same boxes, scores, classes and decoded centres (in input pixels), with and without the flip copy."""
    torch.manual_seed(3)
    det = detector("test.k=30", "test.num_dets=200")
    b = 2 if flip else 1
    heads = {f"{kind}_{name}": fill(b) for kind in ("tl", "br") for name, fill in (
        ("heat", lambda n: torch.randn(n, 2, GRID, GRID) * 3), ("regr", lambda n: torch.rand(n, 2, GRID, GRID)),
        ("centripetal_shift", lambda n: torch.rand(n, 2, GRID, GRID) * 2.5))}
    down = det.input_stride(GRID, GRID)
    want = det.decode(heads, flip).detections
    got = det.export_scale_output({k: v[0] for k, v in det.export_decode(heads, flip, down).items()}).detections
    assert 0 < len(want) < 200 * b and len(got) == len(want)
    a, w = got.select(got.scores.argsort(descending=True)), want.select(want.scores.argsort(descending=True))
    scale = torch.tensor(down * 2)
    torch.testing.assert_close(a.boxes, w.boxes * scale, rtol=0, atol=1e-4)
    torch.testing.assert_close(a.centres, w.centres * scale, rtol=0, atol=1e-4)
    torch.testing.assert_close(a.scores, w.scores, rtol=0, atol=1e-6)
    assert torch.equal(a.classes, w.classes) and torch.allclose(a.corner_scores, w.corner_scores)


def test_ground_truth_masks_pasted_through_the_pipeline(shapes_small: Path) -> None:
    """Boxes decoded from ground-truth heads, each given its ground-truth mask cropped to the box on the head's
    28x28 grid, pasted and written as RLE by the results writer: segm AP >= 0.95 on shapes val (the test
    pipeline's paste and RLE path loses at most the grid's resolution)."""
    from torchvision.ops import box_iou

    from kpnet.analysis.error_analysis import gt_head_source
    from kpnet.engine.inference import detect_with_heads, to_coco_results
    from kpnet.masks import crop_masks
    from kpnet.targets import segmentation_mask

    recipe = load_recipe(REPO / "recipes" / "centripetalnet_hg104.yaml", [f"data.root={shapes_small}", "model.num_classes=6"])
    index = load_index(shapes_small / "annotations/instances_val.json", shapes_small / "val")
    det = CentripetalNetDetector(recipe, nn.Identity())
    results = []
    for image_id in index.image_ids:
        info = index.coco.imgs[image_id]
        h, w = info["height"], info["width"]
        boxes, classes = index.boxes(image_id)
        gt_masks = torch.from_numpy(np.stack([segmentation_mask(s, h, w) for s in index.segmentations(image_id)]))
        heads = gt_head_source(det, boxes, classes, set(det.heads), use_network=False)
        dets = detect_with_heads(heads, det, np.zeros((h, w, 3), np.uint8), det.test)
        same_class = dets.classes[:, None] == torch.from_numpy(classes)[None]
        best = (box_iou(dets.boxes, torch.from_numpy(boxes)) * same_class).argmax(1)
        masks = crop_masks(gt_masks[best], dets.boxes)
        results += to_coco_results(dets.replace(masks=masks), image_id, index.cat_ids, 2, (h, w), 0.5)
    dt = evaluation.load_dets(results, index.coco, source="gt-masks")
    assert evaluation.has_masks(dt)
    assert evaluation.stats_dict(evaluation.evaluate(index.coco, dt, iou_type="segm"))["AP"] >= 0.95


def test_an_exported_model_refuses_other_decode_settings() -> None:
    """`eval --onnx` compares the recipe's decode settings (μ rule included, which are not test fields by name)
    with those the graph was exported with."""
    import dataclasses

    from kpnet.errors import KpnetError
    from kpnet.export.runtime import OnnxModel

    model = OnnxModel.__new__(OnnxModel)
    official = detector()
    model.heads_only, model.path = False, Path("m.onnx")
    model.sidecar = json.loads(json.dumps({"flip_in_graph": official.test.flip, "decode": dataclasses.asdict(official.decoding)}))
    model.check_decoding(official.test, official.decoding)
    paper = detector("test.centripetal_mu=paper")
    with pytest.raises(KpnetError, match="the decode setting mu_small"):
        model.check_decoding(paper.test, paper.decoding)
    fewer = detector("test.k=3")
    with pytest.raises(KpnetError, match="--set test.k=4"):
        model.check_decoding(fewer.test, fewer.decoding)
