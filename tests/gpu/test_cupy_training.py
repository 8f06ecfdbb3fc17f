"""Training through the CuPy path on the stand-in (tests/gpu/conftest.py) prints the losses that training with
KPNET_KERNELS=emulate prints, on a tiny generated shapes set (batch 4): the small CornerNet and triplet recipes
for 3 iterations in the default suite, CornerNet for 20 among the slow tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kpnet.config import load_recipe
from kpnet.data.shapes import make_shapes
from kpnet.engine.train import train

REPO = Path(__file__).resolve().parents[2]


def _losses(recipe_name: str, iterations: int, root: Path, out: Path) -> list[dict]:
    recipe = load_recipe(REPO / "recipes" / recipe_name, [
        f"data.root={root}", "data.num_workers=0", f"train.max_iterations={iterations}", "train.log_every=1",
        "train.batch_size=4", "train.checkpoint_every=100000",
    ])
    train(recipe, out)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("recipe", "iterations"), [
    ("cornernet_small_shapes.yaml", 3),
    ("centernet_triplet_small_shapes.yaml", 3),
    pytest.param("cornernet_small_shapes.yaml", 20, marks=pytest.mark.slow),
])
def test_training_losses_equal_emulate(standin, monkeypatch, tmp_path, recipe, iterations):
    make_shapes(tmp_path / "shapes", num_train=16, num_val=2, image_size=128, seed=5)
    monkeypatch.setenv("KPNET_KERNELS", "emulate")
    want = _losses(recipe, iterations, tmp_path / "shapes", tmp_path / "emulate")
    monkeypatch.setenv("KPNET_KERNELS", "cuda")
    launched = len(standin.cupy.log.launches)
    got = _losses(recipe, iterations, tmp_path / "shapes", tmp_path / "cupy")
    assert len(standin.cupy.log.launches) > launched
    names = {launch["name"] for launch in standin.cupy.log.launches}
    assert any(n.startswith("corner_pool_backward") for n in names)
    assert len(want) == iterations and got == want
