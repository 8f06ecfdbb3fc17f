"""Every .cu compiles with nvcc and the GPU backend's options (PTX for sm_80, cubin for sm_90 with no register spill
and no stack frame). NVRTC, which the backend compiles with (no standard headers, no INFINITY):
tests/gpu/test_cupy_backend.py."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from kpnet.cuda.cupy_backend import NVRTC_OPTIONS
from kpnet.cuda.emulator import SOURCE_DIR

SOURCES = sorted(p.name for p in SOURCE_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
NVCC_FLAGS = [*NVRTC_OPTIONS, "-I", str(SOURCE_DIR)]


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
