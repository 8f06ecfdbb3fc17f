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


ENUM_FIELDS = {  # every enumerated recipe field -> a misspelt value
    "family": "cornernett",
    "model.backbone": "resnet-18",
    "targets.radius_mode": "legacy",
    "augment.crop": "centrenet",
    "test.nms": "gausian",
    "test.centripetal_mu": "oficial",
    "train.on_nonfinite": "skipp",
    "test.precision": "bf61",
    "test.compile": "onn",
}


def _enum_fields(cls: type, prefix: str = "") -> set[str]:
    """Dotted names of every Literal-typed field of the recipe schema."""
    import typing

    found = set()
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            found |= _enum_fields(tp, f"{prefix}{name}.")
        elif typing.get_origin(tp) is typing.Literal:
            found.add(f"{prefix}{name}")
    return found


def test_enum_fields_are_all_covered() -> None:
    assert _enum_fields(Recipe) == set(ENUM_FIELDS)


@pytest.mark.parametrize("key", sorted(ENUM_FIELDS))
def test_unknown_enum_value_names_file_key_and_valid_values(key: str, tmp_path: Path) -> None:
    """A misspelt enumeration stops at load, naming the file, the key and the valid values (no silent default)."""
    import typing

    section, _, field = key.rpartition(".")
    cls = Recipe
    for part in filter(None, section.split(".")):
        cls = typing.get_type_hints(cls)[part]
    valid = typing.get_args(typing.get_type_hints(cls)[field])
    path = tmp_path / "typo.yaml"
    body = f"{field}: {ENUM_FIELDS[key]}\n" if not section else f"{section}:\n  {field}: {ENUM_FIELDS[key]}\n"
    path.write_text(f"extends: {REPO / 'recipes' / 'quickstart.yaml'}\n{body}")
    with pytest.raises(KpnetError) as e:
        load_recipe(path)
    line = e.value.line()
    assert line.startswith(str(path)) and f"{key}: unknown value {ENUM_FIELDS[key]!r}" in line
    assert f"valid values: {', '.join(valid)}" in line
    with pytest.raises(KpnetError, match=f"{key}: unknown value"):
        load_recipe(REPO / "recipes" / "quickstart.yaml", [f"{key}={ENUM_FIELDS[key]}"])


def test_misspelt_nms_exits_2_on_the_command_line(tmp_path: Path) -> None:
    from conftest import run_cli

    proc = run_cli("eval", "recipes/quickstart.yaml", "--checkpoint", str(tmp_path / "none.pt"),
                   "--set", "test.nms=gausian", "--json")
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()
    assert len(line) == 1 and "test.nms: unknown value 'gausian'" in line[0]
    assert "valid values: none, soft_gaussian, soft_linear, hard" in line[0]


def test_enums_match_what_the_code_builds() -> None:
    """The schema's family and backbone names are exactly the detectors and backbones kpnet builds."""
    import typing

    from kpnet.backbones import BACKBONES
    from kpnet.config import Backbone, Family, NmsMode
    from kpnet.engine.inference import NMS_METHODS
    from kpnet.models import FAMILIES

    assert set(typing.get_args(Family)) == set(FAMILIES)
    assert set(typing.get_args(Backbone)) == set(BACKBONES)
    assert set(typing.get_args(NmsMode)) == set(NMS_METHODS)


def test_hard_nms_can_be_chosen_from_a_recipe() -> None:
    r = load_recipe(REPO / "recipes" / "quickstart.yaml", ["test.nms=hard"])
    assert r.test.nms == "hard"


def test_a_model_key_the_network_does_not_read_stops_at_load_time(tmp_path: Path) -> None:
    """A key of another backbone or family (set to other than its default) would change nothing: an error naming
    where it was set, the key, and the keys the network does read."""
    from kpnet.config import with_overrides

    quickstart = REPO / "recipes" / "quickstart.yaml"
    with pytest.raises(KpnetError) as e:
        load_recipe(quickstart, ["model.width=8"])
    line = e.value.line()
    assert line.startswith("--set: model.width:") and "hourglass_small" in line and "hg_dims" in line
    assert load_recipe(quickstart, ["model.width=64"]).model.width == 64  # the default: harmless

    mine = tmp_path / "mine.yaml"
    res18 = REPO / "recipes" / "centernet_points_res18.yaml"
    mine.write_text(f"extends: {res18}\nmodel:\n  backbone: dla34\n  up_channels: [64, 32, 32]\n")
    with pytest.raises(KpnetError) as e:
        load_recipe(mine)
    line = e.value.line()
    assert line.startswith(f"{mine}: model.up_channels:") and "dla34" in line and "head_conv" in line
    mine.write_text(f"extends: {res18}\nmodel:\n  backbone: dla34\n")  # inherited ResNet keys cannot be unset
    assert load_recipe(mine).model.backbone == "dla34"

    cornernet = load_recipe(REPO / "recipes" / "cornernet_small_shapes.yaml")
    with pytest.raises(KpnetError, match=r"--set: model.head_conv: neither the hourglass_small backbone nor the "
                                         r"cornernet family reads it \(they read model.stacks, .*, model.cascade\)"):
        with_overrides(cornernet, ["model.head_conv=16"])
    with pytest.raises(KpnetError, match=r"--set: loss.wh_weight: .* \(they read loss.pull_weight, loss.push_weight\)"):
        with_overrides(cornernet, ["loss.wh_weight=0.2"])
    assert with_overrides(cornernet, ["loss.pull_weight=0.2"]).loss.pull_weight == 0.2


