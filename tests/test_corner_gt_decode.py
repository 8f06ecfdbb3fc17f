"""All-ground-truth decoding for the corner families (CornerNet Table 3 / triplet Table 5, last row):
heatmaps, offsets, embeddings and centres rendered from the annotations replace every head, and the
unchanged test pipeline (pad to 128k − 1, decode, map back, soft-NMS) must give bbox AP >= 0.99.

The coco_tiny cases decode 80-class maps of ~128×192 cells per image; on the full val set (80 images)
each takes ~25 s on a loaded 2-core machine, so the full runs are `slow` and the default suite runs the
first 16 images of val2017 with the same code path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from kpnet import evaluation
from kpnet.analysis.error_analysis import predict_with_replacement
from kpnet.config import load_recipe
from kpnet.data.dataset import load_index
from kpnet.models import FAMILIES

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"cornernet": "cornernet_hg104.yaml", "centernet_triplet": "centernet_triplet_hg104.yaml"}


def all_gt_ap(recipe_name: str, root: Path, ann: str, images: str, num_classes: int, sets: list[str], limit: int = 0) -> float:
    recipe = load_recipe(REPO / "recipes" / recipe_name, [f"data.root={root}", f"model.num_classes={num_classes}", *sets])
    index = load_index(root / ann, root / images)
    if limit:
        keep = index.image_ids[:limit]
        index.coco.dataset["images"] = [i for i in index.coco.dataset["images"] if i["id"] in keep]
        index.coco.dataset["annotations"] = [a for a in index.coco.dataset["annotations"] if a["image_id"] in keep]
        index.coco.createIndex()
        index.image_ids[:] = keep
    detector = FAMILIES[recipe.family](recipe, nn.Identity())  # every head replaced: the network never runs
    results = predict_with_replacement(detector, index, set(detector.heads))
    return evaluation.bbox_stats(index.coco, evaluation.load_dets(results, index.coco, source="all-gt"))["AP"]


@pytest.mark.parametrize("family", sorted(RECIPES))
def test_all_gt_decode_on_shapes(shapes_small: Path, family: str) -> None:
    """With flip (the recipes' test) the flipped copy gets flipped ground truth and the boxes are concatenated."""
    ap = all_gt_ap(RECIPES[family], shapes_small, "annotations/instances_val.json", "val", 6, [])
    assert ap >= 0.99


@pytest.mark.parametrize("family", sorted(RECIPES))
def test_all_gt_decode_on_coco_tiny_subset(data_dir: Path, family: str) -> None:
    ap = all_gt_ap(RECIPES[family], data_dir / "coco_tiny", "annotations/instances_val2017.json", "val2017", 80,
                   ["test.flip=false"], limit=16)
    assert ap >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(RECIPES))
def test_all_gt_decode_on_coco_tiny(data_dir: Path, family: str) -> None:
    ap = all_gt_ap(RECIPES[family], data_dir / "coco_tiny", "annotations/instances_val2017.json", "val2017", 80,
                   ["test.flip=false"])
    assert ap >= 0.99


def test_all_gt_triplet_multiscale_on_shapes(shapes_small: Path) -> None:
    """The multi-scale triplet test (scales 0.6-1.8, centres from scale 1, soft-NMS merge) keeps AP >= 0.99."""
    ap = all_gt_ap("centernet_triplet_hg104_multiscale.yaml", shapes_small, "annotations/instances_val.json", "val", 6, [])
    assert ap >= 0.99
