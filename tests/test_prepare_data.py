"""`kpnet prepare-data coco | voc | yolo` on real and hand-built data: the bccd id-0 acceptance,
coco_tiny coming out clean, and VOC / YOLO conversions that give back the boxes put in."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from kpnet.cli import app
from kpnet.data.convert import voc_to_coco, yolo_to_coco
from kpnet.data.validate import fix_coco, load_coco_checked, validate_coco
from kpnet.errors import KpnetWarning


def _cli(*args: str):
    return CliRunner().invoke(app, ["prepare-data", *args])


def _self_eval_ap(ann_path: Path) -> float:
    """bbox AP of the ground truth submitted as its own detections (score 1), through pycocotools."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_path))
        dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                for a in gt.dataset["annotations"]]
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


# --- bccd: ids start at 0 (Roboflow export) -------------------------------------------------

@pytest.mark.parametrize("split, raw_ap", [("test", 0.905), ("train", 0.993)])
def test_bccd_id_zero_reported_and_fixed(data_dir: Path, tmp_path: Path, split: str, raw_ap: float) -> None:
    folder = data_dir / "bccd" / split
    ann = folder / "_annotations.coco.json"
    res = _cli("coco", "--ann", str(ann), "--images", str(folder), "--json")
    assert res.exit_code == 2
    first = res.stderr.splitlines()[0]
    assert first.startswith(f"error: {ann}: annotation id 0 (image 0)") and "--fix OUT" in first
    doc = json.loads(res.stdout)
    assert doc["problem_counts"] == {"annotation_id_zero": 1}
    # the supercategory-like class is reported honestly: 3 categories, 2 with boxes
    assert [(c["name"], c["boxes"] > 0) for c in doc["classes"]] == [("RBC-WBC", False), ("rbc", True),
                                                                        ("wbc", True)]
    assert doc["counts"]["classes"] == 3 and doc["counts"]["classes_with_boxes"] == 2
    with pytest.warns(KpnetWarning, match="annotation id 0 \\(image 0\\) renumbered"):  # training and eval carry on
        assert 0 not in {a["id"] for a in load_coco_checked(ann, folder)["annotations"]}

    fixed = tmp_path / "fixed.json"
    res = _cli("coco", "--ann", str(ann), "--images", str(folder), "--fix", str(fixed), "--json")
    assert res.exit_code == 0, res.output
    kinds = {c["kind"] for c in json.loads(res.stdout)["fix"]["changes"]}
    assert kinds == {"renumbered_images", "renumbered_annotations"}
    load_coco_checked(fixed, folder)
    assert _self_eval_ap(ann) == pytest.approx(raw_ap, abs=5e-4)  # the id-0 box can never be matched
    assert _self_eval_ap(fixed) == 1.0


def test_coco_tiny_is_clean(data_dir: Path) -> None:
    root = data_dir / "coco_tiny"
    for split, boxes, crowd in (("train2017", 705, 6), ("val2017", 815, 11)):
        res = _cli("coco", "--ann", str(root / "annotations" / f"instances_{split}.json"),
                   "--images", str(root / split), "--json")
        assert res.exit_code == 0, res.output
        counts = json.loads(res.stdout)["counts"]
        assert (counts["images"], counts["boxes"], counts["classes"], counts["crowd"]) == (80, boxes, 80, crowd)


def test_gt_without_images_loads(data_dir: Path) -> None:
    """`kpnet eval --gt` has no image folder: structure is still checked, files are not."""
    doc = load_coco_checked(data_dir / "val2014_100" / "instances_val2014_100.json", None)
    assert len(doc["images"]) == 100


