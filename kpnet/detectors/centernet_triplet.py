"""CenterNet, keypoint triplets (Duan et al. 2019): the network — CornerNet's corner branches (with
cascade corner pooling) plus a centre keypoint branch on center pooling (triplet paper §3.2-3.3,
Fig. 2 and 5; REFERENCE §1.2, §1.4-1.5)."""

from __future__ import annotations

from torch import Tensor, nn

from kpnet.detectors.corner_modules import CenterPool
from kpnet.detectors.cornernet import CornerNet
from kpnet.detectors.heads import HEAT_BIAS, kp_head


class CenterNetTriplet(CornerNet):
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


__all__ = ["CenterNetTriplet"]
