"""cupy.cuda.nvrtc of the stand-in: CuPy's low-level NVRTC binding (the functions kpnet uses), over the libnvrtc
that PyTorch's CUDA wheels ship (nvidia-cuda-nvrtc). `library()` is None where there is none."""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path


class NVRTCError(RuntimeError):
    """What CuPy raises for a failed NVRTC call."""


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """libnvrtc from the nvidia-* wheels, or None."""
    try:
        import nvidia
    except ImportError:
        return None
    for root in map(Path, nvidia.__path__):
        for lib in sorted(root.glob("*/lib/libnvrtc.so*")):
            if "builtins" not in lib.name and "alt" not in lib.name:
                return ctypes.CDLL(str(lib))
    return None


def _lib() -> ctypes.CDLL:
    """libnvrtc, or NVRTCError where there is none."""
    lib = library()
    if lib is None:
        raise NVRTCError("no libnvrtc (install nvidia-cuda-nvrtc)")
    return lib


def _check(status: int) -> None:
    """Raise NVRTCError for a failed call."""
    if status != 0:
        _lib().nvrtcGetErrorString.restype = ctypes.c_char_p
        raise NVRTCError(f"{_lib().nvrtcGetErrorString(status).decode()} ({status})")


def getVersion() -> tuple[int, int]:
    """nvrtcVersion: (major, minor)."""
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(_lib().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
    return major.value, minor.value


def createProgram(src: str, name: str, headers: list[bytes], include_names: list[bytes]) -> int:
    """nvrtcCreateProgram with in-memory headers (bytes) under their include names (bytes)."""
    prog = ctypes.c_void_p()
    n = len(headers)
    _check(_lib().nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), n,
                                     (ctypes.c_char_p * n)(*headers), (ctypes.c_char_p * n)(*include_names)))
    return prog.value


def compileProgram(prog: int, options: list[str]) -> None:
    """nvrtcCompileProgram; NVRTCError on failure (the log: getProgramLog)."""
    opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    _check(_lib().nvrtcCompileProgram(ctypes.c_void_p(prog), len(options), opts))


def _output(prog: int, what: str) -> bytes:
    """One of the program's outputs (its size, then its bytes)."""
    size = ctypes.c_size_t()
    _check(getattr(_lib(), f"nvrtcGet{what}Size")(ctypes.c_void_p(prog), ctypes.byref(size)))
    buf = ctypes.create_string_buffer(size.value)
    _check(getattr(_lib(), f"nvrtcGet{what}")(ctypes.c_void_p(prog), buf))
    return buf.raw


def getProgramLog(prog: int) -> str:
    """The compile log."""
    return _output(prog, "ProgramLog").rstrip(b"\0").decode()


def getPTX(prog: int) -> bytes:
    """The PTX (for a compute_XY target)."""
    return _output(prog, "PTX").rstrip(b"\0")


def getCUBIN(prog: int) -> bytes:
    """The cubin (for an sm_XY target)."""
    return _output(prog, "CUBIN")


def destroyProgram(prog: int) -> None:
    """nvrtcDestroyProgram."""
    _check(_lib().nvrtcDestroyProgram(ctypes.byref(ctypes.c_void_p(prog))))
