"""The family interface: a `Detector` holds a family's network, the recipe it was built from and its
decode settings, and turns images into `Detections` (docs/architecture.md, "The family interface").

The test pipeline (kpnet.engine.inference) calls `decode` once per scale on the network's raw heads,
maps what it returns to original-image pixels, and hands every scale to `postprocess`; training calls
`target_renderer` (in DataLoader workers) and `loss`; error analysis calls `gt_heads`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from kpnet.backbones import build_backbone
from kpnet.config import ModelConfig, Recipe, TestConfig
from kpnet.engine.accelerate import inference_network

TargetRenderer = Callable[..., dict[str, np.ndarray]]  # (boxes, classes, out_hw=(h, w)) -> target arrays
# (segmentations, augmentation affine, original (h, w), augmented input-pixel boxes, classes) -> mask target arrays
MaskEncoder = Callable[[list[Any], np.ndarray, tuple[int, int], np.ndarray, np.ndarray], dict[str, np.ndarray]]


def grid_to_image(coords: Tensor, meta: dict[str, float], down_x: float, down_y: float) -> Tensor:
    """(..., 2k) output-grid x, y pairs -> original image pixels: x = (x·inp/out − border)/scale, clipped (REFERENCE §4.6)."""
    out = coords.clone()
    s = meta["scale"]
    out[..., 0::2] = ((coords[..., 0::2] * down_x - meta["border_x"]) / s).clamp(0, meta["width"])
    out[..., 1::2] = ((coords[..., 1::2] * down_y - meta["border_y"]) / s).clamp(0, meta["height"])
    return out


@dataclass(frozen=True)
class Detections:
    """Detections of one image: boxes (N, 4) x1, y1, x2, y2, scores (N,), classes (N,) as contiguous class
    indices, and the family's extras — `corner_scores` (N, 2) s_tl, s_br of corner families (they weight the
    multi-scale merge, REFERENCE §4.5) and `centres`: (N, 2) the triplet centre keypoint that validated each
    box (triplet §3.1), or (N, 4) the two centres CentripetalNet decodes from the corners' centripetal shifts
    (tl then br, x, y each; CentripetalNet eq. 1); `masks` (N, 28, 28) instance-mask probabilities on a grid
    over each box (CentripetalNet §3.3); `keypoints` (N, J, 3) the joints of a pose family (x, y, confidence;
    objects as points §4.2). Coordinates are output-grid units inside `decode`, image pixels after it."""

    boxes: Tensor
    scores: Tensor
    classes: Tensor
    corner_scores: Tensor | None = None
    centres: Tensor | None = None
    masks: Tensor | None = None
    keypoints: Tensor | None = None

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def select(self, index: Tensor) -> Detections:
        """The rows `index` (a boolean mask or indices) of every field."""
        return Detections(**{f.name: None if (v := getattr(self, f.name)) is None else v[index]
                             for f in dataclasses.fields(self)})

    def replace(self, **changes: Any) -> Detections:
        return dataclasses.replace(self, **changes)

    def to_image(self, meta: dict[str, float], down_x: float, down_y: float) -> Detections:
        """Boxes (and centres, keypoints) mapped from the output grid to image pixels, as float32 on the CPU."""
        cpu = self.to_cpu()
        mapped = cpu.replace(
            boxes=grid_to_image(cpu.boxes.float(), meta, down_x, down_y), scores=cpu.scores.float(),
            centres=None if cpu.centres is None else grid_to_image(cpu.centres.float(), meta, down_x, down_y),
        )
        if cpu.keypoints is None:
            return mapped
        kps = cpu.keypoints.float().clone()
        kps[..., :2] = grid_to_image(kps[..., :2].reshape(len(kps), -1), meta, down_x, down_y).reshape(kps[..., :2].shape)
        return mapped.replace(keypoints=kps)

    def to_cpu(self) -> Detections:
        return Detections(**{f.name: None if (v := getattr(self, f.name)) is None else v.cpu()
                             for f in dataclasses.fields(self)})

    @staticmethod
    def cat(parts: Sequence[Detections]) -> Detections:
        """Rows of several Detections, in order; a field is kept only when every part has it."""
        fields: dict[str, Tensor | None] = {}
        for f in dataclasses.fields(Detections):
            values = [getattr(p, f.name) for p in parts]
            fields[f.name] = None if any(v is None for v in values) else torch.cat(values)
        return Detections(**fields)


@dataclass(frozen=True)
class Keypoints:
    """Keypoints of one image that are not boxes (the triplet centres): xy (M, 2), scores (M,), classes (M,)."""

    xy: Tensor
    scores: Tensor
    classes: Tensor

    def to_image(self, meta: dict[str, float], down_x: float, down_y: float) -> Keypoints:
        return Keypoints(grid_to_image(self.xy.float().cpu(), meta, down_x, down_y), self.scores.float().cpu(),
                         self.classes.cpu())


@dataclass(frozen=True)
class GridFeatures:
    """One scale's feature map (1, C, h, w) on the output grid, with what maps image pixels onto that grid."""

    features: Tensor
    meta: dict[str, float]
    down_x: float
    down_y: float

    def to_grid(self, boxes: Tensor) -> Tensor:
        """(N, 4) image-pixel boxes -> output-grid units: x·scale + border, / stride (`grid_to_image` inverted)."""
        s = self.meta["scale"]
        out = boxes.clone().float()
        out[:, 0::2] = (boxes[:, 0::2] * s + self.meta["border_x"]) / self.down_x
        out[:, 1::2] = (boxes[:, 1::2] * s + self.meta["border_y"]) / self.down_y
        return out


