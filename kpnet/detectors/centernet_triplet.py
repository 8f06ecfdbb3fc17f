"""CenterNet, keypoint triplets (Duan et al. 2019): the network — CornerNet's corner branches (with
cascade corner pooling) plus a centre keypoint branch on center pooling (triplet paper §3.2-3.3,
Fig. 2 and 5; REFERENCE §1.2, §1.4-1.5) — its targets and loss (CornerNet's plus the centre heatmap
with σ = diameter/5 and centre offsets, REFERENCE §2.4, §3.4) and the triplet decode (§3.1, §3.4:
boxes rescored by centre keypoints inside the scale-aware central region, REFERENCE §4.2).

The central-region test runs in original-image pixels, where the 22500 area switch is defined, and
with centres of scale 1 only: `decode` returns one scale's CornerNet boxes with its top-K centres, the
test pipeline maps both to the image, and `postprocess` rescores the boxes of all scales against
scale 1's centres.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kpnet.config import ModelConfig
from kpnet.detectors.base import Detections, Keypoints, ScaleOutput
from kpnet.detectors.corner import CORNER_HEADS, CornerDecoding, CornerDetector, CornerNetwork, keypoints, unflip_x
from kpnet.detectors.corner_modules import CenterPool
from kpnet.export.decode import export_peaks, flip_halves, to_input_pixels
from kpnet.layers import HEAT_BIAS, kp_head


class CenterNetTriplet(CornerNetwork):
    """CornerNet heads plus `ct_heat` (C, bias -2.19) and `ct_regr` (2) on a centre module; no centre tag.

    Table 4 ablation switches: `cascade` (CCP) chooses cascade or plain corner pooling; `center_pool`
    (CTP) chooses center pooling or, when off, the same centre module with its two line maxima
    skipped, so the centre heads run on conventional convolutions with the same parameter count.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        cascade: bool = True,
        center_pool: bool = True,
        pool_mid: int | None = None,
        head_mid: int | None = None,
    ) -> None:
        super().__init__(backbone, num_classes, cascade, pool_mid, head_mid)
        dim = backbone.out_channels
        stacks = backbone.num_stacks
        pool_mid = pool_mid or dim // 2
        head_mid = head_mid or dim
        self.center_pool = center_pool
        self.ct_pools = nn.ModuleList(CenterPool(dim, pool_mid, pooling=center_pool) for _ in range(stacks))
        self.ct_heats = nn.ModuleList(kp_head(dim, head_mid, num_classes, HEAT_BIAS) for _ in range(stacks))
        self.ct_regrs = nn.ModuleList(kp_head(dim, head_mid, 2) for _ in range(stacks))

    def stack_outputs(self, stack: int, feature: Tensor) -> dict[str, Tensor]:
        """CornerNet's outputs of one stack plus the centre heatmap (C) and centre offsets (2)."""
        outputs = super().stack_outputs(stack, feature)
        ct = self.ct_pools[stack](feature)
        outputs["ct_heat"] = self.ct_heats[stack](ct)
        outputs["ct_regr"] = self.ct_regrs[stack](ct)
        return outputs


def central_regions(boxes: Tensor, area: float, n_small: float, n_large: float) -> Tensor:
    """(N, 4) central regions: the middle 1/n of each side, n = n_small if w·h <= area else n_large (triplet eq. 1)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    n = torch.where((x2 - x1) * (y2 - y1) <= area, n_small, n_large).to(boxes.dtype)
    return torch.stack(
        [((n + 1) * x1 + (n - 1) * x2) / (2 * n), ((n + 1) * y1 + (n - 1) * y2) / (2 * n),
         ((n - 1) * x1 + (n + 1) * x2) / (2 * n), ((n - 1) * y1 + (n + 1) * y2) / (2 * n)], -1
    )


def first_match(boxes: Tensor, classes: Tensor, xy: Tensor, xy_classes: Tensor, area: float, n_small: float,
                n_large: float) -> Tensor:
    """(..., N) index of the first same-class centre (xy (..., M, 2)) strictly inside the central region of each
    box (..., N, 4), -1 for none (§3.1); any leading batch dimensions, non-empty boxes and centres."""
    region = central_regions(boxes, area, n_small, n_large)
    cx, cy = xy[..., None, :, 0], xy[..., None, :, 1]
    match = (
        (xy_classes[..., None, :] == classes[..., :, None])
        & (cx > region[..., 0:1]) & (cx < region[..., 2:3]) & (cy > region[..., 1:2]) & (cy < region[..., 3:4])
    )
    first = match.to(torch.uint8).argmax(-1)  # the first of equal maxima
    return torch.where(match.any(-1), first, -1)


def matching_centres(boxes: Tensor, classes: Tensor, centres: Keypoints, area: float, n_small: float,
                     n_large: float) -> Tensor:
    """(N,) index of the first same-class centre strictly inside each box's central region, -1 for none (§3.1)."""
    if len(centres.scores) == 0 or len(boxes) == 0:
        return torch.full((len(boxes),), -1, dtype=torch.long)
    return first_match(boxes, classes, centres.xy, centres.classes, area, n_small, n_large)


@dataclass(frozen=True)
class TripletDecoding(CornerDecoding):
    """Corner-pair settings plus the central region (triplet eq. 1): n = region_n_small for boxes of area
    <= region_area in original pixels, else region_n_large; `central_region` off decodes as CornerNet (Table 4)."""

    central_region: bool
    region_area: float
    region_n_small: float
    region_n_large: float


