"""cupy.cuda.runtime of the stand-in: the device count (DEVICE_COUNT, which tests may change)."""

from __future__ import annotations

DEVICE_COUNT = 1


class CUDARuntimeError(RuntimeError):
    """What CuPy raises for a failed runtime call."""


def getDeviceCount() -> int:
    """How many devices the stand-in plays."""
    return DEVICE_COUNT