def test_fix_clips_and_renumbers(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((20, 30, 3), np.uint8))
    doc = {"images": [{"id": 7, "file_name": "a.png", "width": 30, "height": 20}],
           "categories": [{"id": 3, "name": "x"}],
           "annotations": [{"id": 5, "image_id": 7, "category_id": 3, "bbox": [25, -5, 10, 10], "area": 100},
                           {"id": 6, "image_id": 7, "category_id": 3, "bbox": [31, 0, 4, 4], "area": 16},
                           {"id": 8, "image_id": 9, "category_id": 3, "bbox": [1, 1, 4, 4], "area": 16},
                           {"id": 9, "image_id": 7, "category_id": 4, "bbox": [1, 1, 4, 4], "area": 16},
                           {"id": 10, "image_id": 7, "category_id": 3, "bbox": [2, 2, 4, 4]}]}
    src = tmp_path / "in.json"
    src.write_text(json.dumps(doc))
    result = fix_coco(src, tmp_path, tmp_path / "out.json")
    assert [c.kind for c in result.changes] == ["computed_area", "clipped_box", "dropped_degenerate_box",
                                                "dropped_unknown_image", "dropped_unknown_category",
                                                "renumbered_images", "renumbered_annotations"]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["images"][0]["id"] == 1 and out["categories"] == doc["categories"]
    assert [(a["id"], a["image_id"], a["bbox"], a["area"]) for a in out["annotations"]] == [
        (1, 1, [25.0, 0.0, 5.0, 5.0], 25.0), (2, 1, [2, 2, 4, 4], 16.0)]
    assert result.after.ok


# --- Pascal VOC -------------------------------------------------------------------------------

def _voc_xml(file_name: str, size: tuple[int, int] | None, objects: list[tuple[str, tuple[int, ...], int]]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b, d in objects)
    sz = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    return f"<annotation><folder>VOC</folder><filename>{file_name}</filename>{sz}{objs}</annotation>"


def _voc_set(tmp_path: Path) -> tuple[Path, Path]:
    xml_dir, images = tmp_path / "Annotations", tmp_path / "JPEGImages"
    xml_dir.mkdir()
    images.mkdir()
    cv2.imwrite(str(images / "a.jpg"), np.zeros((40, 50, 3), np.uint8))
    cv2.imwrite(str(images / "b.jpg"), np.zeros((30, 60, 3), np.uint8))
    (xml_dir / "a.xml").write_text(_voc_xml("a.jpg", (50, 40), [("dog", (1, 1, 50, 40), 0),
                                                                ("cat", (10, 5, 19, 14), 1)]))
    (xml_dir / "b.xml").write_text(_voc_xml("b.jpg", None, [("cat", (3, 4, 3, 4), 0)]))  # size read from the image
    return xml_dir, images


def test_voc_round_trip(tmp_path: Path) -> None:
    xml_dir, images = _voc_set(tmp_path)
    out = tmp_path / "voc.json"
    res = _cli("voc", "--xml-dir", str(xml_dir), "--images", str(images), "--out", str(out), "--classes", "cat,dog",
               "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["boxes"] == 3
    doc = json.loads(out.read_text())
    assert doc["categories"] == [{"id": 1, "name": "cat", "supercategory": "none"},
                                 {"id": 2, "name": "dog", "supercategory": "none"}]
    assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in doc["images"]] == [
        (1, "a.jpg", 50, 40), (2, "b.jpg", 60, 30)]
    got = [(a["id"], a["image_id"], a["category_id"], a["bbox"], a["difficult"]) for a in doc["annotations"]]
    # 1-based inclusive corners: the full-image box (1,1)-(50,40) is [0, 0, 50, 40]; one pixel is 1x1
    assert got == [(1, 1, 2, [0, 0, 50, 40], 0), (2, 1, 1, [9, 4, 10, 10], 1), (3, 2, 1, [2, 3, 1, 1], 0)]
    assert validate_coco(out, images).ok


def test_voc_default_classes_are_sorted(tmp_path: Path) -> None:
    xml_dir, images = _voc_set(tmp_path)
    result = voc_to_coco(xml_dir, images, tmp_path / "voc.json")
    assert result["classes"] == ["cat", "dog"]


def test_voc_errors_name_the_file(tmp_path: Path) -> None:
    xml_dir, images = _voc_set(tmp_path)
    res = _cli("voc", "--xml-dir", str(xml_dir), "--images", str(images), "--out", str(tmp_path / "o.json"),
               "--classes", "dog")
    assert res.exit_code == 2
    assert res.stderr.startswith(f"error: {xml_dir / 'a.xml'}: object class 'cat' is not in --classes")
    (xml_dir / "c.xml").write_text("<annotation><filename>c.jpg</file")
    res = _cli("voc", "--xml-dir", str(xml_dir), "--images", str(images), "--out", str(tmp_path / "o.json"))
    assert res.exit_code == 2 and res.stderr.startswith(f"error: {xml_dir / 'c.xml'}: malformed XML")
    assert not (tmp_path / "o.json").exists() and "Traceback" not in res.output


# --- YOLO -------------------------------------------------------------------------------------

