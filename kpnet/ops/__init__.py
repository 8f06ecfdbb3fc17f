"""The public op API: corner and center pooling, heatmap peaks, corner grouping, soft-NMS.

Each op dispatches (kpnet/cuda/dispatch.py): CUDA tensors with CuPy run the kernels of kpnet/cuda;
everything else runs the PyTorch reference, unless KPNET_KERNELS says otherwise.
"""

from kpnet.ops.decoding import CornerGroups, group_corners, heatmap_peaks
from kpnet.ops.nms import soft_nms, soft_nms_merge
from kpnet.ops.pooling import DIRECTIONS, corner_pool, line_max

__all__ = [
    "DIRECTIONS",
    "CornerGroups",
    "corner_pool",
    "group_corners",
    "heatmap_peaks",
    "line_max",
    "soft_nms",
    "soft_nms_merge",
]
