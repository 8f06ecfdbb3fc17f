"""kpnet: keypoint-based object detection in plain PyTorch (CornerNet; CenterNet: keypoint triplets,
objects as points).

Library API: `load_recipe`, `build_detector`, `build_model`, `load_checkpoint`, `detect`, `Detector`,
`Detections` (imported lazily, so the command line starts without loading PyTorch for `--help` and `--version`).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
_API = ("load_recipe", "build_detector", "build_model", "load_checkpoint", "detect", "Detector", "Detections")
__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        from kpnet import api

        return getattr(api, name)
    raise AttributeError(f"module 'kpnet' has no attribute {name!r}")
