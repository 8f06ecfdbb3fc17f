"""A stand-in for CuPy in CPU tests (issue 17): exactly the surface kpnet/cuda/cupy_backend.py and dispatch.py use,
with host memory as device memory and each launch handed to the emulator build of the same kernel.

What it checks, as CUDA and CuPy would refuse: arrays come from torch's own `__cuda_array_interface__` rules (so a
tensor that requires grad is refused); a module is a cubin file (ELF) that holds the function looked up; a
function runs only on the device it was looked up on; grid and block fit CUDA's limits; launch arguments are
arrays or scalars CuPy can pack. It records every module load, function lookup and launch (device, stream)
for the tests to inspect (`log`).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cupy import cuda

__version__ = "0.0+stand-in"

MAX_BLOCK_THREADS = 1024
MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_BLOCK = (1024, 1024, 64)


@dataclass
class Log:
    """What the stand-in was asked to do."""

    modules: list[tuple[str, int]] = field(default_factory=list)  # (cubin path, device)
    lookups: list[tuple[str, int]] = field(default_factory=list)  # (function, device)
    launches: list[dict[str, Any]] = field(default_factory=list)


log = Log()


class ndarray:
    """Memory described by `__cuda_array_interface__`: its pointer and type, on the current device."""

    def __init__(self, interface: dict[str, Any]) -> None:
        self.ptr = interface["data"][0]
        self.dtype = np.dtype(interface["typestr"])
        self.device_id = cuda.Device().id


class _AsIfOnDevice:
    """A CPU tensor presented to torch's `__cuda_array_interface__` as if it were a CUDA tensor, so torch's own
    rules (requires grad, sparse) decide."""

    is_cuda = True

    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor = tensor

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # not a tensor to torch's dispatch (`__torch_function__`)
            raise AttributeError(name)
        return getattr(self._tensor, name)


def asarray(obj: Any) -> ndarray:
    """cupy.asarray of an object exposing `__cuda_array_interface__` (a host tensor counts as device memory here)."""
    if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
        return ndarray(torch.Tensor.__cuda_array_interface__.fget(_AsIfOnDevice(obj)))
    return ndarray(obj.__cuda_array_interface__)


class RawModule:
    """cupy.RawModule(path=...): a cubin, loaded on the current device."""

    def __init__(self, *, path: str) -> None:
        self.image = Path(path).read_bytes()
        if self.image[:4] != b"\x7fELF":
            raise cuda.CUDADriverError(f"CUDA_ERROR_INVALID_IMAGE: {path} is not a cubin")
        self.device = cuda.Device().id
        log.modules.append((path, self.device))

    def get_function(self, name: str) -> Function:
        """The kernel `name` of this module, which must be looked up on the module's device."""
        if name.encode() + b"\0" not in self.image:
            raise cuda.CUDADriverError(f"CUDA_ERROR_NOT_FOUND: named symbol not found: {name}")
        device = cuda.Device().id
        if device != self.device:
            raise cuda.CUDADriverError("CUDA_ERROR_INVALID_CONTEXT: module loaded on another device")
        log.lookups.append((name, device))
        return Function(name, device)


def _dims(value: Any, limits: tuple[int, ...], what: str) -> tuple[int, int, int]:
    """A grid or block as CuPy takes it (an int or up to 3 ints), padded to 3 and checked against CUDA's limits."""
    dims = (value,) if isinstance(value, int) else tuple(value)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, int) for d in dims):
        raise TypeError(f"{what} must be an int or a tuple of up to 3 ints, got {value!r}")
    dims = dims + (1,) * (3 - len(dims))
    if any(d < 1 or d > m for d, m in zip(dims, limits)):
        raise cuda.CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: {what} {dims} outside {limits}")
    return dims


def _pack(arg: Any) -> ctypes.Array | ctypes.c_void_p:
    """An argument as CuPy passes it to cuLaunchKernel: an array's data pointer, a scalar's bytes."""
    if isinstance(arg, ndarray):
        return ctypes.c_void_p(arg.ptr)
    if isinstance(arg, bool):
        arg = np.bool_(arg)
    elif isinstance(arg, int):
        arg = np.int64(arg)
    elif isinstance(arg, float):
        arg = np.float64(arg)
    if not isinstance(arg, np.generic):
        raise TypeError(f"Unsupported type {type(arg)}")
    raw = arg.tobytes()
    return ctypes.create_string_buffer(raw, len(raw))


class Function:
    """A kernel function of a loaded module; calling it launches the emulator build of the kernel."""

    def __init__(self, name: str, device: int) -> None:
        self.name = name
        self.device = device

    def __call__(self, grid: Any, block: Any, args: tuple[Any, ...]) -> None:
        """Launch grid × block threads with `args` on the current device and stream (recorded in `log`)."""
        from kpnet.cuda import emulator, launch

        if cuda.Device().id != self.device:
            raise cuda.CUDADriverError("CUDA_ERROR_INVALID_HANDLE: function launched on another device")
        if not isinstance(args, tuple):
            raise TypeError("args must be a tuple")
        grid, block = _dims(grid, MAX_GRID, "grid"), _dims(block, MAX_BLOCK, "block")
        if block[0] * block[1] * block[2] > MAX_BLOCK_THREADS:
            raise cuda.CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: block {block} has more than 1024 threads")
        packed = [_pack(a) for a in args]
        for a in args:
            if isinstance(a, ndarray) and a.device_id != self.device:
                raise cuda.CUDADriverError("CUDA_ERROR_ILLEGAL_ADDRESS: array on another device")
        log.launches.append(dict(name=self.name, grid=grid, block=block, device=self.device,
                                 stream=cuda.current_stream_handle(), args=args))
        emulator.run(launch._emulator_library(), self.name, grid, block, packed)
