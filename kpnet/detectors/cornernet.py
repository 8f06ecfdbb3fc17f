"""CornerNet (Law & Deng 2018): the network — per stack a top-left and a bottom-right prediction
module, each a corner pooling module followed by heatmap, embedding and offset heads (CornerNet §3.1,
Fig. 4 and 7; REFERENCE §1.2-1.3)."""

from __future__ import annotations

from torch import Tensor, nn

from kpnet.detectors.corner_modules import BOTTOM_RIGHT, TOP_LEFT, CascadeCornerPool, CornerPool
from kpnet.detectors.heads import HEAT_BIAS, kp_head


class CornerNet(nn.Module):
    """Backbone + per-stack TL/BR prediction modules; forward returns raw head outputs (logits).

    In training one dict per stack (intermediate supervision); in eval only the last stack's heads
    run (CornerNet `kp._test`). `cascade=True` swaps in cascade corner pooling: the "CornerNet + CCP"
    row of the triplet paper's Table 4. Pool/head widths default to the paper's 256 -> 128 / 256
    scaled to `backbone.out_channels`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        cascade: bool = False,
        pool_mid: int | None = None,
        head_mid: int | None = None,
    ) -> None:
        super().__init__()
        dim = backbone.out_channels
        stacks = backbone.num_stacks
        pool_mid = pool_mid or dim // 2
        head_mid = head_mid or dim
        pool = CascadeCornerPool if cascade else CornerPool
        self.backbone = backbone
        self.num_classes = num_classes
        self.cascade = cascade
        self.tl_pools = nn.ModuleList(pool(TOP_LEFT, dim, pool_mid) for _ in range(stacks))
        self.br_pools = nn.ModuleList(pool(BOTTOM_RIGHT, dim, pool_mid) for _ in range(stacks))
        self.tl_heats = nn.ModuleList(kp_head(dim, head_mid, num_classes, HEAT_BIAS) for _ in range(stacks))
        self.br_heats = nn.ModuleList(kp_head(dim, head_mid, num_classes, HEAT_BIAS) for _ in range(stacks))
        self.tl_tags = nn.ModuleList(kp_head(dim, head_mid, 1) for _ in range(stacks))
        self.br_tags = nn.ModuleList(kp_head(dim, head_mid, 1) for _ in range(stacks))
        self.tl_regrs = nn.ModuleList(kp_head(dim, head_mid, 2) for _ in range(stacks))
        self.br_regrs = nn.ModuleList(kp_head(dim, head_mid, 2) for _ in range(stacks))

    def stack_outputs(self, stack: int, feature: Tensor) -> dict[str, Tensor]:
        """Head outputs of one stack: heatmaps (C), embeddings (1) and offsets (2) per corner type."""
        tl = self.tl_pools[stack](feature)
        br = self.br_pools[stack](feature)
        return {
            "tl_heat": self.tl_heats[stack](tl),
            "br_heat": self.br_heats[stack](br),
            "tl_tag": self.tl_tags[stack](tl),
            "br_tag": self.br_tags[stack](br),
            "tl_regr": self.tl_regrs[stack](tl),
            "br_regr": self.br_regrs[stack](br),
        }

    def forward(self, images: Tensor) -> list[dict[str, Tensor]]:
        features = self.backbone(images)
        stacks = range(len(features)) if self.training else [len(features) - 1]
        return [self.stack_outputs(stack, features[stack]) for stack in stacks]


__all__ = ["CornerNet"]
