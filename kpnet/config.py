"""Recipes: a typed, frozen schema read from YAML with `extends:` and `--set key=value` overrides.

An unknown key is an error naming the file, the key and the closest valid key. Values are
checked against the field types, so a typo fails at load time rather than mid-training.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from kpnet.errors import KpnetError


# The recipe's enumerations: a value outside these stops at load time naming the key and the valid values.
Family = Literal["centernet_points", "cornernet", "centernet_triplet", "centripetalnet", "centernet_pose"]
Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101", "hourglass104", "hourglass52", "hourglass_small",
                   "dla34"]
RadiusMode = Literal["legacy_bug", "cornernet_fixed"]  # REFERENCE §2.2: XZ/DK published numbers; CN since 3e71377
CropMode = Literal["centernet", "cornernet"]  # REFERENCE §5: XZ side max(h, w)·s affine; CN/DK 511·s window
NmsMode = Literal["none", "soft_gaussian", "soft_linear", "hard"]  # REFERENCE §4.5 methods 2, 1, 0
# CentripetalNet's central-region scale μ (REFERENCE §4.4): the official code (KD) uses 1/2.1 for boxes of area
# <= 3500 input pixels and 1/2.4 above; the paper (§3.1) and mmdetection use the reverse values.
CentripetalMu = Literal["official", "paper", "mmdetection"]
NonFinite = Literal["stop", "skip"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]  # the inference engine's autocast (kpnet/engine/accelerate.py)
Switch = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class DataConfig:
    """Where the COCO-format data lives; paths are relative to `root`."""

    root: str = "data/shapes"
    train_ann: str = "annotations/instances_train.json"
    train_images: str = "train"
    val_ann: str = "annotations/instances_val.json"
    val_images: str = "val"
    test_ann: str = "annotations/instances_test.json"  # `--split test`
    test_images: str = "test"
    num_workers: int = 2


@dataclass(frozen=True)
class ModelConfig:
    """The network: a backbone and the family's heads."""

    backbone: Backbone = "resnet18"
    num_classes: int | Literal["auto"] = "auto"  # "auto": the training annotations' category count
    width: int = 64  # ResNet stem width; 64 is the paper's ResNet-18/101
    up_channels: tuple[int, ...] = (256, 128, 64)  # the three up-convolution stages (objects as points §4)
    deformable: bool = True  # 3x3 deformable conv before each up-convolution (objects as points §5)
    head_conv: int = 64
    cascade: bool = False  # corner families: cascade corner pooling (triplet §3.3, Table 4 "CCP")
    center_pool: bool = True  # centernet_triplet: center pooling on the centre branch (Table 4 "CTP")
    stacks: int = 2  # hourglass_small: number of stacks (HG-104 / HG-52 fix theirs at 2 / 1)
    hg_dims: tuple[int, ...] = (32, 32, 48, 48, 64)  # hourglass_small: channels per level
    hg_modules: tuple[int, ...] = (1, 1, 1, 1, 2)  # hourglass_small: residuals per level (last = innermost)
    hg_stem: int = 16  # hourglass_small: stem width
    hg_cnv: int = 32  # hourglass_small: width of the per-stack `cnv` features the heads read
    mask: bool = False  # centripetalnet: the instance-mask head (CentripetalNet §3.3)


@dataclass(frozen=True)
class TargetConfig:
    """Ground-truth rendering (REFERENCE §2)."""

    radius_mode: RadiusMode = "legacy_bug"
    min_overlap: float = 0.7
    max_objs: int = 128


