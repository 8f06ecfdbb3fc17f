"""Recipes: schema, `extends:`, `--set` overrides, and errors that name file, key and the closest key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kpnet.config import Recipe, load_recipe, recipe_from_dict
from kpnet.errors import KpnetError

REPO = Path(__file__).resolve().parents[1]


def test_every_shipped_recipe_loads() -> None:
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        r = load_recipe(path)
        assert isinstance(r, Recipe) and r.name


def test_paper_settings_of_points_recipes() -> None:
    for name, depth in [("centernet_points_res18", "resnet18"), ("centernet_points_res101", "resnet101")]:
        r = load_recipe(REPO / "recipes" / f"{name}.yaml")
        assert r.model.backbone == depth and r.model.deformable
        assert r.model.up_channels == (256, 128, 64)
        assert (r.train.input_size, r.train.batch_size, r.train.lr) == (512, 128, 5e-4)
        assert (r.train.epochs, r.train.lr_steps) == (140, (90, 120))
        assert (r.loss.wh_weight, r.loss.off_weight) == (0.1, 1.0)
        assert r.test.k == 100
        assert r.model.num_classes == 80


def test_extends_and_overrides(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("name: base\nmodel:\n  width: 32\n  num_classes: 3\ntrain:\n  lr: 0.1\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nname: child\ntrain:\n  batch_size: 4\n")
    r = load_recipe(child, ["train.lr=0.5", "test.scales=[0.5,1]", "model.deformable=false"])
    assert r.name == "child" and r.model.width == 32 and r.model.num_classes == 3
    assert r.train.batch_size == 4 and r.train.lr == 0.5
    assert r.test.scales == (0.5, 1.0) and r.model.deformable is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.name = "x"  # type: ignore[misc]
    assert recipe_from_dict(r.to_dict()) == dataclasses.replace(r)


def test_unknown_key_names_file_key_and_closest(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_sise: 4\n")
    with pytest.raises(KpnetError) as e:
        load_recipe(bad)
    line = e.value.line()
    assert str(bad) in line and "train.batch_sise" in line and "train.batch_size" in line


def test_bad_values_and_files(tmp_path: Path) -> None:
    with pytest.raises(KpnetError, match="expected an integer"):
        load_recipe(REPO / "recipes" / "quickstart.yaml", ["train.batch_size=big"])
    with pytest.raises(KpnetError, match="unknown key model.widht"):
        load_recipe(REPO / "recipes" / "quickstart.yaml", ["model.widht=3"])
    with pytest.raises(KpnetError, match="key=value"):
        load_recipe(REPO / "recipes" / "quickstart.yaml", ["nonsense"])
    with pytest.raises(KpnetError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(KpnetError, match="invalid YAML"):
        load_recipe(broken)
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop.yaml\n")
    with pytest.raises(KpnetError, match="cycle"):
        load_recipe(loop)
