"""kpnet: keypoint-based object detection in plain PyTorch (CornerNet; CenterNet: keypoint triplets,
objects as points).

Library API: `load_recipe`, `build_model`, `load_checkpoint`, `detect` (imported lazily, so the
command line starts without loading PyTorch for `--help` and `--version`).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_recipe", "build_model", "load_checkpoint", "detect", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("load_recipe", "build_model", "load_checkpoint", "detect"):
        from kpnet import api

        return getattr(api, name)
    raise AttributeError(f"module 'kpnet' has no attribute {name!r}")