@dataclass(frozen=True)
class LossConfig:
    """Loss weights (objects as points eq. 4: L = L_k + λsize L_size + λoff L_off)."""

    hm_weight: float = 1.0
    wh_weight: float = 0.1
    off_weight: float = 1.0
    pull_weight: float = 0.1  # corner families: associative-embedding pull (CornerNet eq. 4, REFERENCE §3.2)
    push_weight: float = 0.1  # corner families: associative-embedding push (CornerNet eq. 5)
    guiding_weight: float = 0.05  # centripetalnet: α of the guiding-shift loss (CentripetalNet eq. 9)
    centripetal_weight: float = 1.0  # centripetalnet: the centripetal-shift loss (eq. 2, 9)
    mask_weight: float = 1.0  # centripetalnet with model.mask: the per-RoI mask cross entropy (eq. 8, 9)
    hp_weight: float = 1.0  # centernet_pose: L1 of the joint offsets from the centre (objects as points §4.2)
    hm_hp_weight: float = 1.0  # centernet_pose: focal loss of the joint heatmaps (§4.2); their offsets use off_weight
    chunk_size: int = 0  # evaluate the loss per chunk of this many images and average (REFERENCE §3.5); 0 = whole batch


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (REFERENCE §5)."""

    scales: tuple[float, ...] = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)
    border: int = 128  # random crop centres stay this far inside the image, halved for small images (REFERENCE §5)
    flip: float = 0.5
    color_jitter: float = 0.4
    lighting: float = 0.1
    crop: CropMode = "centernet"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation schedule: Adam with step decay by 10 at `lr_steps` (epochs)."""

    input_size: int = 512
    batch_size: int = 128  # the global batch: split over the ranks of a distributed run and the accumulate steps
    accumulate: int = 1  # gradient-accumulation steps per iteration: each rank runs batch/(ranks·accumulate) images at once
    sync_bn: bool = False  # distributed CUDA runs: SyncBatchNorm over the ranks' micro-batches (not over accumulate steps)
    lr: float = 5e-4
    epochs: int = 140
    lr_steps: tuple[int, ...] = (90, 120)
    # The schedule as a total number of iterations, whatever the data set's size (0: `epochs` of the training
    # set), with lr/10 at these fractions of it (`lr_steps` counts epochs and applies only to an epoch schedule).
    iterations: int = 0
    lr_step_fractions: tuple[float, ...] = ()
    warmup_iters: int = 0
    grad_clip: float = 0.0  # max grad norm; 0 disables
    amp: bool = True  # mixed precision: float16 on CUDA, bfloat16 on CPUs with native bf16 (AVX512-BF16/AMX)
    channels_last: bool = False  # NHWC activations; faster convolutions on CPU (oneDNN)
    checkpoint_every: int = 500  # iterations
    log_every: int = 10  # iterations
    max_iterations: int = 0  # stop early after this many iterations (smoke runs); 0 = the full schedule
    seed: int = 317
    on_nonfinite: NonFinite = "stop"  # a NaN/inf loss term: "stop" with an error, or "skip" the step
    nonfinite_limit: int = 10  # with "skip": stop after this many non-finite steps in a row


@dataclass(frozen=True)
class TestConfig:
    """Test-time settings (REFERENCE §4.3, §4.5, §4.6)."""

    k: int = 100
    flip: bool = False
    # Test images are resized so their longer side is this (then × each of `scales`) before padding; null keeps
    # the original resolution (the papers' test); "auto": train.input_size where training crops whole images
    # (augment.crop centernet: the crop side is max(h, w)·s), null for the original-resolution crops (cornernet).
    input_size: int | Literal["auto"] | None = "auto"
    scales: tuple[float, ...] = (1.0,)
    pad: int = 31  # inputs padded to (h | pad) + pad_add: 31 for ResNet/DLA, 127 for hourglass
    pad_add: int = 1  # 1: a multiple of pad + 1 (XZ); 0: (h | 127) = 128k − 1 (CornerNet / triplets, REFERENCE §4.6)
    ae_threshold: float = 0.5  # corner families: pairs with |e_tl − e_br| > this are rejected (REFERENCE §4.1)
    num_dets: int = 1000  # corner families: best pairs kept per image and scale before NMS
    nms_merge: bool = False  # soft-NMS with box merging (`soft_nms_merge`, corner families' multi-scale test)
    weight_exp: float = 8.0  # merge weight exponent; the multi-scale CornerNet / triplet configs use 10
    central_region: bool = True  # centernet_triplet: rescore boxes by centres (off = CornerNet decode; Table 4 "CRE")
    region_area: float = 22500.0  # centernet_triplet: n = region_n_small for box area <= this (original pixels)
    region_n_small: float = 3.0
    region_n_large: float = 5.0
    centripetal_mu: CentripetalMu = "official"  # centripetalnet: which rule sets μ of the central region
    centripetal_area: float = 3500.0  # centripetalnet: the μ switch, box area in input pixels (REFERENCE §4.4)
    centripetal_weighting: bool = False  # centripetalnet: score × eq. 5's exp(-|dx||dy|/area(R)); off = the codes' mean
    joint_snap: bool = True  # centernet_pose: snap regressed joints to joint-heatmap peaks (§4.2); off = Table 5 "reg"
    joint_threshold: float = 0.1  # centernet_pose: joint-heatmap peaks above this are snapping candidates (§4.2)
    joint_snap_distance: float = 0.3  # centernet_pose: a peak farther than this × the box's longer side is not taken
    nms: NmsMode = "none"  # per-class NMS after decoding; multi-scale tests always merge (gaussian when "none")
    nms_sigma: float = 0.5
    nms_threshold: float = 0.5
    max_per_image: int = 100
    mask_threshold: float = 0.5  # model.mask: a pasted mask's pixels at or above this probability are the instance
    round_decimals: int = 2  # boxes and scores in the COCO json rounded as the reference does (REFERENCE §4.5); -1 keeps all
    engine: bool = True  # the inference engine (kpnet/engine/accelerate.py); false: the network as trained, eager fp32
    precision: Precision = "auto"  # the network's test-time arithmetic; auto: bf16 on CUDA, and for HG-104/52 on CPUs with native bf16; else fp32
    compile: Switch = "auto"  # torch.compile the inference copy of the network; auto: off (slower on CPU: README "Inference speed")
    batch_size: int = 1  # eval: images per network call (those whose inputs share a shape); README "Inference speed"


