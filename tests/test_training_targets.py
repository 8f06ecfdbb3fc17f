"""Training runs to the issues' stated targets (`make test-slow` only, about 25 minutes on 2 cores):
the two small corner recipes trained on `shapes` reach bbox AP50 >= 0.7 each, and the triplet model's
FD rate (IoU 0.05:0.05:0.5) is below CornerNet's (triplet paper, Table 3). Same data, schedule and seed
as `benchmarks/corner_small_shapes.py`, which prints the figures the README quotes."""

from __future__ import annotations

from pathlib import Path

import pytest

from kpnet import evaluation
from kpnet.api import load_checkpoint
from kpnet.config import load_recipe
from kpnet.data.dataset import load_index
from kpnet.data.shapes import make_shapes
from kpnet.engine.inference import predict_dataset
from kpnet.engine.train import train

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.training]


def _train_and_score(recipe_name: str, data: Path, out: Path) -> tuple[dict[str, float], dict[str, float]]:
    recipe = load_recipe(REPO / "recipes" / recipe_name, [f"data.root={data}"])
    summary = train(recipe, out / recipe.name)
    index = load_index(data / "annotations" / "instances_val.json", data / "val")
    results = predict_dataset(load_checkpoint(summary["checkpoint"]), index)
    dets = evaluation.load_dets(results, index.coco, source=recipe.name)
    return evaluation.bbox_stats(index.coco, dets), evaluation.fd_rates(index.coco, dets)


def test_small_corner_recipes_reach_ap50_and_triplet_lowers_fd(tmp_path: Path) -> None:
    data = tmp_path / "shapes"
    make_shapes(data, num_train=2000, num_val=200, image_size=128, seed=0)
    cornernet, cornernet_fd = _train_and_score("cornernet_small_shapes.yaml", data, tmp_path)
    triplet, triplet_fd = _train_and_score("centernet_triplet_small_shapes.yaml", data, tmp_path)
    assert cornernet["AP50"] >= 0.7, cornernet
    assert triplet["AP50"] >= 0.7, triplet
    assert triplet_fd["FD"] < cornernet_fd["FD"], (triplet_fd, cornernet_fd)
