"""cupy.cuda of the stand-in (tests/fake_cupy/cupy/__init__.py): devices, external streams, the runtime's device
count and NVRTC."""

from __future__ import annotations

from typing import Any

from cupy.cuda import nvrtc, runtime

__all__ = ["CUDADriverError", "Device", "ExternalStream", "current_stream_handle", "nvrtc", "runtime"]

COMPUTE_CAPABILITY = "90"  # the stand-in's devices are H100-class: cubins are built for sm_90
_devices = [0]
_streams = [0]


class CUDADriverError(RuntimeError):
    """What CuPy raises for a failed driver call."""


class Device:
    """cupy.cuda.Device: a context manager that makes `device` current (default: the current one)."""

    def __init__(self, device: int | None = None) -> None:
        self.id = _devices[-1] if device is None else int(device)

    @property
    def compute_capability(self) -> str:
        """The device's architecture as CuPy reports it ("90")."""
        return COMPUTE_CAPABILITY

    def __enter__(self) -> Device:
        if not 0 <= self.id < runtime.getDeviceCount():
            raise runtime.CUDARuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {self.id}")
        _devices.append(self.id)
        return self

    def __exit__(self, *exc: Any) -> None:
        _devices.pop()


class ExternalStream:
    """cupy.cuda.ExternalStream: launches inside it go to the stream with handle `ptr`."""

    def __init__(self, ptr: int) -> None:
        self.ptr = int(ptr)

    def __enter__(self) -> ExternalStream:
        _streams.append(self.ptr)
        return self

    def __exit__(self, *exc: Any) -> None:
        _streams.pop()


def current_stream_handle() -> int:
    """The stream launches go to now (0: the legacy default stream); stand-in only, for tests to inspect."""
    return _streams[-1]
