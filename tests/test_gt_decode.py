"""All-ground-truth decoding (objects as points Table 7, last row): heads rendered by kpnet.targets
and decoded through the same test pipeline must give bbox AP >= 0.99."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from kpnet import evaluation
from kpnet.analysis.error_analysis import predict_with_replacement
from kpnet.config import load_recipe
from kpnet.data.dataset import load_index
from kpnet.detectors.centernet_points import CenterNetPointsDetector

REPO = Path(__file__).resolve().parents[1]


def all_gt_ap(root: Path, ann: str, images: str, num_classes: int) -> dict[str, float]:
    # at the original resolution, as the paper's oracle (quickstart's test.input_size would resize to 128)
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [f"data.root={root}", f"model.num_classes={num_classes}",
                                                                "test.input_size=null"])
    index = load_index(root / ann, root / images)
    detector = CenterNetPointsDetector(recipe, nn.Identity())  # every head replaced: the network never runs
    results = predict_with_replacement(detector, index, set(detector.heads))
    return evaluation.bbox_stats(index.coco, evaluation.load_dets(results, index.coco, source="all-gt"))


def test_all_gt_points_decode_on_shapes(shapes_small: Path) -> None:
    stats = all_gt_ap(shapes_small, "annotations/instances_val.json", "val", 6)
    assert stats["AP"] >= 0.99


def test_all_gt_points_decode_on_coco_tiny(data_dir: Path) -> None:
    stats = all_gt_ap(data_dir / "coco_tiny", "annotations/instances_val2017.json", "val2017", 80)
    assert stats["AP"] >= 0.99
    assert stats["AP"] < 1.0  # same-class centre collisions cost a little, as the paper's 99.5
