"""kpnet/cuda/cupy_backend.py on the CuPy stand-in (no device needed): NVRTC compiles every source with kpnet's
options (no flush-to-zero, no FMA contraction) to cubins, cached by every source and header, the options, the
architecture and NVRTC's version; modules and functions are loaded once per device, and launches stay on the
device they were loaded on."""

from __future__ import annotations

import pytest
import torch

from kpnet.cuda import cupy_backend, launch
from kpnet.cuda.emulator import SOURCE_DIR
from kpnet.ops import corner_pool, heatmap_peaks, line_max

SOURCES = sorted(p.name for p in SOURCE_DIR.glob("*.cu"))


@pytest.mark.parametrize("source", SOURCES)
def test_nvrtc_compiles_every_kernel(standin, source):
    ptx = cupy_backend.compile_source(source, "compute_80").decode()
    for name, (src, _) in launch.KERNELS.items():
        if src == source:
            assert f".entry {name}(" in ptx, name


@pytest.mark.parametrize("source", SOURCES)
def test_compiled_without_flush_to_zero(standin, monkeypatch, source):
    """kpnet's options keep float32 subnormals (no `.ftz` instruction); the trailing -ftz=true that CuPy adds to its
    own compiles would flush them, which this check sees."""
    assert b".ftz" not in cupy_backend.compile_source(source, "compute_90")
    monkeypatch.setattr(cupy_backend, "NVRTC_OPTIONS", (*cupy_backend.NVRTC_OPTIONS, "-ftz=true"))
    assert b".ftz" in cupy_backend.compile_source(source, "compute_90")


def test_modules_are_cubins_loaded_by_path(standin, monkeypatch):
    """The backend hands CuPy a cubin file of its own build: CuPy compiles nothing (the stand-in has no `code=`)."""
    monkeypatch.setenv("KPNET_KERNELS", "cuda")
    corner_pool(torch.randn(1, 2, 5, 6), "top")
    (path, device), = standin.cupy.log.modules
    assert path.endswith(".cubin") and "_sm_90_" in path and device == 0


def test_cache_key_covers_every_header_option_arch_and_nvrtc():
    files = cupy_backend.source_files()
    assert {"kpnet_types.cuh", "kpnet_cpu_lanes.h", "kpnet_shim.h", "pooling.cu"} <= files.keys()
    key = cupy_backend.cache_key(files, "pooling.cu", "sm_90", (13, 0))
    for name in files:
        edited = {**files, name: files[name] + b"\n// edited\n"}
        assert cupy_backend.cache_key(edited, "pooling.cu", "sm_90", (13, 0)) != key, name
    assert cupy_backend.cache_key(files, "pooling.cu", "sm_80", (13, 0)) != key
    assert cupy_backend.cache_key(files, "pooling.cu", "sm_90", (12, 8)) != key
    assert cupy_backend.cache_key(files, "nms.cu", "sm_90", (13, 0)) != key


def test_an_edited_header_builds_a_new_cubin(standin, monkeypatch, tmp_path):
    monkeypatch.setenv("KPNET_CACHE_DIR", str(tmp_path))
    first = cupy_backend.cubin("nms.cu", "sm_90")
    stamp = first.stat().st_mtime_ns
    assert cupy_backend.cubin("nms.cu", "sm_90") == first and first.stat().st_mtime_ns == stamp  # cached
    files = cupy_backend.source_files()
    edited = {**files, "kpnet_types.cuh": files["kpnet_types.cuh"] + b"\n#define KP_EDITED 1\n"}
    monkeypatch.setattr(cupy_backend, "source_files", lambda: edited)
    second = cupy_backend.cubin("nms.cu", "sm_90")
    assert second != first and second.read_bytes()[:4] == b"\x7fELF"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, second.name])  # no temporary left


def test_functions_are_looked_up_once_per_device(standin, monkeypatch):
    """Repeated launches reuse one module per source and one function per name on each device; tensors on device 1
    while device 0 is current use device 1's (the stand-in refuses a function looked up, or launched, on another
    device than its module's)."""
    monkeypatch.setenv("KPNET_KERNELS", "cuda")
    monkeypatch.setattr(standin.cupy.cuda.runtime, "DEVICE_COUNT", 2)
    x = torch.randn(1, 2, 9, 8)
    for device in (0, 1, 0, 1):
        standin.device_index = device
        for _ in range(3):
            corner_pool(x, "left")
            line_max(x, 2)
            heatmap_peaks(x.sigmoid(), 5)
    log = standin.cupy.log
    assert sorted(log.lookups) == sorted(set(log.lookups))
    assert {name for name, _ in log.lookups} == {"corner_pool_forward_f32", "line_max_forward_f32",
                                                  "peak_candidates_f32"}
    assert sorted(d for _, d in log.modules) == [0, 0, 1, 1]  # pooling.cu and decoding.cu on each device
    assert len(log.launches) == 4 * 3 * 3
