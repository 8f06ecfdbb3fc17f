"""The CuPy path under test, twice: on the CuPy stand-in (tests/fake_cupy: host memory as the device, each launch
run by the emulator build of the kernel; part of the default suite) and on a CUDA device with CuPy (marked gpu,
skipped with the reason where there is none). The `cupy_path` fixture yields either; `standin` the first only.

Under the stand-in, a test-only wrapper around dispatch.choose routes CPU tensors to the CuPy backend when
KPNET_KERNELS is auto or cuda, and the backend's two questions to torch.cuda (the device index, the current
stream) are answered by the stand-in; nothing else in kpnet changes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from kpnet.cuda import cupy_backend, dispatch

FAKE_CUPY = Path(__file__).resolve().parents[1] / "fake_cupy"
CPU = torch.device("cpu")


def _on_cpu(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach().cpu()
    if isinstance(out, (tuple, list)):
        return type(out)(_on_cpu(o) for o in out) if not hasattr(out, "_fields") else type(out)(*map(_on_cpu, out))
    return out


@dataclass
class CupyPath:
    """Where the CuPy path runs: `device` for its tensors; `cupy` is the stand-in module (None on a real device)."""

    device: torch.device
    cupy: ModuleType | None
    device_index: int = 0  # the stand-in's answers for a host tensor's device index and torch's current stream
    stream_handle: int = 0

    def three_ways(self, monkeypatch: pytest.MonkeyPatch, fn: Callable[..., Any], *tensors: torch.Tensor) -> list[Any]:
        """fn's outputs, on the CPU, from the PyTorch reference and the emulator (CPU tensors) and from the CuPy
        path (tensors on `device`, KPNET_KERNELS=cuda: never a silent fallback); under the stand-in, the CuPy run
        must have launched kernels."""
        out = []
        for mode, device in (("torch", CPU), ("emulate", CPU), ("cuda", self.device)):
            monkeypatch.setenv("KPNET_KERNELS", mode)
            launched = len(self.cupy.log.launches) if self.cupy else 0
            out.append(_on_cpu(fn(*[t.to(device) for t in tensors])))
            if self.cupy is not None and mode == "cuda":
                assert len(self.cupy.log.launches) > launched, "the CuPy path launched nothing"
        return out


def _forget_cupy() -> dict[str, ModuleType]:
    gone = {k: v for k, v in sys.modules.items() if k == "cupy" or k.startswith("cupy.")}
    for k in gone:
        del sys.modules[k]
    return gone


def _clear_backend_caches() -> None:
    dispatch.cupy_status.cache_clear()
    cupy_backend._module.cache_clear()
    cupy_backend._function.cache_clear()


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[CupyPath]:
    """The stand-in installed as `cupy` (a real CuPy, if any, is set aside meanwhile)."""
    ok, why = dispatch.emulator_status()
    if not ok:
        pytest.skip(f"the CuPy stand-in runs kernels on the emulator: {why}")
    real = _forget_cupy()
    sys.path.insert(0, str(FAKE_CUPY))
    _clear_backend_caches()
    try:
        import cupy

        if cupy.cuda.nvrtc.library() is None:
            pytest.skip("the CuPy stand-in compiles with NVRTC: no libnvrtc (nvidia-cuda-nvrtc) installed")
        path = CupyPath(CPU, cupy)
        choose, device_index, stream = dispatch.choose, cupy_backend._device_index, cupy_backend._stream

        def choose_host_as_device(device: torch.device, has_kernel: bool = True) -> dispatch.Choice:
            if device.type == "cpu" and dispatch.mode() in ("auto", "cuda"):
                device = torch.device("cuda", path.device_index)
            return choose(device, has_kernel)

        monkeypatch.setattr(dispatch, "choose", choose_host_as_device)
        monkeypatch.setattr(cupy_backend, "_device_index",
                            lambda d: path.device_index if d.type == "cpu" else device_index(d))
        monkeypatch.setattr(cupy_backend, "_stream", lambda d: path.stream_handle if d.type == "cpu" else stream(d))
        yield path
    finally:
        sys.path.remove(str(FAKE_CUPY))
        _forget_cupy()
        sys.modules.update(real)
        _clear_backend_caches()


def _device_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda)"
    ok, why = dispatch.cupy_status()
    return None if ok else why


@pytest.fixture(params=["stand-in", pytest.param("cuda", marks=pytest.mark.gpu)])
def cupy_path(request: pytest.FixtureRequest) -> CupyPath:
    """The CuPy path on the stand-in, then on a CUDA device (skipped, with the reason, where there is none)."""
    if request.param == "stand-in":
        return request.getfixturevalue("standin")
    reason = _device_unavailable()
    if reason:
        pytest.skip(f"needs a CUDA device with CuPy: {reason}")
    return CupyPath(torch.device("cuda"), None)
