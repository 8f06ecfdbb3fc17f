"""Every .cu compiles with nvcc (PTX for sm_80, cubin for sm_90 with no register spill and no stack frame)
and with NVRTC, the compiler CuPy uses (no standard headers, no INFINITY)."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kpnet.cuda.cupy_backend import NVRTC_OPTIONS
from kpnet.cuda.emulator import SOURCE_DIR

SOURCES = sorted(p.name for p in SOURCE_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
NVCC_FLAGS = ["--fmad=false", "-std=c++17", "-I", str(SOURCE_DIR)]


def test_sources_found():
    assert SOURCES == ["decoding.cu", "nms.cu", "pooling.cu"]


@needs_nvcc
@pytest.mark.parametrize("source", SOURCES)
def test_nvcc_ptx_sm80(source, tmp_path):
    out = tmp_path / "k.ptx"
    proc = subprocess.run([NVCC, "-arch=sm_80", "-ptx", *NVCC_FLAGS, str(SOURCE_DIR / source), "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert ".entry" in out.read_text()


@needs_nvcc
@pytest.mark.parametrize("source", SOURCES)
def test_nvcc_cubin_sm90_no_spill(source, tmp_path):
    proc = subprocess.run([NVCC, "-arch=sm_90", "-cubin", "--resource-usage", *NVCC_FLAGS, str(SOURCE_DIR / source),
                           "-o", str(tmp_path / "k.cubin")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    usage = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    entries = re.findall(r"Compiling entry function '(\w+)'", proc.stderr)
    assert entries and len(usage) >= len(entries), proc.stderr
    bad = [(e, u) for e, u in zip(entries, usage) if u != ("0", "0", "0")]
    assert not bad, f"stack frame / spill stores / spill loads (bytes) not all zero: {bad}"
    assert not re.search(r"[1-9]\d* bytes lmem", proc.stderr), proc.stderr


def _nvrtc_compile(source: str) -> str:
    """Compile with NVRTC: through CuPy when installed, else the libnvrtc that PyTorch's CUDA wheels ship."""
    src = (SOURCE_DIR / source).read_bytes()
    header = (SOURCE_DIR / "kpnet_types.cuh").read_bytes()
    options = ["--gpu-architecture=compute_80", *[o for o in NVRTC_OPTIONS if not o.startswith("-I")]]
    try:
        from cupy.cuda import nvrtc
    except ImportError:
        return _nvrtc_ctypes(src, header, source, options)
    prog = nvrtc.createProgram(src.decode(), source, [header], [b"kpnet_types.cuh"])
    try:
        nvrtc.compileProgram(prog, options)
    except Exception as e:
        raise AssertionError(f"{e}\n{nvrtc.getProgramLog(prog)}") from e
    return nvrtc.getPTX(prog).decode() if isinstance(nvrtc.getPTX(prog), bytes) else nvrtc.getPTX(prog)


def _libnvrtc() -> ctypes.CDLL | None:
    try:
        import nvidia
    except ImportError:
        return None
    for root in map(Path, nvidia.__path__):
        for lib in sorted(root.glob("*/lib/libnvrtc.so*")):
            if "builtins" not in lib.name and "alt" not in lib.name:
                return ctypes.CDLL(str(lib))
    return None


def _nvrtc_ctypes(src: bytes, header: bytes, name: str, options: list[str]) -> str:
    lib = _libnvrtc()
    if lib is None:
        pytest.skip("neither CuPy nor an NVRTC library (nvidia-cuda-nvrtc wheel) is installed")
    prog = ctypes.c_void_p()
    headers = (ctypes.c_char_p * 1)(header)
    names = (ctypes.c_char_p * 1)(b"kpnet_types.cuh")
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, name.encode(), 1, headers, names) == 0
    opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    status = lib.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    assert status == 0, log.value.decode()
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx.value.decode()


@pytest.mark.parametrize("source", SOURCES)
def test_nvrtc_compiles(source):
    from kpnet.cuda.launch import KERNELS

    ptx = _nvrtc_compile(source)
    for name, (src, _) in KERNELS.items():
        if src == source:
            assert f".entry {name}(" in ptx, name