def test_yolo_round_trip_of_shapes(shapes_small: Path, tmp_path: Path) -> None:
    """shapes val -> YOLO labels -> `prepare-data yolo` gives back the same boxes and classes."""
    coco = json.loads((shapes_small / "annotations" / "instances_val.json").read_text())
    labels = tmp_path / "labels"
    labels.mkdir()
    (tmp_path / "classes.txt").write_text("\n".join(c["name"] for c in coco["categories"]) + "\n")
    images = {i["id"]: i for i in coco["images"]}
    lines: dict[str, list[str]] = {}
    for a in coco["annotations"]:
        im = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        lines.setdefault(Path(im["file_name"]).stem, []).append(
            f"{a['category_id'] - 1} {(x + w / 2) / im['width']:.8f} {(y + h / 2) / im['height']:.8f} "
            f"{w / im['width']:.8f} {h / im['height']:.8f}")
    for stem, rows in lines.items():
        (labels / f"{stem}.txt").write_text("\n".join(rows) + "\n")
    out = tmp_path / "yolo.json"
    res = _cli("yolo", "--labels", str(labels), "--images", str(shapes_small / "val"),
               "--classes", str(tmp_path / "classes.txt"), "--out", str(out), "--json")
    assert res.exit_code == 0, res.output
    back = json.loads(out.read_text())
    assert [c["name"] for c in back["categories"]] == [c["name"] for c in coco["categories"]]
    assert [i["file_name"] for i in back["images"]] == [i["file_name"] for i in coco["images"]]
    assert len(back["annotations"]) == len(coco["annotations"])
    for a, b in zip(coco["annotations"], back["annotations"], strict=True):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert np.allclose(a["bbox"], b["bbox"], atol=2e-3)
    assert validate_coco(out, shapes_small / "val").ok


def test_yolo_errors_name_file_and_line(tmp_path: Path) -> None:
    labels, images = tmp_path / "labels", tmp_path / "images"
    labels.mkdir()
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), np.zeros((10, 20, 3), np.uint8))
    cv2.imwrite(str(images / "b.png"), np.zeros((10, 20, 3), np.uint8))  # no label file: no objects
    (tmp_path / "classes.txt").write_text("one\ntwo\n")
    (labels / "a.txt").write_text("1 0.5 0.5 0.5 0.2\n\n0 0.25 0.5 0.5 1.0\n")
    args = ["yolo", "--labels", str(labels), "--images", str(images), "--classes", str(tmp_path / "classes.txt"),
            "--out", str(tmp_path / "o.json")]
    res = _cli(*args, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "o.json").read_text())
    assert [(a["image_id"], a["category_id"], a["bbox"]) for a in doc["annotations"]] == [
        (1, 2, [5.0, 4.0, 10.0, 2.0]), (1, 1, [0.0, 0.0, 10.0, 10.0])]
    assert len(doc["images"]) == 2

    (labels / "a.txt").write_text("1 0.5 0.5 0.5 0.2\n2 0.5 0.5 0.1 0.1\n")
    res = _cli(*args)
    assert res.exit_code == 2 and res.stderr.startswith(f"error: {labels / 'a.txt'}:2: class 2 is outside 0..1")
    (labels / "a.txt").write_text("1 0.5 0.5 0.5\n")
    res = _cli(*args)
    assert res.exit_code == 2 and res.stderr.startswith(f"error: {labels / 'a.txt'}:1: expected 'class cx cy w h'")
    (labels / "a.txt").write_text("")
    (labels / "zzz.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    res = _cli(*args)
    assert res.exit_code == 2 and res.stderr.startswith(f"error: {labels / 'zzz.txt'}: no image named zzz.*")


def test_yolo_library_matches_cli(tmp_path: Path) -> None:
    labels, images = tmp_path / "labels", tmp_path / "images"
    labels.mkdir()
    images.mkdir()
    cv2.imwrite(str(images / "a.jpg"), np.zeros((8, 16, 3), np.uint8))
    (tmp_path / "c.txt").write_text("thing\n")
    (labels / "a.txt").write_text("0 0.5 0.5 1 1\n")
    result = yolo_to_coco(labels, images, tmp_path / "c.txt", tmp_path / "o.json")
    assert (result["images"], result["boxes"], result["classes"]) == (1, 1, ["thing"])
    assert json.loads((tmp_path / "o.json").read_text())["annotations"][0]["bbox"] == [0.0, 0.0, 16.0, 8.0]
