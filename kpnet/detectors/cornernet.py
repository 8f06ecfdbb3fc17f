"""CornerNet (Law & Deng 2018): objects as top-left / bottom-right corner pairs grouped by associative
embeddings. The network, targets, loss and decode are the corner-family blocks of
`kpnet.detectors.corner` (CornerNet §3-4; REFERENCE §1.2-1.3, §2.4, §3, §4.1, §4.6)."""

from __future__ import annotations

from torch import nn

from kpnet.config import ModelConfig
from kpnet.detectors.corner import CORNER_HEADS, CornerDetector, CornerNetwork


class CornerNetDetector(CornerDetector):
    """CornerNet: tl/br heatmaps, embeddings and offsets; pairs kept by |e_tl − e_br| <= ae_threshold."""

    heads = CORNER_HEADS
    heat_heads = ("tl_heat", "br_heat")
    error_rows = (  # CornerNet Table 3
        (("tl_heat", "br_heat"), "w/ gt heatmaps"),
        (("tl_heat", "br_heat", "tl_regr", "br_regr"), "w/ gt heatmaps + offsets"),
        (CORNER_HEADS, "w/ gt all heads"),
    )

    @staticmethod
    def build_network(backbone: nn.Module, model: ModelConfig) -> nn.Module:
        return CornerNetwork(backbone, model.num_classes, model.cascade)
