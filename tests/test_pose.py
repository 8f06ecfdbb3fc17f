"""Multi-person pose on the points family (objects as points §4.2): keypoint scoring (OKS, both backends), targets,
flip pairs through augmentation, the snapping decode, all-ground-truth decoding on the synthetic people, keypoint
validation and results, and the paper pose networks' parameter counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from conftest import parse_json_stdout, run_cli
from kpnet import evaluation
from kpnet.analysis.error_analysis import gt_head_source, predict_with_replacement
from kpnet.backbones.dla import dla34
from kpnet.backbones.hourglass import hourglass104
from kpnet.config import load_recipe
from kpnet.data.dataset import load_index, read_image
from kpnet.data.poses import FLIP_PAIRS, NUM_JOINTS, flip_permutation, make_poses, render_image
from kpnet.data.transforms import train_augment
from kpnet.data.validate import load_coco_checked
from kpnet.detectors.base import Detections
from kpnet.detectors.centernet_points import CenterNetPoints
from kpnet.detectors.centernet_pose import (
    CenterNetPose, CenterNetPoseDetector, PoseDecoding, decode_pose, merged_pose_heads,
)
from kpnet.engine.inference import detect_with_heads, to_coco_results
from kpnet.errors import KpnetError
from kpnet.targets import pose_targets

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "recipes" / "centernet_pose_small_people.yaml"
FCE_AP = 0.5048844884488449  # ../shared/data/README.md: COCOeval keypoints on keypoints_fce


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 60 images of the synthetic people val split (seed 0, as `prepare-data poses`), 8 train images."""
    root = tmp_path_factory.mktemp("poses")
    make_poses(root, num_train=8, num_val=60, image_size=128, seed=0)
    return root


def detector_for(root: Path, *overrides: str) -> CenterNetPoseDetector:
    recipe = load_recipe(SMALL, [f"data.root={root}", "data.num_workers=0", "test.flip=false", *overrides])
    return CenterNetPoseDetector(recipe, nn.Identity())


def keypoint_ap(index, results) -> float:
    dets = evaluation.load_dets(results, index.coco, source="pose")
    return evaluation.stats_dict(evaluation.evaluate(index.coco, dets, iou_type="keypoints"))["AP"]


# -- scoring ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["pycocotools", "faster"])
def test_keypoint_ap_of_the_reference_files(data_dir: Path, backend: str) -> None:
    from kpnet.data.validate import load_gt

    d = data_dir / "keypoints_fce"
    gt = load_gt(d / "person_keypoints_gt.json")
    dt = evaluation.load_dets(d / "person_keypoints_results.json", gt)
    stats = evaluation.stats_dict(evaluation.evaluate(gt, dt, backend, iou_type="keypoints"))
    assert stats["AP"] == FCE_AP
    assert list(stats) == list(evaluation.KEYPOINT_KEYS)