@dataclass(frozen=True)
class ScaleOutput:
    """What `decode` returns for one test scale: the detections, centre keypoints where the family has them,
    and the scale's mask features where the network has a mask head (set by the test pipeline)."""

    detections: Detections
    centres: Keypoints | None = None
    mask_features: GridFeatures | None = None

    def to_image(self, meta: dict[str, float], down_x: float, down_y: float) -> ScaleOutput:
        centres = None if self.centres is None else self.centres.to_image(meta, down_x, down_y)
        return ScaleOutput(self.detections.to_image(meta, down_x, down_y), centres, self.mask_features)


class Detector(ABC):
    """A family's network, the recipe it was built from and its decode settings (built once from the recipe).

    A family subclasses this with: `heads` (the raw outputs, in the paper's order), `heat_heads` (those that
    are class heatmaps), `error_rows` (the error-analysis rows of its paper), `build_network`,
    `target_renderer`, `loss`, `decode`, `gt_heads`, and `postprocess` when scales do not simply concatenate.
    """

    heads: ClassVar[tuple[str, ...]]
    heat_heads: ClassVar[tuple[str, ...]]
    error_rows: ClassVar[tuple[tuple[tuple[str, ...], str], ...]]  # (heads replaced, the paper's row name)
    has_central_regions: ClassVar[bool] = False  # whether `central_regions` draws anything (viz --regions)
    export_outputs: ClassVar[tuple[str, ...]] = ()  # the outputs of `export_decode`, in order (empty: no export decode)
    export_meanings: ClassVar[dict[str, str]] = {}  # the sidecar's description of outputs this family reads its own way
    # (left, right) joint index pairs for a family that trains on keypoints (swapped on a horizontal flip); None: boxes only
    flip_pairs: ClassVar[tuple[tuple[int, int], ...] | None] = None

    def __init__(self, recipe: Recipe, network: nn.Module | None = None) -> None:
        self.recipe = recipe
        self.network = network if network is not None else self.build_network(build_backbone(recipe.model), recipe.model)
        self.class_names: list[str] | None = None  # the training set's category names, when a checkpoint recorded them
        self.cat_ids: list[int] | None = None  # the training set's category ids (class c <-> cat_ids[c]), likewise

    @staticmethod
    @abstractmethod
    def build_network(backbone: nn.Module, model: ModelConfig) -> nn.Module:
        """The family's network on `backbone`: forward(images) -> one dict of raw heads per stack."""

    @abstractmethod
    def target_renderer(self) -> TargetRenderer:
        """A picklable function (boxes, classes, out_hw=(h, w)) -> target arrays for one image, in output-grid units."""

    @abstractmethod
    def loss(self, outputs: list[dict[str, Tensor]], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """The family's loss: `loss` (the total) and each weighted term, from every stack's outputs."""

    @abstractmethod
    def decode(self, outputs: dict[str, Tensor], flip: bool) -> ScaleOutput:
        """One scale's heads (a batch of 1, or 2 with its flipped copy) -> detections in output-grid units."""

    @abstractmethod
    def gt_heads(self, boxes: np.ndarray, classes: np.ndarray, out_hw: tuple[int, int]) -> dict[str, Tensor]:
        """Ground truth shaped as network outputs for a batch of one (the papers' error analyses)."""

    def postprocess(self, per_scale: Sequence[ScaleOutput], scales: tuple[float, ...]) -> Detections:
        """Every scale's detections in image pixels -> the image's detections before NMS: concatenated."""
        return Detections.cat([s.detections for s in per_scale])

    @property
    def has_masks(self) -> bool:
        """Whether the network has an instance-mask head (`predict_masks` fills `Detections.masks`)."""
        return False

    def mask_encoder(self, ratio: float, out_hw: tuple[int, int]) -> MaskEncoder | None:
        """A picklable renderer of mask targets for the training samples, or None without a mask head
        (`ratio` = output / input side, `out_hw` the output grid)."""
        return None

    def predict_masks(self, dets: Detections, per_scale: Sequence[ScaleOutput]) -> Detections:
        """The image's final detections with their `masks`, from the scales' mask features (families with masks)."""
        raise NotImplementedError(f"{type(self).__name__} has no mask head")

    def central_regions(self, dets: Detections) -> tuple[Tensor, Tensor]:
        """(N, 4) central regions of image-pixel detections and (N, 2) the keypoints that validated each box
        (NaN where none), for families with `has_central_regions`."""
        raise NotImplementedError(f"{type(self).__name__} has no central regions")

    def export_decode(self, outputs: dict[str, Tensor], flip: bool, down: tuple[Any, Any]) -> dict[str, Tensor]:
        """`decode` as fixed-shape tensor ops for an exported graph, on a batch (images, then their flipped copies
        under `flip`): `export_outputs` by name, coordinates in input pixels (output grid × `down` = (x, y) stride)."""
        raise NotImplementedError(f"{type(self).__name__} has no export decode")

    def export_scale_output(self, outputs: dict[str, Tensor]) -> ScaleOutput:
        """One image's `export_decode` outputs -> the `ScaleOutput` that `decode` gives (in input pixels), rows
        scoring −1 (rejected or padding) dropped: the host side of a detections graph."""
        dets = Detections(outputs["boxes"], outputs["scores"], outputs["classes"], outputs.get("corner_scores"))
        return ScaleOutput(dets.select(dets.scores > -1))

    @property
    def test(self) -> TestConfig:
        return self.recipe.test

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def to(self, device: str | torch.device) -> Detector:
        self.network.to(device)
        return self

    def eval(self) -> Detector:
        self.network.eval()
        return self

    def network_heads(self, batch: Tensor, meta: dict[str, float]) -> dict[str, Tensor]:
        """The usual head source of the test pipeline: the last stack's outputs for a batch, in eval mode through
        the inference engine (`kpnet.engine.accelerate`: a BN-folded copy, channels-last, `test.precision`) unless
        `test.engine` is off."""
        if self.network.training or not self.test.engine:
            return self.network(batch.to(self.device))[-1]
        return inference_network(self.network, self.recipe)(batch)[-1]
