"""Which backend runs an op: the CuPy kernels, the g++-compiled emulator of the same kernels, or
the PyTorch reference (docs/architecture.md, "Kernels: one source, three ways to run").

Rule: a CUDA tensor with a working CuPy runs the kernels; a CPU tensor runs the emulator where a C++
compiler builds it (compiled once, cached: kpnet/cuda/emulator.py), since end to end it measured several
times faster than the reference (benchmarks/decode.py: the whole decode of an image, about 10×); everything
else runs the PyTorch reference. Every backend computes the same bits. `KPNET_KERNELS` overrides it:

- `auto` (default): the rule above; without a working compiler CPU tensors use the reference.
- `torch`: the reference everywhere.
- `emulate`: CPU tensors run the emulator (the `.cu` sources compiled by g++ ≥ 12 or Clang); where it
  cannot be built, an error names why. CUDA tensors follow the default rule.
- `cuda`: CUDA tensors must run the kernels (an error names why CuPy is unusable); CPU tensors
  use the reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from kpnet.errors import KpnetError

KERNELS_ENV = "KPNET_KERNELS"
MODES = ("auto", "torch", "emulate", "cuda")


@dataclass(frozen=True)
class Choice:
    """The backend an op runs on ("cuda", "emulate" or "torch") and why."""

    backend: str
    reason: str


def mode() -> str:
    """The `KPNET_KERNELS` setting, validated (read on every call so tests and users can change it)."""
    value = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise KpnetError(KERNELS_ENV, f"unknown value {value!r}; expected one of {', '.join(MODES)}")
    return value


@lru_cache(maxsize=1)
def cupy_status() -> tuple[bool, str]:
    """Whether CuPy imports and sees a CUDA device, with the reason when it does not."""
    try:
        import cupy  # noqa: F401
    except Exception as e:  # ImportError, or a CuPy built for another CUDA version
        return False, f"CuPy is not importable ({type(e).__name__}: {e})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return False, f"CuPy sees no CUDA device ({type(e).__name__}: {e})"
    if count < 1:
        return False, "CuPy sees no CUDA device"
    return True, f"CuPy {cupy.__version__} with {count} CUDA device(s)"


def emulator_status() -> tuple[bool, str]:
    """Whether the emulator can be built here: a C++ compiler that compiles the probe (emulator.probe)."""
    from kpnet.cuda import emulator

    return emulator.probe(emulator.compiler())


def emulator_ready() -> tuple[bool, str]:
    """Whether the emulator library is built (or builds now, once) with this compiler, with the reason."""
    from kpnet.cuda import emulator

    return _built(emulator.compiler())


@lru_cache(maxsize=8)
def _built(cxx: str | None) -> tuple[bool, str]:
    from kpnet.cuda import emulator, launch

    ok, why = emulator.probe(cxx)
    if not ok:
        return False, why
    try:
        launch._emulator_library()
    except KpnetError as e:
        return False, f"the emulator did not build ({e.line().splitlines()[0]})"
    except OSError as e:  # e.g. an unwritable cache folder ($KPNET_CACHE_DIR)
        return False, f"the emulator could not be cached ({type(e).__name__}: {e})"
    return True, why


def choose(device: torch.device, has_kernel: bool = True) -> Choice:
    """Pick the backend for an op on tensors living on `device` (see the module docstring)."""
    requested = mode()
    if not has_kernel:
        return Choice("torch", "no kernel for this op; PyTorch reference")
    if requested == "torch":
        return Choice("torch", f"{KERNELS_ENV}=torch")
    if device.type == "cuda":
        ok, why = cupy_status()
        if ok:
            return Choice("cuda", f"CUDA tensor; {why}")
        if requested == "cuda":
            raise KpnetError(KERNELS_ENV, f"cuda kernels requested but {why}")
        return Choice("torch", f"CUDA tensor but {why}; PyTorch reference")
    if requested == "emulate":
        ok, why = emulator_status()
        if not ok:
            raise KpnetError(KERNELS_ENV, f"emulate requested but {why}")
        return Choice("emulate", f"{KERNELS_ENV}=emulate; {why}")
    if requested == "cuda":
        return Choice("torch", f"CPU tensor with {KERNELS_ENV}=cuda: PyTorch reference")
    ok, why = emulator_ready()
    if ok:
        return Choice("emulate", f"CPU tensor: emulator-compiled kernels ({why}; faster than the reference end to end, "
                                 "benchmarks/decode.py)")
    return Choice("torch", f"CPU tensor: PyTorch reference ({why})")
