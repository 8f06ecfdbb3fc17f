"""The synthetic `shapes` set: valid COCO, deterministic to the byte, every COCO scale, the
occlusion and centre-cell guarantees its docstring promises, and the CLI around it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from kpnet.cli import app
from kpnet.data.shapes import CLASS_NAMES, make_shapes
from kpnet.data.validate import load_coco_checked, validate_coco

# pycocotools' mask.decode triggers a NumPy 2 DeprecationWarning inside pycocotools itself.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_valid_coco(shapes_small: Path) -> None:
    for split, n in (("train", 64), ("val", 24)):
        ann = shapes_small / "annotations" / f"instances_{split}.json"
        report = validate_coco(ann, shapes_small / split)
        assert report.ok, report.problems[:3]
        doc = load_coco_checked(ann, shapes_small / split)
        assert len(doc["images"]) == n and doc["images"][0] == {"id": 1, "file_name": "000000.jpg",
                                                                 "width": 128, "height": 128}
        assert [c["id"] for c in doc["categories"]] == list(range(1, len(CLASS_NAMES) + 1))
        assert [c["name"] for c in doc["categories"]] == list(CLASS_NAMES) and len(CLASS_NAMES) >= 6
        assert [a["id"] for a in doc["annotations"]] == list(range(1, len(doc["annotations"]) + 1))
        per_image = Counter(a["image_id"] for a in doc["annotations"])
        assert len(per_image) == n and max(per_image.values()) <= 8
        for a in doc["annotations"]:
            poly = np.array(a["segmentation"][0]).reshape(-1, 2)
            x, y, w, h = a["bbox"]
            # bbox is the polygon's extent, inside the image; area is the polygon's area
            assert np.allclose([x, y, x + w, y + h], [*poly.min(0), *poly.max(0)], atol=0.011)
            assert x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128 and a["iscrowd"] == 0
            rle = mask_utils.frPyObjects(a["segmentation"], 128, 128)
            assert abs(float(mask_utils.area(rle)[0]) - a["area"]) <= 0.06 * a["area"] + 8


def test_deterministic_bytes_and_independent_splits(tmp_path: Path) -> None:
    a = make_shapes(tmp_path / "a", num_train=12, num_val=6, image_size=96, seed=5)
    make_shapes(tmp_path / "b", num_train=12, num_val=6, image_size=96, seed=5)
    files_a = _files(tmp_path / "a")
    assert len(files_a) == 12 + 6 + 2 and files_a == _files(tmp_path / "b")
    assert a["train"]["images"] == 12 and a["val"]["images"] == 6
    make_shapes(tmp_path / "c", num_train=3, num_val=6, image_size=96, seed=5)
    val_c = {k: v for k, v in _files(tmp_path / "c").items() if k.startswith("val/") or k.endswith("val.json")}
    assert val_c == {k: v for k, v in files_a.items() if k in val_c} and len(val_c) == 7  # val ignores num_train
    make_shapes(tmp_path / "d", num_train=12, num_val=6, image_size=96, seed=6)
    assert _files(tmp_path / "d")["train/000000.jpg"] != files_a["train/000000.jpg"]


def test_scales_crowds_occlusion_and_centres(tmp_path: Path) -> None:
    """Across 300 images: every COCO scale and every class appears, same-class crowds and
    overlaps occur, each object keeps >= 60% of its pixels and its centre under the
    shapes drawn after it (rasterised independently by pycocotools), and no two objects share a
    stride-4 centre cell."""
    result = make_shapes(tmp_path, num_train=0, num_val=300, image_size=128, seed=11)
    sizes = result["val"]["sizes"]
    total = sum(sizes.values())
    assert sizes["small"] > 0.2 * total and sizes["medium"] > 0.2 * total and sizes["large"] > 0.02 * total
    doc = json.loads((tmp_path / "annotations" / "instances_val.json").read_text())
    assert set(Counter(a["category_id"] for a in doc["annotations"])) == set(range(1, len(CLASS_NAMES) + 1))
    by_image: dict[int, list[dict]] = {}
    for a in doc["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    crowds = overlapped = 0
    for anns in by_image.values():
        crowds += max(Counter(a["category_id"] for a in anns).values()) >= 3
        masks = [mask_utils.decode(mask_utils.frPyObjects(a["segmentation"], 128, 128))[..., 0].astype(bool)
                 for a in anns]
        for i, m in enumerate(masks):
            covered = np.any(masks[i + 1:], axis=0) if i + 1 < len(masks) else np.zeros_like(m)
            visible = (m & ~covered).sum() / max(m.sum(), 1)
            assert visible >= 0.6 - 0.03, (anns[i], visible)  # the documented promise, not the constant
            x, y, w, h = anns[i]["bbox"]
            assert not covered[int(y + h / 2), int(x + w / 2)], anns[i]  # the centre keypoint stays visible
            overlapped += visible < 0.99
        cells = [(int((a["bbox"][0] + a["bbox"][2] / 2) // 4), int((a["bbox"][1] + a["bbox"][3] / 2) // 4))
                 for a in anns]
        assert len(cells) == len(set(cells))
    assert crowds >= 15 and overlapped >= 30


def test_objects_contrast_with_surroundings(shapes_small: Path) -> None:
    """The learnability promise: each object's visible pixels differ in colour from the ring of
    pixels just outside it by a clear margin (median over objects)."""
    doc = json.loads((shapes_small / "annotations" / "instances_val.json").read_text())
    files = {i["id"]: i["file_name"] for i in doc["images"]}
    gaps = []
    for a in doc["annotations"]:
        img = cv2.imread(str(shapes_small / "val" / files[a["image_id"]])).astype(np.float32)
        m = mask_utils.decode(mask_utils.frPyObjects(a["segmentation"], 128, 128))[..., 0]
        inner = cv2.erode(m, np.ones((3, 3), np.uint8)).astype(bool)
        near = cv2.dilate(m, np.ones((3, 3), np.uint8)).astype(bool)
        ring = cv2.dilate(m, np.ones((5, 5), np.uint8)).astype(bool) & ~near
        if inner.sum() > 10 and ring.sum() > 10:
            gaps.append(float(np.linalg.norm(img[inner].mean(0) - img[ring].mean(0))))
    assert len(gaps) > 50 and np.median(gaps) > 50


def test_cli_json_and_bad_options(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["prepare-data", "shapes", "--out", str(tmp_path / "s"), "--num-train", "4",
                                   "--num-val", "2", "--seed", "1", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["train"]["images"] == 4 and doc["val"]["images"] == 2 and doc["classes"] == list(CLASS_NAMES)
    assert Path(doc["val"]["annotations"]).is_file() and doc["checks_failed"] == []
    res = CliRunner().invoke(app, ["prepare-data", "shapes", "--out", str(tmp_path / "t"), "--image-size", "32"])
    assert res.exit_code == 2 and not (tmp_path / "t").exists()