@dataclass(frozen=True)
class Recipe:
    """A complete, immutable description of a detector: what to build, train and test."""

    name: str = "recipe"
    family: Family = "centernet_points"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    targets: TargetConfig = field(default_factory=TargetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)
    source: str = ""  # the file it was loaded from (informational)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolved_input_size(test: TestConfig, recipe: Recipe) -> int | None:
    """`test.input_size` resolved against the recipe's training: the longer side test images are resized to, or None."""
    if test.input_size != "auto":
        return test.input_size
    return recipe.train.input_size if recipe.augment.crop == "centernet" else None


def with_num_classes(recipe: Recipe, count: int) -> Recipe:
    """The recipe with `model.num_classes: auto` replaced by `count` (the training annotations' categories)."""
    if recipe.model.num_classes != "auto":
        return recipe
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, num_classes=count))


SHIPPED_RECIPES = Path(__file__).resolve().parents[1] / "recipes"
MASK_FAMILIES = ("centripetalnet",)  # families whose network has the instance-mask head (CentripetalNet §3.3)
# The keys that only some backbones or families read (kpnet/backbones, kpnet/detectors; tests/test_config.py holds
# the tables to the networks and losses built). A recipe that sets one its backbone and family do not read, to other
# than its default, would change nothing, so it stops at load time.
BACKBONE_KEYS: dict[str, tuple[str, ...]] = {
    **{name: ("model.width", "model.up_channels", "model.deformable")
       for name in ("resnet18", "resnet34", "resnet50", "resnet101")},
    "hourglass_small": ("model.stacks", "model.hg_dims", "model.hg_modules", "model.hg_stem", "model.hg_cnv"),
    "hourglass104": (), "hourglass52": (), "dla34": (),
}
_CORNER_KEYS = ("model.cascade", "loss.pull_weight", "loss.push_weight")
FAMILY_KEYS: dict[str, tuple[str, ...]] = {
    "centernet_points": ("model.head_conv", "loss.wh_weight"),
    "centernet_pose": ("model.head_conv", "loss.wh_weight", "loss.hp_weight", "loss.hm_hp_weight"),
    "cornernet": _CORNER_KEYS,
    "centernet_triplet": (*_CORNER_KEYS, "model.center_pool"),
    "centripetalnet": ("model.mask", "loss.guiding_weight", "loss.centripetal_weight"),
}
_SPECIFIC_KEYS = frozenset(k for table in (BACKBONE_KEYS, FAMILY_KEYS) for keys in table.values() for k in keys)