def test_eval_gt_dets_detects_keypoints(data_dir: Path) -> None:
    d = data_dir / "keypoints_fce"
    proc = run_cli("eval", "--gt", str(d / "person_keypoints_gt.json"), "--dets", str(d / "person_keypoints_results.json"),
                   "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = parse_json_stdout(proc)
    assert doc["keypoints"]["AP"] == FCE_AP
    assert set(doc["keypoints"]) == {"AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"}
    assert "bbox" in doc and "segm" not in doc


def test_keypoints_need_keypoint_results(data_dir: Path) -> None:
    from kpnet.data.validate import load_gt

    d = data_dir / "keypoints_fce"
    gt = load_gt(d / "person_keypoints_gt.json")
    boxes_only = [{k: v for k, v in r.items() if k != "keypoints"}
                  for r in json.loads((d / "person_keypoints_results.json").read_text())]
    with pytest.raises(KpnetError, match="keypoints needs results with 'keypoints'"):
        evaluation.evaluate(gt, evaluation.load_dets(boxes_only, gt), iou_type="keypoints")


# -- data ------------------------------------------------------------------------------------------------------------

def test_synthetic_people_are_valid_coco_keypoints(people: Path) -> None:
    doc = load_coco_checked(people / "annotations" / "person_keypoints_val.json", people / "val")
    assert doc["categories"][0]["keypoints"][5:7] == ["left_shoulder", "right_shoulder"]
    cells: dict[int, set[tuple[int, int]]] = {}
    for ann in doc["annotations"]:
        kps = np.array(ann["keypoints"]).reshape(-1, 3)
        assert kps.shape == (NUM_JOINTS, 3) and set(kps[:, 2]) <= {0, 1, 2}
        assert ann["num_keypoints"] == int((kps[:, 2] > 0).sum())
        x, y, w, h = ann["bbox"]
        labelled = kps[kps[:, 2] > 0]
        assert ((labelled[:, 0] >= x) & (labelled[:, 0] <= x + w) & (labelled[:, 1] >= y) & (labelled[:, 1] <= y + h)).all()
        taken = cells.setdefault(ann["image_id"], set())
        for jx, jy in labelled[:, :2]:
            cell = (int(jx) // 4, int(jy) // 4)
            assert cell not in taken
            taken.add(cell)
    visibility = np.concatenate([np.array(a["keypoints"])[2::3] for a in doc["annotations"]])
    assert (visibility == 1).sum() > 0 and (visibility == 0).sum() > 0  # occlusion and truncation both occur
    assert max(len([a for a in doc["annotations"] if a["image_id"] == i]) for i in cells) >= 3  # several per image


def test_people_are_reproducible() -> None:
    a, anns_a = render_image(5, "val", 3, 128)
    b, anns_b = render_image(5, "val", 3, 128)
    assert np.array_equal(a, b) and anns_a == anns_b


@pytest.mark.parametrize("bad,line", [
    ({"keypoints": [1.0] * 48}, "has 48 keypoint numbers; its category names 17 joints, so 51 are expected"),
    ({"keypoints": [1.0] * 50}, "has keypoints that are not x, y, v triples of finite numbers"),
    ({"keypoints": [10.0, 10.0, 3] * 17}, "has keypoint visibility 3, not 0, 1 or 2"),
    ({"num_keypoints": 5}, "has num_keypoints 5 but 17 labelled keypoints (v > 0)"),
])
def test_bad_keypoint_annotations_stop_naming_the_culprit(people: Path, tmp_path: Path, bad: dict, line: str) -> None:
    doc = json.loads((people / "annotations" / "person_keypoints_val.json").read_text())
    ann = next(a for a in doc["annotations"] if a["num_keypoints"] == NUM_JOINTS)
    ann.update(bad)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(KpnetError) as e:
        load_coco_checked(path, None)
    assert f"annotation id {ann['id']} (image {ann['image_id']}) {line}" in str(e.value)


def test_keypoints_of_another_joint_layout_stop_naming_the_file(people: Path, tmp_path: Path) -> None:
    doc = json.loads((people / "annotations" / "person_keypoints_val.json").read_text())
    doc["categories"][0]["keypoints"] = doc["categories"][0]["keypoints"][:14]
    for ann in doc["annotations"]:
        ann["keypoints"] = ann["keypoints"][:42]
        ann["num_keypoints"] = sum(1 for v in ann["keypoints"][2::3] if v > 0)
    path = tmp_path / "fourteen.json"
    path.write_text(json.dumps(doc))
    index = load_index(path, people / "val")
    with pytest.raises(KpnetError, match=r"fourteen.json: annotation id 1 \(image 1\) has 14 keypoints; this model has 17"):
        index.keypoints(index.image_ids[0], NUM_JOINTS)


def test_flip_swaps_left_and_right_joints_through_augmentation(people: Path) -> None:
    index = load_index(people / "annotations" / "person_keypoints_val.json", people / "val")
    image_id = index.image_ids[0]
    image = read_image(index.image_path(image_id))
    boxes, _ = index.boxes(image_id)
    original = index.keypoints(image_id, NUM_JOINTS)
    out = {}
    for flip in (0.0, 1.0):
        kps = original.copy()
        inp, _, _ = train_augment(np.random.default_rng(7), image, boxes, 128, (1.0,), flip, 0.0, 0.0, 32,
                                  keypoints=kps, flip_pairs=FLIP_PAIRS)
        out[flip] = (inp, kps)
    (plain, kp), (flipped, kf) = out[0.0], out[1.0]
    # the same crop, mirrored about x -> W - x - 1 (the reference flip of boxes, REFERENCE §5): a column apart
    assert np.allclose(flipped[..., 1:], plain[..., ::-1][..., :-1], atol=1e-4)
    for left, right in FLIP_PAIRS:
        assert np.allclose(kf[:, left, 0], 128 - kp[:, right, 0], atol=1e-3)  # the left joint is the mirrored right one
        assert np.allclose(kf[:, left, 1:], kp[:, right, 1:])  # same y, same visibility
        assert np.allclose(kf[:, right, 0], 128 - kp[:, left, 0], atol=1e-3)
    assert np.allclose(kf[:, 0, 0], 128 - kp[:, 0, 0], atol=1e-3)  # the nose has no partner
    frontal = (kp[:, 5, 2] > 0) & (kp[:, 6, 2] > 0)
    assert (kf[frontal, 5, 0] > kf[frontal, 6, 0]).all()  # a frontal person's left shoulder stays on the image's right


def test_pose_targets() -> None:
    boxes = np.array([[2.0, 3.0, 12.0, 25.0], [20.0, 4.0, 30.0, 28.0]], np.float32)
    kps = np.zeros((2, NUM_JOINTS, 3), np.float32)
    kps[0, 0] = 6.5, 5.25, 2
    kps[0, 9] = 11.75, 14.5, 1
    kps[0, 15] = 40.0, 20.0, 2  # outside the 32x32 grid: masked
    t = pose_targets(boxes, np.array([0, 0]), kps, 1, (32, 32), 4, "legacy_bug", 0.7)
    assert t["hm"].shape == (1, 32, 32) and t["hm_hp"].shape == (NUM_JOINTS, 32, 32)
    assert t["ind"][0] == 14 * 32 + 7  # centre (7, 14)
    assert np.allclose(t["hps"][0, 0:2], [6.5 - 7, 5.25 - 14]) and np.allclose(t["hps"][0, 18:20], [11.75 - 7, 14.5 - 14])
    assert t["hps_mask"][0].sum() == 4 and t["hps_mask"][0, 30:32].sum() == 0
    assert t["hm_hp"][0, 5, 6] == 1 and t["hm_hp"][9, 14, 11] == 1 and t["hm_hp"][15].max() == 0
    assert np.allclose(t["hp_offset"][0], [0.5, 0.25]) and t["hp_ind"][9] == 14 * 32 + 11
    assert t["hp_mask"].sum() == 2
    assert t["reg_mask"].tolist() == [1, 0, 0, 0]  # the second person has no labelled joint: no size target
    assert t["hm"][0, 16, 25] == 1  # but its centre is still a positive


# -- network, loss, decoding -----------------------------------------------------------------------------------------

def test_loss_terms_and_gradients(people: Path) -> None:
    recipe = load_recipe(SMALL, [f"data.root={people}"])
    torch.manual_seed(0)
    detector = CenterNetPoseDetector(recipe)
    out = detector.network.train()(torch.randn(2, 3, 64, 64))
    assert set(out[0]) == set(CenterNetPoseDetector.heads) and out[0]["hps"].shape == (2, 34, 16, 16)
    index = load_index(people / "annotations" / "person_keypoints_val.json", people / "val")
    targets = []
    for image_id in index.image_ids[:2]:
        boxes, classes = index.boxes(image_id)
        kps = index.keypoints(image_id, NUM_JOINTS)
        kps[..., :2] /= 8
        targets.append(detector.target_renderer()(boxes / 8, classes, out_hw=(16, 16), keypoints=kps))
    batch = {k: torch.from_numpy(np.stack([t[k] for t in targets])) for k in targets[0]}
    losses = detector.loss(out, batch)
    assert set(losses) == {"loss", "hm_loss", "wh_loss", "off_loss", "hp_loss", "hm_hp_loss", "hp_off_loss"}
    w = recipe.loss
    expected = (losses["hm_loss"] + w.wh_weight * losses["wh_loss"] + losses["off_loss"] + w.hp_weight * losses["hp_loss"]
                + w.hm_hp_weight * losses["hm_hp_loss"] + w.off_weight * losses["hp_off_loss"])
    assert torch.allclose(losses["loss"], expected)
    losses["loss"].backward()
    assert detector.network.hps[0][0].weight.grad.abs().sum() > 0
    assert detector.network.hm_hp[0][0].weight.grad.abs().sum() > 0


def _heads(h: int = 32, w: int = 32) -> dict[str, Tensor]:
    heads = {"hm": torch.zeros(1, 1, h, w), "wh": torch.zeros(1, 2, h, w), "reg": torch.zeros(1, 2, h, w),
             "hps": torch.zeros(1, 2 * NUM_JOINTS, h, w), "hm_hp": torch.zeros(1, NUM_JOINTS, h, w),
             "hp_offset": torch.zeros(1, 2, h, w)}
    heads["hm"][0, 0, 10, 10] = 0.9
    heads["wh"][0, :, 10, 10] = torch.tensor([10.0, 16.0])  # box x 5..15, y 2..18
    heads["hps"][0, 0:2, 10, 10] = torch.tensor([2.0, -5.0])  # nose regressed at (12, 5)
    heads["hps"][0, 2:4, 10, 10] = torch.tensor([-3.0, -4.0])  # left eye at (7, 6)
    heads["hps"][0, 4:6, 10, 10] = torch.tensor([3.0, -4.0])  # right eye at (13, 6)
    heads["hm_hp"][0, 0, 6, 13] = 0.8  # a nose peak 1.4 cells away, inside the box
    heads["hp_offset"][0, :, 6, 13] = torch.tensor([0.25, 0.5])
    heads["hm_hp"][0, 1, 6, 16] = 0.9  # a left-eye peak outside the box (x 16 > 15): not taken
    heads["hm_hp"][0, 2, 6, 12] = 0.05  # a right-eye peak below the 0.1 threshold: not taken
    return heads


def test_decode_snaps_to_the_nearest_peak_inside_the_box() -> None:
    boxes, scores, _, joints = decode_pose(_heads(), PoseDecoding(k=1, snap=True, threshold=0.1, snap_distance=0.3))
    assert torch.allclose(boxes[0, 0], torch.tensor([5.0, 2.0, 15.0, 18.0])) and scores[0, 0] == pytest.approx(0.9)
    assert torch.allclose(joints[0, 0, 0], torch.tensor([13.25, 6.5, 0.8]))  # snapped, with its peak's score
    assert torch.allclose(joints[0, 0, 1, :2], torch.tensor([7.0, 6.0]))  # the peak outside the box is ignored
    assert torch.allclose(joints[0, 0, 2, :2], torch.tensor([13.0, 6.0]))  # the weak peak is ignored
    assert torch.allclose(joints[0, 0, 3, :2], torch.tensor([10.0, 10.0]))  # no offset, no peak: the centre
    _, _, _, regressed = decode_pose(_heads(), PoseDecoding(k=1, snap=False, threshold=0.1, snap_distance=0.3))
    assert torch.allclose(regressed[0, 0, 0, :2], torch.tensor([12.0, 5.0]))
    _, _, _, near = decode_pose(_heads(), PoseDecoding(k=1, snap=True, threshold=0.1, snap_distance=0.05))
    assert torch.allclose(near[0, 0, 0, :2], torch.tensor([12.0, 5.0]))  # 1.95 cells > 0.05 × 16: too far to snap


def test_flip_test_unflips_the_joint_heads() -> None:
    """A flipped copy built as the network would see it (mirrored maps, left/right channels swapped, x offsets
    negated) merges back to the original heads."""
    heads = _heads()
    logits = {k: (torch.logit(v.clamp(1e-4, 1 - 1e-4)) if k in ("hm", "hm_hp") else v) for k, v in heads.items()}
    perm = flip_permutation(FLIP_PAIRS, NUM_JOINTS)
    hps = logits["hps"].reshape(1, NUM_JOINTS, 2, 32, 32)[:, perm] * torch.tensor([-1.0, 1.0])[:, None, None]
    flipped = {"hm": logits["hm"].flip(-1), "wh": logits["wh"].flip(-1), "reg": torch.zeros(1, 2, 32, 32),
               "hps": hps.reshape(1, -1, 32, 32).flip(-1), "hm_hp": logits["hm_hp"][:, perm].flip(-1),
               "hp_offset": torch.zeros(1, 2, 32, 32)}
    merged = merged_pose_heads({k: torch.cat([logits[k], flipped[k]]) for k in logits}, True, perm)
    for k in heads:
        expected = heads[k].clamp(1e-4, 1 - 1e-4) if k in ("hm", "hm_hp") else heads[k]
        assert torch.allclose(merged[k], expected, atol=1e-5), k


def test_detections_carry_joints_to_image_pixels_and_coco_results() -> None:
    kps = torch.tensor([[[4.0, 8.0, 0.5]] * NUM_JOINTS])
    dets = Detections(torch.tensor([[1.0, 2.0, 5.0, 9.0]]), torch.tensor([0.9]), torch.tensor([0]), keypoints=kps)
    meta = {"scale": 0.5, "border_x": 2.0, "border_y": 0.0, "width": 100.0, "height": 100.0}
    image = dets.to_image(meta, 4.0, 4.0)
    assert torch.allclose(image.keypoints[0, 0], torch.tensor([28.0, 64.0, 0.5]))  # ((4·4 − 2)/0.5, 8·4/0.5)
    (entry,) = to_coco_results(image, 7, [1], 2)
    assert len(entry["keypoints"]) == 51 and entry["keypoints"][:3] == [28.0, 64.0, 0.5]


# -- the test pipeline on ground truth -------------------------------------------------------------------------------

def test_all_ground_truth_heads_decode_to_keypoint_ap_above_099(people: Path) -> None:
    index = load_index(people / "annotations" / "person_keypoints_val.json", people / "val")
    detector = detector_for(people)
    results = predict_with_replacement(detector, index, set(detector.heads))
    assert keypoint_ap(index, results) >= 0.99
    boxes = evaluation.load_dets(results, index.coco)
    assert evaluation.stats_dict(evaluation.evaluate(index.coco, boxes))["AP"] >= 0.99


def test_snapping_helps_when_only_joint_offsets_are_perturbed(people: Path) -> None:
    """Every head from ground truth, the joint offsets (hps) plus gaussian noise of 0.75 cells: snapping to the
    joint heatmaps' peaks recovers most of what the noise costs (Table 5, "reg" vs "jd")."""
    index = load_index(people / "annotations" / "person_keypoints_val.json", people / "val")
    ap = {}
    for snap in (False, True):
        detector = detector_for(people, f"test.joint_snap={snap}")
        noise = torch.Generator().manual_seed(0)
        results = []
        for image_id in index.image_ids:
            boxes, classes = index.boxes(image_id)
            source = gt_head_source(detector, boxes, classes, set(detector.heads), False,
                                    index.keypoints(image_id, NUM_JOINTS))

            def perturbed(batch: Tensor, meta: dict[str, float], source=source) -> dict[str, Tensor]:
                heads = source(batch, meta)
                return {**heads, "hps": heads["hps"] + 0.75 * torch.randn(heads["hps"].shape, generator=noise)}

            dets = detect_with_heads(perturbed, detector, read_image(index.image_path(image_id)), detector.test)
            results += to_coco_results(dets, image_id, index.cat_ids, 2)
        ap[snap] = keypoint_ap(index, results)
    assert ap[True] >= 0.95
    assert ap[True] - ap[False] >= 0.2, ap


# -- parameter counts ------------------------------------------------------------------------------------------------

def head_parameters(in_channels: int, hidden: int, out: int) -> int:
    """One `kp_head`: 3x3 conv in -> hidden with bias, ReLU, 1x1 conv hidden -> out with bias."""
    return in_channels * hidden * 9 + hidden + hidden * out + out


POSE_OUTPUTS = (1, 2, 2, 34, 17, 2)  # hm (person), wh, reg, hps, hm_hp, hp_offset


@pytest.mark.parametrize("name,backbone,expected", [("HG-104", hourglass104, 194_811_124), ("DLA-34", dla34, 20_070_618)])
def test_paper_pose_network_parameter_counts(name: str, backbone, expected: int) -> None:
    """The README's layer structure: backbone + per stack six heads (256 hidden channels) with 1, 2, 2, 34, 17, 2
    outputs; HG-104 has 2 stacks on 256-channel features, DLA-34 one on 64."""
    with torch.device("meta"):
        net = CenterNetPose(backbone(), 1, head_conv=256)
        points = CenterNetPoints(backbone(), 1, head_conv=256)
    count = sum(p.numel() for p in net.parameters())
    bb = net.backbone
    backbone_count = sum(p.numel() for p in bb.parameters())
    heads = bb.num_stacks * sum(head_parameters(bb.out_channels, 256, out) for out in POSE_OUTPUTS)
    assert count == backbone_count + heads == expected
    assert count - sum(p.numel() for p in points.parameters()) == bb.num_stacks * sum(
        head_parameters(bb.out_channels, 256, out) for out in (34, 17, 2))


def test_error_analysis_scores_pose_rows_by_keypoint_ap(people: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kpnet.cli import app
    from kpnet.engine.checkpoint import save_checkpoint

    recipe = load_recipe(SMALL, [f"data.root={people}"])
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", CenterNetPoseDetector(recipe).network, recipe)
    result = CliRunner().invoke(app, ["error-analysis", str(SMALL), "--checkpoint", str(ckpt), "--set",
                                      f"data.root={people}", "--set", "data.num_workers=0", "--set", "test.flip=false",
                                      "--replace", "hm,wh,reg,hps,hm_hp,hp_offset", "--json"])
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert [r["label"] for r in rows] == ["baseline", "w/ gt all heads"]
    assert rows[0]["keypoints"]["AP"] < 0.1 and rows[1]["keypoints"]["AP"] >= 0.99
