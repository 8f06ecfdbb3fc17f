"""Collision statistics (objects-as-points appendix C): the coco_tiny acceptance figures, and every
vectorised count cross-checked against a plain enumeration (pairs by loops, anchors one by one)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import shared_data_dir
from kpnet.analysis import collisions as C
from kpnet.cli import app
from kpnet.errors import KpnetError

DATA = shared_data_dir()
TINY = DATA / "coco_tiny" / "annotations"
TRAIN = TINY / "instances_train2017.json"
VAL = TINY / "instances_val2017.json"
SIZES, RATIOS, STRIDE = (32, 64, 128, 256, 512), (0.5, 1, 2), 16


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 keeps stderr apart already
        return CliRunner()


# ---------------------------------------------------------------- independent reference enumerations

def _size(area: float) -> str:
    return "small" if area < 32**2 else "medium" if area < 96**2 else "large"


def _iou(a, b) -> float:
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def reference_pairs(data: dict, stride: float, thresholds, include_crowd: bool = False) -> dict:
    """Appendix C eqs. 9-10 by plain loops over every same-image same-class pair (the smaller of a
    pair by area, the later one on ties, gets the pair); lost = all but the largest per cell."""
    by_image: dict[int, list] = {}
    for a in data["annotations"]:
        if include_crowd or not a.get("iscrowd", 0):
            by_image.setdefault(a["image_id"], []).append(a)
    pairs = dict.fromkeys(("all", "small", "medium", "large"), 0)
    iou = {t: dict(pairs) for t in thresholds}
    lost = dict(pairs)
    for anns in by_image.values():
        cells: dict[tuple, list] = {}
        for j, b in enumerate(anns):
            cell = ((b["bbox"][0] + b["bbox"][2] / 2) // stride, (b["bbox"][1] + b["bbox"][3] / 2) // stride,
                    b["category_id"])
            cells.setdefault(cell, []).append(b)
            for i in range(j):
                a = anns[i]
                if a["category_id"] != b["category_id"]:
                    continue
                smaller = b if b["area"] <= a["area"] else a
                same_cell = (a["bbox"][0] + a["bbox"][2] / 2) // stride == cell[0] and \
                            (a["bbox"][1] + a["bbox"][3] / 2) // stride == cell[1]
                if same_cell:
                    pairs["all"] += 1
                    pairs[_size(smaller["area"])] += 1
                for t in thresholds:
                    if _iou(a["bbox"], b["bbox"]) > t:
                        iou[t]["all"] += 1
                        iou[t][_size(smaller["area"])] += 1
        for members in cells.values():
            keep = max(range(len(members)), key=lambda k: (members[k]["area"], -k))
            for k, m in enumerate(members):
                if k != keep:
                    lost["all"] += 1
                    lost[_size(m["area"])] += 1
    return {"pairs": pairs, "iou": iou, "lost": lost}


def brute_force_best_iou(box, width: int, height: int, short_edge: int = 800) -> float:
    """Best IoU of one COCO box against every one of the 15 anchors at every grid position."""
    short = min(width, height)
    scale = short_edge / short
    rw, rh = width * short_edge // short, height * short_edge // short
    xs = STRIDE / 2 + STRIDE * np.arange(0, math.floor((rw - STRIDE / 2) / STRIDE) + 1, dtype=np.float64)
    ys = STRIDE / 2 + STRIDE * np.arange(0, math.floor((rh - STRIDE / 2) / STRIDE) + 1, dtype=np.float64)
    x1, y1, bw, bh = box[0] * scale, box[1] * scale, box[2] * scale, box[3] * scale
    x2, y2 = x1 + bw, y1 + bh
    best = 0.0
    for size in SIZES:
        for ratio in RATIOS:
            aw, ah = size / math.sqrt(ratio), size * math.sqrt(ratio)
            cx, cy = np.meshgrid(xs, ys, indexing="ij")  # every anchor position of this shape
            iw = np.clip(np.minimum(cx + aw / 2, x2) - np.maximum(cx - aw / 2, x1), 0, None)
            ih = np.clip(np.minimum(cy + ah / 2, y2) - np.maximum(cy - ah / 2, y1), 0, None)
            inter = iw * ih
            if inter.size:
                best = max(best, float((inter / (aw * ah + bw * bh - inter)).max()))
    return best


def synthetic(seed: int, images: int = 40, crowd_every: int = 9) -> dict:
    """Random boxes on few classes and coarse positions, so collisions, overlaps and ties abound."""
    rng = np.random.default_rng(seed)
    sizes = [(640, 480), (480, 640), (800, 800), (333, 1000), (500, 375), (16, 24)]
    data = {"images": [], "annotations": [], "categories": [{"id": c} for c in (1, 2, 3)]}
    aid = 1
    for i in range(images):
        w, h = sizes[i % len(sizes)]
        data["images"].append({"id": 100 + i, "width": w, "height": h})
        for _ in range(int(rng.integers(0, 30))):
            bw = float(rng.choice([0.0, 4.0, 16.0, 19.2, 32.0, 47.5, 100.0, 300.0]))
            bh = bw * float(rng.choice([1.0, 1.0, 0.5]))
            x, y = float(rng.integers(-1, 5) * 8), float(rng.integers(-1, 5) * 8)
            data["annotations"].append({"id": aid, "image_id": 100 + i, "category_id": int(rng.integers(1, 4)),
                                        "bbox": [x, y, bw, bh], "area": bw * bh * float(rng.uniform(0.5, 1)),
                                        "iscrowd": int(aid % crowd_every == 0)})
            aid += 1
    return data


def _load(tmp_path: Path, data: dict, name: str = "ann.json") -> C.BoxSet:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return C.load_boxes(path)


# --------------------------------------------------------------------------------------- tests

@pytest.mark.shared_data
def test_coco_tiny_train_acceptance():
    stats = C.collision_stats(C.load_boxes(TRAIN))
    assert stats["images"] == 80
    assert stats["objects"] == 705 and stats["crowd"] == 6
    assert stats["center_collision_pairs"] == 2 and stats["objects_lost"] == 2
    assert stats["iou_pairs"] == {"0.5": 4, "0.7": 0}
    sizes = stats["by_size"]
    for key in ("objects", "center_collision_pairs", "objects_lost", "forced_anchors"):
        assert sum(sizes[s][key] for s in C.SIZE_LABELS) == stats[key]
    for t in ("0.5", "0.7"):
        assert sum(sizes[s]["iou_pairs"][t] for s in C.SIZE_LABELS) == stats["iou_pairs"][t]
    crowd = C.collision_stats(C.load_boxes(TRAIN), include_crowd=True)
    assert crowd["objects"] == 705
    assert crowd["forced_anchors"] >= stats["forced_anchors"]


@pytest.mark.shared_data
@pytest.mark.parametrize("path", [TRAIN, VAL], ids=["train", "val"])
def test_pairs_match_loops_on_coco_tiny(path):
    data = json.loads(path.read_text())
    for include_crowd in (False, True):
        stats = C.collision_stats(C.load_boxes(path), 4, (0.3, 0.5, 0.7), include_crowd=include_crowd)
        ref = reference_pairs(data, 4, (0.3, 0.5, 0.7), include_crowd)
        _assert_pairs(stats, ref, (0.3, 0.5, 0.7))


def _assert_pairs(stats: dict, ref: dict, thresholds) -> None:
    assert stats["center_collision_pairs"] == ref["pairs"]["all"]
    assert stats["objects_lost"] == ref["lost"]["all"]
    for t in thresholds:
        assert stats["iou_pairs"][C.threshold_key(t)] == ref["iou"][t]["all"]
    for s in C.SIZE_LABELS:
        assert stats["by_size"][s]["center_collision_pairs"] == ref["pairs"][s]
        assert stats["by_size"][s]["objects_lost"] == ref["lost"][s]
        for t in thresholds:
            assert stats["by_size"][s]["iou_pairs"][C.threshold_key(t)] == ref["iou"][t][s]


@pytest.mark.parametrize("seed", [1, 3])
def test_pairs_match_loops_on_synthetic(tmp_path, seed, monkeypatch):
    monkeypatch.setattr(C, "_PAIR_CHUNK", 7)  # many small chunks exercise the chunk boundaries
    data = synthetic(seed)
    boxes = _load(tmp_path, data)
    for stride in (4, 8):
        stats = C.collision_stats(boxes, stride, (0.0, 0.5, 0.7))
        ref = reference_pairs(data, stride, (0.0, 0.5, 0.7))
        assert stats["center_collision_pairs"] > 5 and stats["iou_pairs"]["0.5"] > 10  # the test bites
        _assert_pairs(stats, ref, (0.0, 0.5, 0.7))


def _assert_same_assignment(fast: np.ndarray, slow: np.ndarray) -> None:
    """Same forced decisions; the best IoUs agree to rounding (an anchor narrower than the box has a
    float width c + w/2 - (c - w/2) that varies by an ulp with its centre c, so the farther positions
    the brute force also scores may round a hair higher)."""
    np.testing.assert_array_equal(fast < 0.5, slow < 0.5)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
    assert not ((slow > 0.5 - 1e-9) & (slow < 0.5)).any()  # no decision hangs on rounding


@pytest.mark.shared_data
@pytest.mark.parametrize("path", [TRAIN, VAL], ids=["train", "val"])
def test_forced_anchors_match_brute_force_on_coco_tiny(path):
    boxes = C.load_boxes(path)
    w, h = boxes.image_width[boxes.image_index], boxes.image_height[boxes.image_index]
    fast = C.anchor_best_iou(boxes.boxes, w, h)
    slow = np.array([brute_force_best_iou(b, int(ww), int(hh)) for b, ww, hh in zip(boxes.boxes, w, h)])
    _assert_same_assignment(fast, slow)
    forced = (slow < 0.5) & ~boxes.iscrowd
    assert C.collision_stats(boxes)["forced_anchors"] == int(forced.sum()) > 0


@pytest.mark.parametrize("short_edge", [800, 600, 8, 4])
def test_forced_anchors_match_brute_force_on_synthetic(tmp_path, short_edge):
    boxes = _load(tmp_path, synthetic(3, images=24))
    w, h = boxes.image_width[boxes.image_index], boxes.image_height[boxes.image_index]
    fast = C.anchor_best_iou(boxes.boxes, w, h, short_edge)
    slow = np.array([brute_force_best_iou(b, int(ww), int(hh), short_edge)
                     for b, ww, hh in zip(boxes.boxes, w, h)])
    _assert_same_assignment(fast, slow)
    if short_edge == 4:  # a 4-pixel short edge leaves no anchor centre at S/2 = 8: every object is forced
        assert (fast == 0).all()


def test_exact_half_iou_is_not_forced():
    """A 32x16 box centred on a 32x32 anchor has IoU exactly 0.5: covered, not forced (float64)."""
    c = 8 + 16 * 10
    boxes = np.array([[c - 16, c - 8, 32, 16], [c - 16, c - 8, 32, 15.99],
                      [(c - 16) * 0.6, (c - 8) * 0.6, 32 * 0.6, 16 * 0.6]], dtype=np.float64)
    w = np.array([800, 800, 480])
    best = C.anchor_best_iou(boxes, w, w)
    assert best[0] == 0.5 and best[2] == 0.5 and best[1] < 0.5
    assert list(best < C.FORCED_IOU) == [False, True, False]


def test_three_objects_in_one_cell(tmp_path):
    """k objects on one cell: k(k-1)/2 pairs (eq. 9), k - 1 lost; both booked by the smaller objects."""
    anns = [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [10 - s / 2, 10 - s / 2, s, s], "area": s * s,
             "iscrowd": 0} for i, s in enumerate((20.0, 40.0, 120.0))]
    anns.append({"id": 4, "image_id": 1, "category_id": 2, "bbox": [0, 0, 20, 20], "area": 400, "iscrowd": 0})
    boxes = _load(tmp_path, {"images": [{"id": 1, "width": 64, "height": 64}], "annotations": anns})
    stats = C.collision_stats(boxes)
    assert stats["center_collision_pairs"] == 3 and stats["objects_lost"] == 2
    per_size = stats["by_size"]
    assert {s: v["center_collision_pairs"] for s, v in per_size.items()} == {"small": 2, "medium": 1, "large": 0}
    assert {s: v["objects_lost"] for s, v in per_size.items()} == {"small": 1, "medium": 1, "large": 0}


def test_crowd_semantics(tmp_path):
    """Crowd counts as an object always; it joins pairs and anchors only with include_crowd."""
    data = {"images": [{"id": 1, "width": 640, "height": 480}], "categories": [{"id": 1}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [100, 100, 40, 40], "area": 1600, "iscrowd": 0},
                {"id": 2, "image_id": 1, "category_id": 1, "bbox": [101, 101, 40, 40], "area": 1600, "iscrowd": 1},
                {"id": 3, "image_id": 1, "category_id": 1, "bbox": [300, 300, 2, 2], "area": 4, "iscrowd": 1},
            ]}
    boxes = _load(tmp_path, data)
    plain = C.collision_stats(boxes)
    assert (plain["objects"], plain["crowd"]) == (3, 2)
    assert plain["center_collision_pairs"] == 0 and plain["iou_pairs"]["0.7"] == 0 and plain["forced_anchors"] == 0
    assert plain["by_size"]["small"]["objects"] == 1 and plain["by_size"]["medium"]["objects"] == 2
    crowd = C.collision_stats(boxes, include_crowd=True)
    assert crowd["center_collision_pairs"] == 1 and crowd["objects_lost"] == 1
    assert crowd["iou_pairs"]["0.7"] == 1 and crowd["forced_anchors"] == 1  # the 2x2 crowd box


def test_missing_area_falls_back_to_box_area(tmp_path):
    data = {"images": [{"id": 1, "width": 640, "height": 480}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100]}]}
    boxes = _load(tmp_path, data)
    assert boxes.area.tolist() == [10000.0] and not boxes.iscrowd.any()
    assert C.collision_stats(boxes)["by_size"]["large"]["objects"] == 1


@pytest.mark.parametrize("mutate, culprit", [
    (lambda d: d["annotations"][2].pop("bbox"), lambda d: f"annotation id {d['annotations'][2]['id']} has no 'bbox'"),
    (lambda d: d["annotations"][1].__setitem__("bbox", [1, 2, "x", 4]),
     lambda d: f"annotation id {d['annotations'][1]['id']} (image {d['annotations'][1]['image_id']}) has bbox"),
    (lambda d: d["annotations"][0].__setitem__("bbox", [1, 2, -3, 4]), lambda d: "annotations[0]: 'bbox'"),
    (lambda d: d["annotations"][3].__setitem__("image_id", 999),
     lambda d: f"annotation id {d['annotations'][3]['id']} refers to unknown image id 999"),
    (lambda d: d["images"][1].pop("width"), lambda d: f"image id {d['images'][1]['id']} has no 'width'"),
    (lambda d: d["images"][1].__setitem__("height", 0), lambda d: f"image id {d['images'][1]['id']} has height 0"),
    (lambda d: d["annotations"][4].__setitem__("iscrowd", 2),
     lambda d: f"annotation id {d['annotations'][4]['id']} (image {d['annotations'][4]['image_id']}) has iscrowd 2"),
    (lambda d: d.pop("annotations"), lambda d: "'annotations'"),
])
@pytest.mark.shared_data
def test_load_boxes_names_the_culprit(tmp_path, mutate, culprit):
    """Checked by kpnet.data.validate (the one COCO checker): the line names the file and the record."""
    data = json.loads(TRAIN.read_text())
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(KpnetError) as e:
        C.load_boxes(path)
    assert e.value.line().startswith(str(path)) and culprit(data) in e.value.line(), e.value.line()


def test_load_boxes_tolerates_what_statistics_do_not_use(tmp_path):
    """No file names, areas, categories or annotation ids needed; id 0 (a Roboflow export) is fine here."""
    data = {"images": [{"id": 0, "width": 64, "height": 48}],
            "annotations": [{"id": 0, "image_id": 0, "category_id": 3, "bbox": [1, 2, 10, 20]},
                            {"image_id": 0, "category_id": 3, "bbox": [5, 5, 0, 0]}]}
    boxes = _load(tmp_path, data)
    assert boxes.area.tolist() == [200.0, 0.0] and boxes.num_images == 1


@pytest.mark.shared_data
def test_cli_json(tmp_path):
    result = _runner().invoke(app, ["collision-stats", str(TRAIN), str(VAL), "--iou", "0.5,0.7,0.3", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["stride"] == 4 and doc["iou_thresholds"] == ["0.5", "0.7", "0.3"] and doc["include_crowd"] is False
    train, val = doc["files"]
    assert train["file"] == str(TRAIN) and val["file"] == str(VAL)
    assert train["objects"] == 705 and train["objects"] - train["crowd"] == 699
    assert train["center_collision_pairs"] == 2
    assert train["iou_pairs"]["0.7"] == 0 and train["iou_pairs"]["0.5"] == 4
    keys = {"objects", "center_collision_pairs", "objects_lost", "iou_pairs", "forced_anchors"}
    assert keys <= set(train) and set(train["by_size"]) == set(C.SIZE_LABELS)
    assert all(set(v) == keys for v in train["by_size"].values())
    human = _runner().invoke(app, ["collision-stats", str(TRAIN)])
    assert human.exit_code == 0 and "699 without crowd" in human.stdout and "forced anchor" in human.stdout


@pytest.mark.parametrize("args, culprit", [
    (["--iou", "0.5,abc"], "--iou"),
    (["--iou", "1.5"], "--iou"),
    (["--stride", "0"], "--stride"),
])
@pytest.mark.shared_data
def test_cli_bad_options_exit_2(args, culprit):
    result = _runner().invoke(app, ["collision-stats", str(TRAIN), *args, "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"].startswith(culprit)


@pytest.mark.shared_data
def test_cli_bad_file_exit_2(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [], "annotations": [')
    for path in (bad, tmp_path / "absent.json"):
        result = _runner().invoke(app, ["collision-stats", str(TRAIN), str(path)])
        assert result.exit_code == 2
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines == [lines[0]] and lines[0].startswith(f"error: {path}")
