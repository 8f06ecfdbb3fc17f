"""`kpnet error-analysis`: the paper's rows (objects as points Table 7), the baseline equal to `kpnet eval`,
every head replaced by ground truth reaching AP >= 0.99 on shapes and on coco_tiny, and bad head names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kpnet.cli import app
from kpnet.cli.error_analysis import parse_groups, row_label
from kpnet.models import FAMILIES
from kpnet.errors import KpnetError

from conftest import REPO, TINY_HOURGLASS, TINY_QUICKSTART, run_cli, shared_data_dir

DATA = shared_data_dir()
COCO_TINY = DATA / "coco_tiny"
RECIPE = REPO / "recipes" / "quickstart.yaml"
AP_KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def _sets(values: list[str]) -> list[str]:
    return [arg for v in values for arg in ("--set", v)]


def untrained_checkpoint(path: Path, overrides: list[str]) -> Path:
    """A freshly built quickstart model saved as a checkpoint. Its size head is made constant and
    positive (zero weights, bias 6 cells) so every predicted box has a positive width, as COCO results need."""
    from kpnet.config import load_recipe
    from kpnet.engine.checkpoint import save_checkpoint
    from kpnet.models import build_model

    recipe = load_recipe(RECIPE, overrides)
    torch.manual_seed(0)
    model = build_model(recipe)
    with torch.no_grad():
        model.wh[0][-1].weight.zero_()
        model.wh[0][-1].bias.fill_(6.0)
    return save_checkpoint(path, model, recipe)


@pytest.fixture(scope="module")
def shapes_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    from kpnet.data.shapes import make_shapes

    root = tmp_path_factory.mktemp("ea_shapes")
    make_shapes(root / "shapes", num_train=8, num_val=6, image_size=128, seed=1)
    overrides = [f"data.root={root / 'shapes'}", "data.num_workers=0", *TINY_QUICKSTART]
    return untrained_checkpoint(root / "ckpt.pt", overrides), overrides


def test_paper_rows_and_labels() -> None:
    # Objects as points Table 7: w/ gt size, w/ gt heatmap, w/ gt heatmap+size, w/ gt hm.+size+offset.
    paper = FAMILIES["centernet_points"].error_rows
    rows = [heads for heads, _ in paper]
    assert rows == [("wh",), ("hm",), ("hm", "wh"), ("hm", "wh", "reg")]
    assert [row_label(r, paper) for r in ((), *rows)] == [
        "baseline", "w/ gt size", "w/ gt heatmap", "w/ gt heatmap+size", "w/ gt hm.+size+offset"]
    assert row_label(("reg",), paper) == "w/ gt reg"  # a row the paper does not have


def test_every_family_has_paper_rows_ending_with_all_heads() -> None:
    for family, detector in FAMILIES.items():
        heads, rows = detector.heads, detector.error_rows
        assert rows[-1][0] == heads, family
        assert all(r == tuple(h for h in heads if h in r) for r, _ in rows), family


def test_parse_groups_orders_dedupes_and_names_the_culprit() -> None:
    heads = ("hm", "wh", "reg")
    assert parse_groups(["wh,hm", "hm+wh", "reg"], heads, "centernet_points") == [("hm", "wh"), ("reg",)]
    with pytest.raises(KpnetError, match=r"unknown head 'tl_heat'.*valid heads: hm, wh, reg"):
        parse_groups(["hm,tl_heat"], heads, "centernet_points")
    with pytest.raises(KpnetError, match="empty head group"):
        parse_groups([","], heads, "centernet_points")


def test_default_rows_baseline_equals_eval_and_all_gt_on_shapes(shapes_setup: tuple[Path, list[str]], tmp_path: Path) -> None:
    ckpt, overrides = shapes_setup
    proc = run_cli("error-analysis", str(RECIPE), "--checkpoint", str(ckpt), *_sets(overrides), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # the whole of stdout is one JSON document
    assert (doc["family"], doc["split"], doc["checkpoint"]) == ("centernet_points", "val", str(ckpt))
    assert [r["replace"] for r in doc["rows"]] == [[], ["wh"], ["hm"], ["hm", "wh"], ["hm", "wh", "reg"]]
    assert all(list(r["bbox"]) == AP_KEYS for r in doc["rows"])
    assert doc["rows"][-1]["bbox"]["AP"] >= 0.99
    assert doc["rows"][0]["bbox"]["AP"] < 0.5  # an untrained model: the rows really differ

    ev = CliRunner().invoke(app, ["eval", str(RECIPE), "--checkpoint", str(ckpt), *_sets(overrides),
                                  "--out", str(tmp_path / "results.json"), "--json"])
    assert ev.exit_code == 0, ev.stderr
    assert doc["rows"][0]["bbox"] == {k: json.loads(ev.stdout)["bbox"][k] for k in AP_KEYS}


def test_unknown_head_exits_2_naming_it(shapes_setup: tuple[Path, list[str]]) -> None:
    ckpt, overrides = shapes_setup
    result = CliRunner().invoke(app, ["error-analysis", str(RECIPE), "--checkpoint", str(ckpt), *_sets(overrides),
                                      "--replace", "hm,offset", "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout)["exit_code"] == 2
    assert "'offset'" in result.stderr and "hm, wh, reg" in result.stderr


@pytest.mark.slow  # the baseline row runs the network over 80 COCO images: 15 s idle, ~100 s on a loaded 2-core box
@pytest.mark.shared_data
def test_all_heads_replaced_on_coco_tiny(tmp_path: Path) -> None:
    overrides = [
        f"data.root={COCO_TINY}", "data.train_ann=annotations/instances_train2017.json", "data.train_images=train2017",
        "data.val_ann=annotations/instances_val2017.json", "data.val_images=val2017", "model.num_classes=80",
        "data.num_workers=0", "test.input_size=null", *TINY_QUICKSTART,  # the oracle at the original resolution
    ]
    ckpt = untrained_checkpoint(tmp_path / "ckpt.pt", overrides)
    result = CliRunner().invoke(app, ["error-analysis", str(RECIPE), "--checkpoint", str(ckpt), *_sets(overrides),
                                      "--replace", "reg+wh+hm", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["images"] == 80
    assert [r["replace"] for r in doc["rows"]] == [[], ["hm", "wh", "reg"]]
    assert doc["rows"][1]["bbox"]["AP"] >= 0.99


@pytest.mark.parametrize("family", ["cornernet", "centernet_triplet", "centripetalnet"])
def test_all_heads_replaced_for_corner_families_on_shapes(family: str, shapes_setup: tuple[Path, list[str]],
                                                          tmp_path: Path) -> None:
    from kpnet.config import load_recipe
    from kpnet.engine.checkpoint import save_checkpoint
    from kpnet.models import build_model

    root = shapes_setup[1][0].split("=", 1)[1]
    overrides = [
        f"data.root={root}", "data.train_ann=annotations/instances_train.json", "data.train_images=train",
        "data.val_ann=annotations/instances_val.json", "data.val_images=val", "data.num_workers=0",
        "model.num_classes=6", *TINY_HOURGLASS,
    ]
    recipe_path = REPO / "recipes" / f"{family}_hg52.yaml"
    recipe = load_recipe(recipe_path, overrides)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", build_model(recipe), recipe)
    heads = list(FAMILIES[family].heads)
    result = CliRunner().invoke(app, ["error-analysis", str(recipe_path), "--checkpoint", str(ckpt), *_sets(overrides),
                                      "--replace", ",".join(reversed(heads)), "--json"])
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert [r["replace"] for r in rows] == [[], heads]
    assert rows[1]["label"] == "w/ gt all heads" and rows[1]["bbox"]["AP"] >= 0.99
