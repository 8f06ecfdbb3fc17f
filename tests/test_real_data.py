"""A user's own COCO export without round trips (issue 18): `--data DIR` finds Roboflow/CVAT-style layouts,
`model.num_classes: auto` takes the count from the training annotations and the checkpoint records the classes,
annotation ids of 0 are renumbered in memory with a warning (and score), the test scale follows training
(`test.input_size`) and a model tested at a scale it never saw says so. The slow training test is the acceptance
run: recipes/custom_small.yaml on bccd."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO, TINY_RESNET
from kpnet.cli import app
from kpnet.config import load_recipe, resolved_input_size
from kpnet.data.dataset import data_overrides, load_split
from kpnet.data.shapes import CLASS_NAMES
from kpnet.data.validate import load_coco_checked, load_gt
from kpnet.engine.checkpoint import read_checkpoint
from kpnet.engine.inference import scale_warning
from kpnet.engine.train import schedule
from kpnet.errors import KpnetError, KpnetWarning

CUSTOM = REPO / "recipes" / "custom_small.yaml"
QUICK = ["data.num_workers=0", "train.batch_size=2", "train.iterations=2", "train.warmup_iters=0",
         "train.channels_last=false", *TINY_RESNET]
PAPER = ["centernet_points_res18", "centernet_points_res101", "centernet_points_res101_multiscale",
         "centernet_points_dla34", "centernet_points_hg104", "cornernet_hg104", "cornernet_hg104_multiscale",
         "cornernet_hg52", "centernet_triplet_hg104", "centernet_triplet_hg104_multiscale", "centernet_triplet_hg52",
         "centernet_triplet_hg52_multiscale", "centripetalnet_hg104", "centripetalnet_hg104_multiscale",
         "centripetalnet_hg52"]


def sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def roboflow_export(shapes: Path, out: Path, val_folder: str = "valid") -> Path:
    """The shapes set laid out as Roboflow exports it: split folders, `_annotations.coco.json` beside the images,
    image and annotation ids from 0."""
    for split, folder in (("train", "train"), ("val", val_folder)):
        doc = json.loads((shapes / "annotations" / f"instances_{split}.json").read_text())
        (out / folder).mkdir(parents=True)
        first = doc["images"][0]["id"]
        for im in doc["images"]:
            shutil.copy(shapes / split / im["file_name"], out / folder / im["file_name"])
            im["id"] -= first
        for i, ann in enumerate(doc["annotations"]):
            ann["id"], ann["image_id"] = i, ann["image_id"] - first
        (out / folder / "_annotations.coco.json").write_text(json.dumps(doc))
    return out


@pytest.fixture(scope="module")
def export(shapes_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return roboflow_export(shapes_small, tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def trained(export: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run") / "run"
    res = CliRunner().invoke(app, ["train", str(CUSTOM), "--data", str(export), "--out", str(out), *sets(QUICK),
                                   "--json"])
    assert res.exit_code == 0, res.output
    return out / "last.pt", {"stdout": res.stdout, "stderr": res.stderr}


def test_data_finds_roboflow_and_cvat_layouts(export: Path, tmp_path: Path, shapes_small: Path) -> None:
    keys = data_overrides(export)
    assert keys == {"data.root": str(export), "data.train_ann": "train/_annotations.coco.json",
                    "data.train_images": "train", "data.val_ann": "valid/_annotations.coco.json",
                    "data.val_images": "valid"}
    cvat = roboflow_export(shapes_small, tmp_path / "cvat", val_folder="val")
    assert data_overrides(cvat)["data.val_ann"] == "val/_annotations.coco.json"
    assert data_overrides(shapes_small) == {"data.root": str(shapes_small)}  # a COCO layout: the recipe's paths
    with pytest.raises(KpnetError, match="no such data folder"):
        data_overrides(tmp_path / "nowhere")


def test_num_classes_auto_and_the_checkpoint_records_the_classes(trained: tuple[Path, dict]) -> None:
    ckpt, _ = trained
    doc = read_checkpoint(ckpt)
    assert load_recipe(CUSTOM).model.num_classes == "auto"
    assert doc["recipe"]["model"]["num_classes"] == len(CLASS_NAMES)
    assert doc["class_names"] == list(CLASS_NAMES) and doc["cat_ids"] == list(range(1, len(CLASS_NAMES) + 1))


def test_annotation_id_zero_is_renumbered_with_one_warning_line(trained: tuple[Path, dict], export: Path) -> None:
    _, out = trained
    ann = export / "train" / "_annotations.coco.json"
    lines = [line for line in out["stderr"].splitlines() if line.startswith("warning:")]
    assert lines == [f"warning: {ann}: annotation id 0 (image 0) renumbered to {json.loads(ann.read_text())['annotations'][-1]['id'] + 1} "
                     "in memory: pycocotools cannot match a ground-truth id 0 (`kpnet prepare-data coco --fix` writes a "
                     "renumbered copy)"]
    assert json.loads(out["stdout"])["warnings"] == [lines[0].removeprefix("warning: ")]
    with pytest.warns(KpnetWarning, match="annotation id 0"):
        doc = load_coco_checked(ann, None)
    assert 0 not in {a["id"] for a in doc["annotations"]} and doc["images"][0]["id"] == 0  # image ids are kept


def test_eval_with_auto_classes_and_the_split_options(trained: tuple[Path, dict], export: Path, tmp_path: Path) -> None:
    ckpt, _ = trained
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(CUSTOM), "--data", str(export), "--checkpoint", str(ckpt),
                              "--out", str(tmp_path / "r.json"), *sets(QUICK), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["split"] == "val" and doc["images"] == 24 and doc["input_size"] == 256
    res = runner.invoke(app, ["eval", str(CUSTOM), "--data", str(export), "--checkpoint", str(ckpt), "--split", "test",
                              *sets(QUICK), "--json"])
    assert res.exit_code == 2 and "no test split here" in json.loads(res.stdout)["error"]
    res = runner.invoke(app, ["error-analysis", str(CUSTOM), "--data", str(export), "--checkpoint", str(ckpt),
                              "--replace", "hm,wh,reg", *sets(QUICK), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"]
    assert rows[1]["bbox"]["AP"] > 0.9  # every head from ground truth decodes back at test.input_size 256


def test_a_fixed_class_count_that_disagrees_still_stops(export: Path) -> None:
    r = load_recipe(CUSTOM, [f"data.root={export}", "model.num_classes=3", "data.val_ann=valid/_annotations.coco.json"])
    with pytest.warns(KpnetWarning), pytest.raises(KpnetError, match=r"has 6 categories but the recipe sets model.num_classes=3 \(use --set "
                                         r"model.num_classes=6, or auto\)"):
        load_split(r, "val")


def test_id_zero_ground_truth_scores_one_for_itself(export: Path, tmp_path: Path) -> None:
    """The acceptance of the renumbering: ground truth scored against itself is AP 1.0 (pycocotools alone cannot
    match the id-0 box); results keep the file's image ids, 0 included."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ann = export / "valid" / "_annotations.coco.json"
    raw = json.loads(ann.read_text())
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in raw["annotations"]]
    assert any(d["image_id"] == 0 for d in dets)
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    res = CliRunner().invoke(app, ["eval", "--gt", str(ann), "--dets", str(tmp_path / "dets.json"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["bbox"]["AP"] == 1.0
    assert res.stderr.startswith(f"warning: {ann}: annotation id 0 (image 0) renumbered")
    with contextlib.redirect_stdout(io.StringIO()):  # the control: pycocotools on the raw file
        gt = COCO(str(ann))
        e = COCOeval(gt, gt.loadRes(str(tmp_path / "dets.json")), "bbox")
        e.evaluate(), e.accumulate(), e.summarize()
    assert e.stats[0] < 1.0


@pytest.mark.shared_data
def test_bccd_ground_truth_scores_one_after_renumbering(data_dir: Path) -> None:
    """bccd's raw self-evaluation is AP 0.905 in pycocotools (shared/data README); through kpnet it is 1.0."""
    from kpnet import evaluation

    ann = data_dir / "bccd" / "test" / "_annotations.coco.json"
    with pytest.warns(KpnetWarning, match="renumbered"):
        gt = load_gt(ann)
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in json.loads(ann.read_text())["annotations"]]
    assert evaluation.stats_dict(evaluation.evaluate(gt, evaluation.load_dets(dets, gt)))["AP"] == 1.0


def test_scale_warning_names_both_scales() -> None:
    custom = load_recipe(CUSTOM)
    line = scale_warning(load_recipe(CUSTOM, ["test.input_size=null"]), load_recipe(CUSTOM, ["test.input_size=null"]).test,
                         [(1371, 2048)] * 3)
    assert line is not None and "longer side of 197-427 px (train.input_size 256 with augment.scales 0.6-1.3)" in line
    assert "tested at 2048 px (the original resolution (test.input_size null)" in line and "test.input_size 256" in line
    assert scale_warning(custom, custom.test, [(1371, 2048)]) is None  # the default: the longer side to 256
    small = load_recipe(CUSTOM, ["test.scales=[0.5]"])
    assert "tested at 128 px (test.input_size 256, test scale 0.5" in scale_warning(small, small.test, [(416, 416)])
    # COCO hides the problem: the paper recipes test ~640 px images at their original resolution, inside 394-853
    paper = load_recipe(REPO / "recipes" / "centernet_points_res18.yaml")
    assert scale_warning(paper, paper.test, [(480, 640), (427, 640)]) is None
    assert scale_warning(paper, paper.test, [(1371, 2048)]) is not None
    corner = load_recipe(REPO / "recipes" / "cornernet_hg104.yaml")  # original-resolution crops
    assert scale_warning(corner, corner.test, [(1371, 2048)]) is None
    shrunk = load_recipe(REPO / "recipes" / "cornernet_hg104.yaml", ["test.input_size=511"])
    assert "set test.input_size null" in scale_warning(shrunk, shrunk.test, [(1371, 2048)])


def test_eval_warns_when_tested_at_a_scale_never_trained(trained: tuple[Path, dict], export: Path) -> None:
    ckpt, _ = trained
    res = CliRunner().invoke(app, ["eval", str(CUSTOM), "--data", str(export), "--checkpoint", str(ckpt),
                                   *sets(QUICK), "--set", "test.input_size=64", "--out", str(ckpt.parent / "r64.json"), "--json"])
    assert res.exit_code == 0, res.output
    warnings = [w for w in json.loads(res.stdout)["warnings"] if "trained" in w]
    assert len(warnings) == 1 and "at a longer side of 197-427 px" in warnings[0] and "tested at 64 px" in warnings[0]


def test_the_test_scale_follows_training_and_paper_recipes_keep_theirs() -> None:
    assert resolved_input_size(load_recipe(CUSTOM).test, load_recipe(CUSTOM)) == 256
    auto = load_recipe(CUSTOM, ["train.input_size=320"])
    assert resolved_input_size(auto.test, auto) == 320
    quick = load_recipe(REPO / "recipes" / "quickstart.yaml")
    assert resolved_input_size(quick.test, quick) == 128  # the 128 px shapes images: the same as their original size
    for name in PAPER:
        r = load_recipe(REPO / "recipes" / f"{name}.yaml")
        assert r.test.input_size is None and r.model.num_classes == 80, name
    for name in ("cornernet_small_shapes", "centernet_triplet_small_shapes", "centripetalnet_small_shapes"):
        r = load_recipe(REPO / "recipes" / f"{name}.yaml")
        assert resolved_input_size(r.test, r) is None, name  # original-resolution crops: tested at original resolution


def test_the_schedule_is_a_number_of_iterations_whatever_the_data_size() -> None:
    tr = load_recipe(CUSTOM).train
    assert schedule(tr, per_epoch=13) == schedule(tr, per_epoch=1300) == (2000, [1600, 1860])
    paper = load_recipe(REPO / "recipes" / "centernet_points_res18.yaml").train
    assert schedule(paper, per_epoch=924) == (140 * 924, [90 * 924, 120 * 924])


@pytest.mark.slow
@pytest.mark.training
@pytest.mark.shared_data
def test_custom_small_on_bccd_reaches_ap50_080(data_dir: Path, tmp_path: Path) -> None:
    """The acceptance run: `kpnet train recipes/custom_small.yaml --data bccd` with no other flag, then the
    default eval on bccd test (2000 iterations: 6-15 minutes on 2 cores)."""
    bccd = data_dir / "bccd"
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(CUSTOM), "--data", str(bccd), "--out", str(tmp_path / "run"), "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval", str(CUSTOM), "--data", str(bccd), "--split", "test", "--checkpoint",
                              str(tmp_path / "run" / "last.pt"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["bbox"]["AP50"] >= 0.80
