"""The GPU backend: kpnet's .cu sources compiled by NVRTC through CuPy, once per process and device,
launched on PyTorch's current stream with tensors passed zero-copy (`__cuda_array_interface__`)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

from kpnet.cuda.emulator import SOURCE_DIR

# Bit-for-bit parity with the reference and the emulator needs every float op rounded on its own.
NVRTC_OPTIONS = ("--fmad=false", "-std=c++17", f"-I{SOURCE_DIR}")


@lru_cache(maxsize=None)
def _module(source: str, device_index: int) -> Any:
    import cupy

    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=(SOURCE_DIR / source).read_text(), options=NVRTC_OPTIONS, backend="nvrtc")
        module.compile()
    return module


def run(source: str, name: str, grid: tuple[int, int, int], block: tuple[int, int, int], args: list[Any],
        device: torch.device) -> None:
    """Launch `name` from `source` on `device`; tensor arguments become CuPy views of the same memory."""
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    kernel = _module(source, index).get_function(name)
    packed = [cupy.asarray(a) if isinstance(a, torch.Tensor) else a for a in args]
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream.cuda_stream):
        kernel(grid, block, tuple(packed))
