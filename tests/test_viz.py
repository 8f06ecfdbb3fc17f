"""`kpnet visualize` / `viz`: PNGs read back and compared with the source image (size, pixels changed on
the drawn boxes and nowhere far from them), heatmap overlays and their mapping back to image pixels,
ground-truth browsing on coco_tiny, the newest-checkpoint rule, exit codes and JSON-only stdout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kpnet.cli import app
from kpnet.data.shapes import CLASS_NAMES
from kpnet.data import transforms
from kpnet.viz import GT_COLOUR, heat_to_image

from conftest import REPO, TINY_HOURGLASS, TINY_QUICKSTART, run_cli, shared_data_dir

DATA = shared_data_dir()
COCO_VAL = DATA / "coco_tiny" / "annotations" / "instances_val2017.json"
COCO_VAL_IMAGES = DATA / "coco_tiny" / "val2017"
TAG_W, TAG_H = 110, 18  # room for a label tag at a box's top-left (above it, or inside at the image top)


def save_untrained(path: Path, overrides: list[str]) -> Path:
    """An untrained quickstart model (3 detections per image, constant 24-pixel boxes) as a checkpoint."""
    from kpnet.config import load_recipe
    from kpnet.engine.checkpoint import save_checkpoint
    from kpnet.models import build_model

    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [*TINY_QUICKSTART, "test.k=3", *overrides])
    torch.manual_seed(0)
    model = build_model(recipe)
    with torch.no_grad():
        model.wh[0][-1].weight.zero_()
        model.wh[0][-1].bias.fill_(6.0)
    return save_checkpoint(path, model, recipe)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from kpnet.data.shapes import make_shapes

    root = tmp_path_factory.mktemp("viz")
    make_shapes(root / "shapes", num_train=8, num_val=6, image_size=128, seed=1)
    big = cv2.resize(cv2.imread(str(root / "shapes" / "val" / "000004.jpg")), (384, 320))
    cv2.imwrite(str(root / "big.png"), big)
    ckpt = save_untrained(root / "ckpt.pt", [f"data.root={root / 'shapes'}"])
    return {"root": root, "ckpt": ckpt, "big": root / "big.png", "shapes": root / "shapes"}


def changed(path: str | Path, source: np.ndarray) -> np.ndarray:
    drawn = cv2.imread(str(path))
    assert drawn.shape == source.shape  # the PNG has the input's size
    return (drawn != source).any(axis=2)


def outline(box: list[float], shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (ys, xs) of a box's rounded outline: its sides that lie inside the image."""
    h, w = shape[:2]
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    cx1, cx2, cy1, cy2 = max(x1, 0), min(x2, w - 1), max(y1, 0), min(y2, h - 1)
    across, down = np.arange(cx1, cx2 + 1), np.arange(cy1, cy2 + 1)
    sides = [(np.full(len(across), y), across) for y in (y1, y2) if 0 <= y < h]
    sides += [(down, np.full(len(down), x)) for x in (x1, x2) if 0 <= x < w]
    return np.concatenate([s[0] for s in sides]), np.concatenate([s[1] for s in sides])


def near_boxes(boxes: list[list[float]], shape: tuple[int, ...], pad: int = 3) -> np.ndarray:
    """Where drawing may touch: each box grown by `pad`, plus a label tag's room at its top-left."""
    mask = np.zeros(shape[:2], bool)
    for x1, y1, x2, y2 in boxes:
        x1, y1, x2, y2 = int(min(x1, x2)), int(min(y1, y2)), int(np.ceil(max(x1, x2))), int(np.ceil(max(y1, y2)))
        mask[max(y1 - pad, 0) : y2 + pad + 1, max(x1 - pad, 0) : x2 + pad + 1] = True
        mask[max(y1 - TAG_H - pad, 0) : y1 + TAG_H + pad + 1, max(x1 - pad, 0) : x1 + TAG_W] = True
    return mask


def assert_drawn_only_at(diff: np.ndarray, boxes: list[list[float]]) -> None:
    allowed = near_boxes(boxes, diff.shape)
    assert allowed.mean() < 0.7, "boxes cover the image: the 'nowhere else' check would prove nothing"
    assert not (diff & ~allowed).any(), f"{int((diff & ~allowed).sum())} pixels changed far from every box"
    for box in boxes:
        ys, xs = outline(box, diff.shape)
        assert diff[ys, xs].mean() > 0.9, f"box {box} outline not drawn"


