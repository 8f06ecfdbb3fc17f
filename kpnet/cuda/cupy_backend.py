"""The GPU backend: kpnet compiles its .cu sources itself with NVRTC (CuPy's low-level binding) to a cubin for the
device's architecture, cached on disk; CuPy loads each cubin as a module once per process and device, its
functions are looked up once per device, and launches run on PyTorch's current stream with tensors passed
zero-copy (`__cuda_array_interface__`).

Not `cupy.RawModule(code=...)`: CuPy appends -ftz=true to the options of every compile it does, which flushes
float32 subnormals to zero on the device alone, and keys its cache on the .cu text without the headers it
includes (docs/kernels.md, "The CuPy path").
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from kpnet.cuda import emulator
from kpnet.errors import KpnetError

# Bit-for-bit parity with the reference and the emulator: every float operation rounded on its own (no FMA
# contraction), subnormals kept, IEEE division and square root.
NVRTC_OPTIONS = ("--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true", "-std=c++17")
HEADER_SUFFIXES = (".cuh", ".h")


def source_files(source_dir: Path = emulator.SOURCE_DIR) -> dict[str, bytes]:
    """Every kernel source and header of `source_dir` by file name (what a compile may include)."""
    files = [p for p in source_dir.iterdir() if p.suffix in (".cu", *HEADER_SUFFIXES)]
    return {p.name: p.read_bytes() for p in sorted(files)}


def cache_key(files: dict[str, bytes], source: str, target: str, nvrtc_version: tuple[int, int]) -> str:
    """Hash of every source and header, the source compiled, the options, the target architecture and NVRTC's version."""
    digest = hashlib.sha256()
    for name, text in sorted(files.items()):
        digest.update(f"{name}\0{len(text)}\0".encode() + text)
    digest.update("\0".join([source, target, *NVRTC_OPTIONS, f"nvrtc {nvrtc_version}"]).encode())
    return digest.hexdigest()[:24]


def compile_source(source: str, target: str, files: dict[str, bytes] | None = None) -> bytes:
    """NVRTC's output for `source` with kpnet's options: a cubin for target "sm_XY", PTX for "compute_XY"."""
    from cupy.cuda import nvrtc

    files = source_files() if files is None else files
    headers = [name for name in files if name.endswith(HEADER_SUFFIXES)]
    prog = nvrtc.createProgram(files[source].decode(), source, [files[h] for h in headers],
                               [h.encode() for h in headers])
    try:
        try:
            nvrtc.compileProgram(prog, [f"--gpu-architecture={target}", *NVRTC_OPTIONS])
        except nvrtc.NVRTCError as e:
            log = nvrtc.getProgramLog(prog).strip()
            raise KpnetError("cuda", f"NVRTC failed to compile {source} for {target}: {e}; {log}") from e
        return nvrtc.getCUBIN(prog) if target.startswith("sm_") else nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)


def cubin(source: str, arch: str) -> Path:
    """The cubin of `source` for `arch` ("sm_90"), compiled or found in the cache (emulator.cache_dir()); written to
    a temporary file and renamed into place, so concurrent processes never load a partial file."""
    from cupy.cuda import nvrtc

    files = source_files()
    target = emulator.cache_dir() / f"kpnet_{Path(source).stem}_{arch}_{cache_key(files, source, arch, tuple(nvrtc.getVersion()))}.cubin"
    if target.exists():
        return target
    image = compile_source(source, arch, files)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".build-", delete=False) as tmp:
        tmp.write(image)
    os.replace(tmp.name, target)
    return target


@lru_cache(maxsize=None)
def _module(source: str, device_index: int) -> Any:
    """`source`'s cubin for the device's architecture, loaded on device `device_index` (once per process and device)."""
    import cupy

    with cupy.cuda.Device(device_index) as device:
        return cupy.RawModule(path=str(cubin(source, f"sm_{device.compute_capability}")))


@lru_cache(maxsize=None)
def _function(source: str, name: str, device_index: int) -> Any:
    """Kernel `name` of `source` on device `device_index`, looked up once per process and device."""
    import cupy

    with cupy.cuda.Device(device_index):
        return _module(source, device_index).get_function(name)


def _device_index(device: torch.device) -> int:
    """The CUDA device index of `device` (the current device when it names none)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def _stream(device: torch.device) -> int:
    """The handle of PyTorch's current stream on `device`."""
    return torch.cuda.current_stream(device).cuda_stream


def run(source: str, name: str, grid: tuple[int, int, int], block: tuple[int, int, int], args: list[Any],
        device: torch.device) -> None:
    """Launch `name` from `source` on `device`; tensor arguments (detached, launch.py) become CuPy views of the
    same memory."""
    import cupy

    index = _device_index(device)
    kernel = _function(source, name, index)
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(_stream(device)):
        packed = tuple(cupy.asarray(a) if isinstance(a, torch.Tensor) else a for a in args)
        kernel(grid, block, packed)