def test_train_with_a_key_the_network_does_not_read_exits_2(tmp_path: Path) -> None:
    from conftest import run_cli

    proc = run_cli("train", "recipes/quickstart.yaml", "--set", "model.deformable=false", "--out", str(tmp_path / "t"))
    assert proc.returncode == 2 and not (tmp_path / "t").exists()
    line = proc.stderr.strip().splitlines()
    assert len(line) == 1 and "model.deformable: neither the hourglass_small backbone" in line[0]


# A value other than the default for each key the tables below cover.
CHANGED = {"model.width": 32, "model.up_channels": [64, 32, 32], "model.deformable": False, "model.head_conv": 32,
           "model.cascade": True, "model.center_pool": False, "model.stacks": 1, "model.hg_dims": [16, 16, 16, 16, 16],
           "model.hg_modules": [1, 1, 1, 1, 1], "model.hg_stem": 8, "model.hg_cnv": 16, "model.mask": True,
           "loss.wh_weight": 0.3, "loss.pull_weight": 0.3, "loss.push_weight": 0.3, "loss.guiding_weight": 0.3,
           "loss.centripetal_weight": 0.3, "loss.hp_weight": 0.3, "loss.hm_hp_weight": 0.3}
READ_BY_ALL = {"model.backbone", "model.num_classes", "loss.hm_weight", "loss.off_weight", "loss.chunk_size",
               "loss.mask_weight"}  # mask_weight: read by the mask head (model.mask), which the schema checks
SMALL = {"model.backbone": "hourglass_small", "model.stacks": 1, "model.hg_dims": [8, 8, 8, 8, 8],
         "model.hg_modules": [1, 1, 1, 1, 1], "model.hg_stem": 8, "model.hg_cnv": 8}


def small_recipe(family: str, keys: dict) -> Recipe:
    raw: dict = {"family": family}
    for key, value in {"model.num_classes": 3, **keys}.items():
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    return recipe_from_dict(raw)


def network_signature(family: str, keys: dict) -> list:
    """The network's modules, their plain settings and the parameter shapes (built on the meta device)."""
    import torch

    from kpnet.models import build_model

    with torch.device("meta"):
        network = build_model(small_recipe(family, keys))
    signature: list = [(name, tuple(p.shape)) for name, p in network.state_dict().items()]
    for name, module in network.named_modules():
        settings = sorted((k, v) for k, v in vars(module).items()
                          if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str, tuple)))
        signature.append((name, type(module).__name__, settings))
    return signature


def test_key_tables_cover_every_model_and_loss_key() -> None:
    import typing

    from kpnet.config import BACKBONE_KEYS, FAMILY_KEYS, Backbone, Family, LossConfig, ModelConfig

    fields = {f"model.{f.name}" for f in dataclasses.fields(ModelConfig)}
    fields |= {f"loss.{f.name}" for f in dataclasses.fields(LossConfig)}
    assert set(CHANGED) == fields - READ_BY_ALL
    assert set(BACKBONE_KEYS) == set(typing.get_args(Backbone)) and set(FAMILY_KEYS) == set(typing.get_args(Family))


def test_model_key_tables_match_the_networks_built() -> None:
    """BACKBONE_KEYS / FAMILY_KEYS: changing a model key changes the network exactly when the tables say it is read."""
    from kpnet.config import BACKBONE_KEYS, FAMILY_KEYS, MASK_FAMILIES

    model_keys = {k for k in CHANGED if k.startswith("model.")}
    for backbone in BACKBONE_KEYS:
        base = network_signature("centernet_points", {"model.backbone": backbone})
        for key in model_keys - {"model.mask", *FAMILY_KEYS["centernet_points"]}:
            changed = network_signature("centernet_points", {"model.backbone": backbone, key: CHANGED[key]})
            assert (changed != base) == (key in BACKBONE_KEYS[backbone]), (backbone, key)
    for family in FAMILY_KEYS:
        base = network_signature(family, SMALL)
        for key in model_keys - set(SMALL):
            if key == "model.mask" and family not in MASK_FAMILIES:
                continue  # refused by the schema itself (tests/test_masks.py)
            changed = network_signature(family, {**SMALL, key: CHANGED[key]})
            assert (changed != base) == (key in FAMILY_KEYS[family]), (family, key)


def test_loss_key_table_matches_the_losses_computed() -> None:
    """FAMILY_KEYS: changing a loss weight changes the family's training loss exactly when the table says it is read
    (the same network, outputs and targets: two objects, so every term, the push between them too, is non-zero)."""
    import numpy as np
    import torch

    from kpnet.config import FAMILY_KEYS
    from kpnet.models import build_detector

    boxes, classes = np.array([[4.0, 6.0, 24.0, 26.0], [8.0, 16.0, 30.0, 30.0]], np.float32), np.array([0, 2])
    joints = np.concatenate([np.random.default_rng(0).uniform(8, 24, (2, 17, 2)), np.full((2, 17, 1), 2.0)], 2)
    for family in FAMILY_KEYS:
        torch.manual_seed(0)
        detector = build_detector(small_recipe(family, SMALL))
        extra = {"keypoints": joints.astype(np.float32)} if family == "centernet_pose" else {}
        target = detector.target_renderer()(boxes, classes, out_hw=(32, 32), **extra)
        targets = {k: torch.from_numpy(v)[None] for k, v in target.items()}
        outputs = detector.network.train()(torch.randn(1, 3, 128, 128))
        base = detector.loss(outputs, targets)["loss"].item()
        for key in (k for k in CHANGED if k.startswith("loss.")):
            changed = type(detector)(small_recipe(family, {**SMALL, key: CHANGED[key]}), detector.network)
            assert (changed.loss(outputs, targets)["loss"].item() != base) == (key in FAMILY_KEYS[family]), (family, key)