def test_detections_drawn_on_boxes_and_nowhere_else(setup: dict[str, Path], tmp_path: Path) -> None:
    small = setup["shapes"] / "val" / "000002.jpg"
    proc = run_cli("viz", str(setup["big"]), str(small), "--checkpoint", str(setup["ckpt"]),
                   "--score-thresh", "0", "--out", str(tmp_path / "out"), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # nothing but one JSON document on stdout
    assert doc["class_names_from"].endswith("instances_val.json")
    assert doc["files"] == [str(tmp_path / "out" / "big_det.png"), str(tmp_path / "out" / "000002_det.png")]
    for entry in doc["images"]:
        source = cv2.imread(entry["image"])
        assert entry["size"] == [source.shape[1], source.shape[0]]
        assert len(entry["detections"]) == 3 and entry["gt"] is None
        assert all(d["name"] == CLASS_NAMES[d["class"]] and 0 <= d["score"] <= 1 for d in entry["detections"])
        diff = changed(entry["files"][0], source)
        if entry["image"] == str(setup["big"]):
            assert_drawn_only_at(diff, [d["bbox"] for d in entry["detections"]])
        else:
            assert diff.any()


def test_ground_truth_overlay_and_heatmaps(setup: dict[str, Path], tmp_path: Path) -> None:
    image = setup["shapes"] / "val" / "000003.jpg"
    ann = setup["shapes"] / "annotations" / "instances_val.json"
    recipe = ["--recipe", str(REPO / "recipes" / "quickstart.yaml"), "--set", f"data.root={setup['shapes']}",
              *[a for v in TINY_QUICKSTART for a in ("--set", v)]]
    result = CliRunner().invoke(app, ["viz", str(image), "--checkpoint", str(setup["ckpt"]), *recipe, "--gt", str(ann),
                                      "--score-thresh", "1", "--heatmaps", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["recipe"] == recipe[1] and doc["class_names_from"].endswith("instances_val.json")
    entry = doc["images"][0]
    assert entry["files"] == [str(tmp_path / "000003_det.png"), str(tmp_path / "000003_heat_hm.png")]
    assert entry["detections"] == []  # an untrained model scores ~0.1 < 1
    gt = json.loads(ann.read_text())
    image_id = next(i["id"] for i in gt["images"] if Path(i["file_name"]).name == image.name)
    boxes = [[x, y, x + w, y + h] for a in gt["annotations"] if a["image_id"] == image_id for x, y, w, h in [a["bbox"]]]
    assert entry["gt"] == len(boxes) > 0
    source = cv2.imread(str(image))
    drawn = cv2.imread(entry["files"][0])
    assert drawn.shape == source.shape
    green = (drawn == np.array(GT_COLOUR, np.uint8)).all(axis=2)
    for box in boxes:
        ys, xs = outline(box, source.shape)
        assert green[ys, xs].mean() > 0.6, f"ground truth {box} not drawn in the GT colour"
    heat = cv2.imread(entry["files"][1])
    assert heat.shape == source.shape
    assert np.abs(heat.astype(int) - source.astype(int)).mean() > 10


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_heat_maps_back_through_the_test_input_mapping(scale: float) -> None:
    image = np.zeros((70, 130, 3), np.uint8)
    inp, meta = transforms.test_input(image, scale, 31)  # centred in a zero canvas: borders of 13-16 pixels
    assert min(meta["border_x"], meta["border_y"]) >= 13
    heat = np.zeros((inp.shape[1] // 4, inp.shape[2] // 4), np.float32)
    cx, cy = int((100 * scale + meta["border_x"]) / 4), int((40 * scale + meta["border_y"]) / 4)
    heat[cy, cx] = 1.0  # the output cell of image pixel (100, 40)
    back = heat_to_image(heat, meta, 4.0)
    assert back.shape == (70, 130)
    peak_y, peak_x = np.unravel_index(back.argmax(), back.shape)
    # the cell's own position mapped back as boxes are: x = (x_out * 4 - border_x) / scale
    assert abs(peak_x - (cx * 4 - meta["border_x"]) / scale) <= 1
    assert abs(peak_y - (cy * 4 - meta["border_y"]) / scale) <= 1


@pytest.mark.shared_data
def test_browse_ground_truth_on_coco_tiny(tmp_path: Path) -> None:
    data = json.loads(COCO_VAL.read_text())
    ids = [data["images"][0]["id"], data["images"][1]["id"]]
    result = CliRunner().invoke(app, ["viz", "--ann", str(COCO_VAL), "--images", str(COCO_VAL_IMAGES),
                                      "--ids", f"{ids[0]},{ids[1]}", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["checkpoint"] is None and [e["image_id"] for e in doc["images"]] == ids
    for entry in doc["images"]:
        img = next(i for i in data["images"] if i["id"] == entry["image_id"])
        assert entry["files"] == [str(tmp_path / f"{Path(img['file_name']).stem}_gt.png")]
        boxes = [[x, y, x + w, y + h] for a in data["annotations"] if a["image_id"] == img["id"] for x, y, w, h in [a["bbox"]]]
        assert entry["gt"] == len(boxes)
        source = cv2.imread(str(COCO_VAL_IMAGES / img["file_name"]))
        diff = changed(entry["files"][0], source)
        assert not (diff & ~near_boxes(boxes, source.shape)).any()
        assert diff.any()

    bad = CliRunner().invoke(app, ["viz", "--ann", str(COCO_VAL), "--images", str(COCO_VAL_IMAGES), "--ids", "7", "--json"])
    assert bad.exit_code == 2 and "image id 7" in json.loads(bad.stdout)["error"]


def test_newest_checkpoint_is_used_and_named(setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # Written first, deeper and sorting first by name: only its later modification time makes it the newest.
    new = save_untrained(tmp_path / "runs" / "a" / "sub" / "last.pt", ["data.root=nowhere"])
    old = save_untrained(tmp_path / "runs" / "b" / "last.pt", [f"data.root={setup['shapes']}"])
    os.utime(old, (2_000_000_000, 2_000_000_000))
    os.utime(new, (2_000_000_100, 2_000_000_100))
    result = CliRunner().invoke(app, ["viz", str(setup["big"]), "--score-thresh", "0", "--out", "o", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["checkpoint"] == "runs/a/sub/last.pt"
    assert "newest checkpoint: runs/a/sub/last.pt" in result.stderr
    # Its recipe's data are not there: classes are labelled by index, and the command says so.
    assert doc["class_names_from"] is None and "no class names in nowhere" in result.stderr
    assert {d["name"] for d in doc["images"][0]["detections"]} <= {f"class {i}" for i in range(6)}
    assert Path("o/big_det.png").is_file()


def test_no_checkpoint_anywhere_fails_with_a_hint(setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["viz", str(setup["big"]), "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout)["exit_code"] == 2
    assert "--checkpoint" in result.stderr and "runs/**/last.pt" in result.stderr
    assert not (tmp_path / "viz").exists()


@pytest.mark.parametrize("args, culprit", [
    ([], "give IMAGE"),
    (["x.png", "--images", "d"], "--images/--ids"),
    (["--ann", str(COCO_VAL)], "--images DIR"),
    pytest.param(["--ann", str(COCO_VAL), "--images", str(COCO_VAL_IMAGES), "--heatmaps"], "--heatmaps",
                 marks=pytest.mark.shared_data),
    (["missing.png", "--checkpoint", "c.pt"], "missing.png: image file not found"),
    (["x.png", "--set", "test.k=5"], "--set: overrides a recipe"),
])
def test_usage_errors_exit_2(args: list[str], culprit: str) -> None:
    result = CliRunner().invoke(app, ["viz", *args, "--json"])
    assert result.exit_code == 2
    assert culprit in json.loads(result.stdout)["error"]


def test_heat_heads_of_the_triplet_family(setup: dict[str, Path], tmp_path: Path) -> None:
    from kpnet.config import load_recipe
    from kpnet.engine.checkpoint import save_checkpoint
    from kpnet.models import build_model

    recipe = load_recipe(REPO / "recipes" / "centernet_triplet_hg52.yaml", [
        f"data.root={setup['shapes']}", "data.val_ann=annotations/instances_val.json", "data.val_images=val",
        "model.num_classes=6", *TINY_HOURGLASS])
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", build_model(recipe), recipe)
    image = setup["shapes"] / "val" / "000001.jpg"
    result = CliRunner().invoke(app, ["viz", str(image), "--checkpoint", str(ckpt), "--heatmaps", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.stderr
    files = json.loads(result.stdout)["files"]
    assert files == [str(tmp_path / f"000001_{k}.png") for k in ("det", "heat_tl_heat", "heat_br_heat", "heat_ct_heat")]
    source = cv2.imread(str(image))
    for path in files[1:]:
        heat = cv2.imread(path)
        assert heat.shape == source.shape
        assert np.abs(heat.astype(int) - source.astype(int)).mean() > 10


def test_draw_regions_outlines_region_and_marks_its_centre() -> None:
    from kpnet.viz import draw_regions

    image = np.full((100, 120, 3), 90, np.uint8)
    drawn = draw_regions(image, np.array([[20.0, 30.0, 60.0, 70.0], [80.0, 10.0, 100.0, 30.0]]),
                         np.array([[40.0, 50.0], [np.nan, np.nan]]), [1, 2])
    diff = (drawn != image).any(axis=2)
    for box in ([20, 30, 60, 70], [80, 10, 100, 30]):
        ys, xs = outline(box, diff.shape)
        assert diff[ys, xs].all()
    assert diff[50, 40]  # the validating centre's dot
    assert not diff[20, 90]  # the second box has no centre: its inside stays untouched
    assert not diff[90, 5]


def tiny_checkpoint(path: Path, recipe_name: str, shapes: Path, *overrides: str) -> Path:
    """An untrained one-stack 8-wide hourglass model of a corner-family recipe, saved as a checkpoint for `shapes`."""
    from kpnet.config import load_recipe
    from kpnet.engine.checkpoint import save_checkpoint
    from kpnet.models import build_model

    recipe = load_recipe(REPO / "recipes" / f"{recipe_name}.yaml", [
        f"data.root={shapes}", "data.val_ann=annotations/instances_val.json", "data.val_images=val",
        "model.num_classes=6", *TINY_HOURGLASS, *overrides])
    torch.manual_seed(0)
    return save_checkpoint(path, build_model(recipe), recipe)


def draws_overlay(ckpt: Path, source: Path, flag: str, out: Path) -> None:
    """`viz SOURCE --checkpoint CKPT FLAG` writes its overlay PNG last (named after FLAG), the image's size."""
    result = CliRunner().invoke(app, ["viz", str(source), "--checkpoint", str(ckpt), flag, "--score-thresh", "0",
                                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    files = json.loads(result.stdout)["files"]
    assert files[-1] == str(out / f"{source.stem}_{flag.lstrip('-')}.png")
    assert cv2.imread(files[-1]).shape == cv2.imread(str(source)).shape


def test_regions_of_triplet_models(setup: dict[str, Path], tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "tri.pt", "centernet_triplet_hg52", setup["shapes"])
    draws_overlay(ckpt, setup["shapes"] / "val" / "000002.jpg", "--regions", tmp_path)


@pytest.mark.parametrize("flag", ["--regions", "--masks"])
def test_overlays_are_refused_for_models_without_them(setup: dict[str, Path], flag: str) -> None:
    """An objects-as-points model has neither central regions nor masks: exit 2 naming the flag."""
    image = setup["shapes"] / "val" / "000002.jpg"
    points = CliRunner().invoke(app, ["viz", str(image), "--checkpoint", str(setup["ckpt"]), flag, "--json"])
    assert points.exit_code == 2 and flag in json.loads(points.stdout)["error"]


def test_regions_of_centripetalnet_draw_both_decoded_centres(setup: dict[str, Path], tmp_path: Path) -> None:
    from kpnet.viz import draw_regions

    image = np.full((100, 120, 3), 90, np.uint8)
    drawn = draw_regions(image, np.array([[20.0, 30.0, 60.0, 70.0]]), np.array([[35.0, 45.0, 45.0, 55.0]]), [1])
    diff = (drawn != image).any(axis=2)
    assert diff[45, 35] and diff[55, 45] and not diff[50, 40]  # a dot at each centre, none between them
    ckpt = tiny_checkpoint(tmp_path / "cp.pt", "centripetalnet_small_shapes", setup["shapes"])
    source = setup["shapes"] / "val" / "000002.jpg"
    draws_overlay(ckpt, source, "--regions", tmp_path)


def test_draw_masks_fills_each_instance_in_its_class_colour() -> None:
    from kpnet.viz import class_colour, draw_masks

    image = np.full((60, 80, 3), 90, np.uint8)
    masks = np.zeros((2, 60, 80), bool)
    masks[0, 10:30, 10:40] = True
    masks[1, 35:55, 50:75] = True
    drawn = draw_masks(image, masks, [1, 4], alpha=0.5)
    assert (drawn[20, 25].astype(int) == ((90 + np.array(class_colour(1))) * 0.5).astype(int)).all()
    assert (drawn[45, 62] != image[45, 62]).any() and (drawn[5, 5] == image[5, 5]).all()


def test_masks_of_a_mask_model(setup: dict[str, Path], tmp_path: Path) -> None:
    """`viz --masks` writes IMAGE_masks.png for a model with the mask head."""
    ckpt = tiny_checkpoint(tmp_path / "m.pt", "centripetalnet_small_shapes_mask", setup["shapes"])
    draws_overlay(ckpt, setup["shapes"] / "val" / "000002.jpg", "--masks", tmp_path)