def load_recipe(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> Recipe:
    """Load a recipe YAML (following `extends:`), apply `key=value` overrides, validate, freeze."""
    path = Path(path)
    own = _read_yaml(path)  # the file's own keys (checked below): those it inherits through `extends:` it cannot unset
    own_keys = [f"{section}.{key}" for section, keys in own.items() if isinstance(keys, dict) for key in keys]
    raw = _read_with_extends(path, seen=(), root=path.resolve().parent, data=own)
    items: list[tuple[str, Any]] = []
    if overrides:
        items = list(overrides.items()) if isinstance(overrides, dict) else [_split_override(o) for o in overrides]
        for key, value in items:
            _set_dotted(raw, key, value, source="--set")
    raw.setdefault("source", str(path))
    recipe = recipe_from_dict(raw, source=str(path))
    _check_keys_read(recipe, own_keys, str(path))
    _check_keys_read(recipe, [key for key, _ in items], "--set")
    return recipe


def with_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """A recipe (e.g. a checkpoint's) with `key=value` overrides applied and checked as `load_recipe` does."""
    raw = recipe.to_dict()
    items = [_split_override(o) for o in overrides]
    for key, value in items:
        _set_dotted(raw, key, value, source="--set")
    changed = recipe_from_dict(raw, source=recipe.source or "--set")
    _check_keys_read(changed, [key for key, _ in items], "--set")
    return changed


def _check_keys_read(recipe: Recipe, keys: Iterable[str], source: str) -> None:
    """Each of `keys` (dotted keys a recipe file or `--set` names) that only some backbones or families read, set to
    other than its default, must be one that the recipe's backbone or family reads."""
    read = (*BACKBONE_KEYS[recipe.model.backbone], *FAMILY_KEYS[recipe.family])
    for key in keys:
        if key not in _SPECIFIC_KEYS or key in read:
            continue
        section, name = key.split(".")
        if getattr(getattr(recipe, section), name) != getattr(getattr(Recipe(), section), name):
            same = ", ".join(k for k in read if k.startswith(f"{section}.")) or f"no other {section} keys"
            raise KpnetError(source, f"{key}: neither the {recipe.model.backbone} backbone nor the {recipe.family} "
                                     f"family reads it (they read {same}); remove it")


def recipe_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Recipe:
    """Build a frozen Recipe from a plain dict (e.g. one stored in a checkpoint), checking every key."""
    recipe = _build(Recipe, raw, source, prefix="")
    if recipe.model.mask and recipe.family not in MASK_FAMILIES:
        raise KpnetError(source, f"model.mask: the {recipe.family} family has no instance-mask head "
                                 f"(families with one: {', '.join(MASK_FAMILIES)})")
    return recipe


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KpnetError(path, "recipe file not found") from None
    except OSError as e:
        raise KpnetError(path, f"cannot read recipe: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise KpnetError(path, f"invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KpnetError(path, "a recipe must be a mapping of keys to values")
    return data


def _read_with_extends(path: Path, seen: tuple[Path, ...], root: Path, data: dict[str, Any] | None = None
                       ) -> dict[str, Any]:
    """A recipe merged over the chain it extends, each under `root` (the first one's folder) or kpnet's recipes/;
    `data`: the file's content when already read."""
    resolved = path.resolve()
    if resolved in seen:
        raise KpnetError(path, "recipe `extends:` cycle")
    data = _read_yaml(path) if data is None else data
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise KpnetError(path, "`extends:` must be a path to another recipe")
    target = (path.parent / parent).resolve()
    if not (target.is_relative_to(root) or target.is_relative_to(SHIPPED_RECIPES)):
        raise KpnetError(path, f"`extends: {parent}` leaves the recipe's folder {root} (and kpnet's recipes/); "
                               "copy the base recipe next to it")
    base = _read_with_extends(path.parent / parent, seen + (resolved,), root)
    _deep_merge(base, data)
    return base


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> None:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def _split_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise KpnetError("--set", f"expected key=value, got {text!r}")
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def _set_dotted(raw: dict[str, Any], key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise KpnetError(source, f"{key}: {part} is not a section")
    node[parts[-1]] = value


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise KpnetError(source, f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    valid = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in valid:
            close = difflib.get_close_matches(str(key), sorted(valid), n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
            raise KpnetError(source, f"unknown key {prefix}{key}{hint}")
        kwargs[key] = _coerce(hints[key], value, source, f"{prefix}{key}")
    return cls(**kwargs)


# Numbers as people write them; YAML 1.1 reads `1e-3` and `5E-4` (no dot) as strings.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
# YAML 1.1's boolean words, in any case (a quoted "true" or `--set x=Yes` is still meant as one).
_BOOLEANS = {w: True for w in ("true", "yes", "on", "y")} | {w: False for w in ("false", "no", "off", "n")}


def _as_list(value: Any) -> list[Any]:
    """A list value as written: a YAML list, `0.5,1` or `[0.5, 1]` as text, or a single value."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str) and "," in value:
        text = value.strip()
        if text[:1] + text[-1:] in ("[]", "()"):
            text = text[1:-1]
        return [_scalar(part) for part in text.split(",")]
    return [value]


def _scalar(text: str) -> Any:
    """One item of a comma-separated list, read as YAML reads a scalar (text that is not YAML stays text)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text.strip()
    return text.strip() if isinstance(value, (dict, list)) or value is None else value


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, prefix=f"{key}.")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, source, key)
            except KpnetError:
                continue
        raise KpnetError(source, f"{key}: {value!r} is not a valid {tp}")
    if origin is tuple:
        (item_type, *_rest) = typing.get_args(tp)
        return tuple(_coerce(item_type, v, source, key) for v in _as_list(value))
    if origin is Literal:
        options = typing.get_args(tp)
        if isinstance(value, bool) and "on" in options:  # YAML 1.1 reads an unquoted on / off as a boolean
            value = "on" if value else "off"
        if not isinstance(value, str):
            raise KpnetError(source, f"{key}: expected a string, got {value!r}; valid values: {', '.join(options)}")
        if value in options:
            return value
        close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise KpnetError(source, f"{key}: unknown value {value!r}; {hint}valid values: {', '.join(options)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOLEANS:
            return _BOOLEANS[value.strip().lower()]
        raise KpnetError(source, f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise KpnetError(source, f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)
        raise KpnetError(source, f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise KpnetError(source, f"{key}: expected a string, got {value!r}")
    raise KpnetError(source, f"{key}: unsupported type {tp}")