class CenterNetTripletDetector(CornerDetector):
    """The triplet family: CornerNet's pairs kept only when a same-class centre keypoint lies in their
    central region, rescored to (s_tl + s_br + s_ct)/3 (triplet §3.1, REFERENCE §4.2)."""

    kinds = ("tl", "br", "ct")
    heads = (*CORNER_HEADS, "ct_heat", "ct_regr")
    heat_heads = ("tl_heat", "br_heat", "ct_heat")
    error_rows = (  # triplet Table 5
        (("ct_heat", "ct_regr"), "w/ gt center keypoints"),
        ((*CORNER_HEADS, "ct_heat", "ct_regr"), "w/ gt all heads"),
    )
    has_central_regions = True
    export_outputs = (*CornerDetector.export_outputs, "pair_scores", "centres", "centre_scores", "centre_classes")
    decoding: TripletDecoding

    @staticmethod
    def build_network(backbone: nn.Module, model: ModelConfig) -> nn.Module:
        return CenterNetTriplet(backbone, model.num_classes, model.cascade, model.center_pool)

    def decode_settings(self) -> TripletDecoding:
        t = self.recipe.test
        return TripletDecoding(k=t.k, ae_threshold=t.ae_threshold, num_dets=t.num_dets, central_region=t.central_region,
                               region_area=t.region_area, region_n_small=t.region_n_small,
                               region_n_large=t.region_n_large)

    def decode(self, outputs: dict[str, Tensor], flip: bool) -> ScaleOutput:
        """CornerNet's pairs and the top-K centres (3x3 NMS, offsets added, no score threshold) of the image,
        then the un-flipped centres of its flipped copy: the "first match" order of `postprocess`."""
        pairs = super().decode(outputs, flip)
        scores, classes, xs, ys, _ = keypoints(outputs["ct_heat"].sigmoid(), outputs["ct_regr"], self.decoding.k)
        xy = torch.stack([xs, ys], -1)
        if flip:
            xy = torch.stack([xy[0], unflip_x(xy[1], outputs["ct_heat"].shape[-1])])
        return ScaleOutput(pairs.detections, Keypoints(xy.flatten(0, 1), scores.flatten(), classes.flatten()))

    def postprocess(self, per_scale: Sequence[ScaleOutput], scales: tuple[float, ...]) -> Detections:
        """Boxes of every scale kept only when a centre of scale 1 (the scale equal to 1.0, else the first)
        validates them, scored (2·s_box + s_ct)/3 (REFERENCE §4.2); with `central_region` off, unchanged."""
        dets = super().postprocess(per_scale, scales)
        d = self.decoding
        if not d.central_region:
            return dets
        centres = per_scale[scales.index(1.0) if 1.0 in scales else 0].centres
        first = matching_centres(dets.boxes, dets.classes, centres, d.region_area, d.region_n_small, d.region_n_large)
        has = first >= 0
        kept = dets.select(has)
        return kept.replace(scores=(2 * kept.scores + centres.scores[first[has]]) / 3, centres=centres.xy[first[has]])

    def export_decode(self, outputs: dict[str, Tensor], flip: bool, down: tuple[Any, Any]) -> dict[str, Tensor]:
        """`decode` and the check of `postprocess` in graph form: CornerNet's pairs, the top-K centres (the image's,
        then its flipped copy's un-flipped) and, with central_region, `scores` = (2·s_pair + s_ct)/3 for pairs a
        centre validates, else −1 — checked in input pixels (the area switch on input-pixel boxes, unclipped).
        `pair_scores` are the scores before the check, which kpnet's host side repeats in image pixels."""
        out = super().export_decode(outputs, flip, down)
        d = self.decoding
        scores, classes, xs, ys, _ = keypoints(outputs["ct_heat"].sigmoid(), outputs["ct_regr"], d.k, export_peaks)
        xy = torch.stack([xs, ys], -1)
        if flip:
            xy, flipped = flip_halves(xy)
            xy = torch.cat([xy, unflip_x(flipped, outputs["ct_heat"].shape[-1])], 1)
            scores, classes = (torch.cat(flip_halves(t), 1) for t in (scores, classes))
        xy = to_input_pixels(xy, down)
        pair = out["scores"]
        if d.central_region:
            first = first_match(out["boxes"], out["classes"], xy, classes, d.region_area, d.region_n_small,
                                d.region_n_large)
            s_ct = torch.gather(scores, 1, first.clamp(min=0))
            out["scores"] = torch.where((first >= 0) & (pair > -1), (2 * pair + s_ct) / 3, torch.full_like(pair, -1.0))
        return {**out, "pair_scores": pair, "centres": xy, "centre_scores": scores, "centre_classes": classes}

    def export_scale_output(self, outputs: dict[str, Tensor]) -> ScaleOutput:
        """The pairs before the centre check and the centres, as `decode` returns them: `postprocess` checks them."""
        pairs = super().export_scale_output({**outputs, "scores": outputs["pair_scores"]})
        return ScaleOutput(pairs.detections, Keypoints(outputs["centres"], outputs["centre_scores"],
                                                       outputs["centre_classes"]))

    def central_regions(self, dets: Detections) -> tuple[Tensor, Tensor]:
        """Each box's central region under this detector's settings and the centre (from scale 1) that validated it."""
        d = self.decoding
        regions = central_regions(dets.boxes, d.region_area, d.region_n_small, d.region_n_large)
        centres = dets.centres if dets.centres is not None else torch.full((len(dets), 2), float("nan"))
        return regions, centres
