"""The launch layer shared by both kernel backends: the kernel table (source file and C parameter
types), grid/block computation, argument packing, and one function per op that allocates outputs
and launches. `backend` is "cuda" (CuPy, kpnet/cuda/cupy_backend.py) or "emulate" (g++,
kpnet/cuda/emulator.py); everything else here is the same for both, so the emulator tests exercise
all of it but the device.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kpnet.cuda import emulator

BLOCK = 128
# torch dtype -> (C storage type, kernel suffix, C gradient type)
POOL_TYPES = {
    torch.float32: ("float", "f32", "float"),
    torch.float64: ("double", "f64", "double"),
    torch.float16: ("kp_f16", "f16", "double"),
    torch.bfloat16: ("kp_bf16", "bf16", "double"),
}
PEAK_TYPES = {torch.float32: ("float", "f32"), torch.float64: ("double", "f64")}

KERNELS: dict[str, tuple[str, tuple[str, ...]]] = {}
_LINES = ("kp_index",) * 6  # n_planes, lines, length, line_stride, step, lanes (kpnet/cuda/pooling.cu)
for _t, _suffix, _g in POOL_TYPES.values():
    KERNELS[f"corner_pool_forward_{_suffix}"] = ("pooling.cu", (f"const {_t}*", f"{_t}*", *_LINES, "int"))
    KERNELS[f"corner_pool_backward_{_suffix}"] = ("pooling.cu", (f"const {_t}*", f"const {_t}*", f"{_g}*", *_LINES,
                                                                 "int"))
    KERNELS[f"line_max_forward_{_suffix}"] = ("pooling.cu", (f"const {_t}*", f"{_t}*", *_LINES))
    KERNELS[f"line_max_backward_{_suffix}"] = ("pooling.cu", (f"const {_t}*", f"const {_t}*", f"{_g}*", "double*",
                                                              "kp_index*", *_LINES))
for _t, _suffix in PEAK_TYPES.values():
    KERNELS[f"peak_candidates_{_suffix}"] = ("decoding.cu", (f"const {_t}*", f"{_t}*", "kp_index*", "int", "int",
                                                             "int", "int", "int", "int"))
KERNELS["pair_scores_f32"] = ("decoding.cu", (
    "const float*", "const int*", "const float*", "const float*",
    "const float*", "const int*", "const float*", "const float*",
    "const float*", "const float*",
    "const float*", "const float*", "const float*", "const float*",
    "float*",
    "int", "int", "int", "int", "int", "int",
    "float", "float", "float", "float"))
KERNELS["soft_nms_f32"] = ("nms.cu", (
    "const float*", "float*", "const float*", "const float*",
    "const kp_index*", "unsigned char*", "kp_index*", "kp_index*", "float*",
    "int", "int", "float", "float", "float", "float", "float", "int"))

_SCALARS = {  # C scalar type -> (ctypes type for the emulator, numpy type for CuPy)
    "int": (ctypes.c_int, np.int32),
    "kp_index": (ctypes.c_longlong, np.int64),
    "float": (ctypes.c_float, np.float32),
}
# direction -> (scanned dim of an (N, C, H, W) tensor, whether the scan runs from the high end); ops.pooling reads it too
SCAN = {"top": (2, True), "left": (3, True), "bottom": (2, False), "right": (3, False)}


def grid_for(n_threads: int, block: int = BLOCK) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, block) covering n_threads threads along x, one thread per independent output."""
    return (max(1, -(-n_threads // block)), 1, 1), (block, 1, 1)


def _device_view(t: Tensor) -> Tensor:
    """What CuPy receives for a tensor argument: the same memory, detached (torch refuses
    `__cuda_array_interface__` to tensors that require grad), 16-bit floats as int16 (CuPy has no bfloat16; the
    kernels read the bits)."""
    t = t.detach()
    return t.view(torch.int16) if t.dtype in (torch.float16, torch.bfloat16) else t


@lru_cache(maxsize=1)
def _emulator_library() -> ctypes.CDLL:
    """The emulator build of KERNELS, once per process (hashing the sources on every launch cost 4 µs)."""
    return emulator.load(KERNELS)


def launch(name: str, n_threads: int, args: list[Any], backend: str, device: torch.device) -> None:
    """Pack `args` for `backend` following the kernel table and launch `name` over n_threads threads."""
    source, params = KERNELS[name]
    if len(args) != len(params):
        raise TypeError(f"{name} takes {len(params)} arguments, got {len(args)}")
    grid, block = grid_for(n_threads)
    if backend == "cuda":
        from kpnet.cuda import cupy_backend

        packed = [_device_view(a) if isinstance(a, Tensor) else _SCALARS[p][1](a) for a, p in zip(args, params)]
        cupy_backend.run(source, name, grid, block, packed, device)
    elif backend == "emulate":
        packed = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, Tensor) else _SCALARS[p][0](a)
                  for a, p in zip(args, params)]
        emulator.run(_emulator_library(), name, grid, block, packed)
    else:
        raise ValueError(f"unknown kernel backend {backend!r}")


# CPU threads (pooling.cu runs their lines as vector lanes, kpnet_cpu_lanes.h): a W-scan thread owns ROW_LANES
# rows; an H-scan corner-pool thread owns PLANES whole planes, so its backward streams one plane's gradients
# out while the next plane's inputs stream in.
ROW_LANES = 512
PLANES = 16


def pool_lanes(backend: str, x: Tensor, dim: int, planes: int = 1) -> int:
    """Lines per thread (pooling.cu): 1 on the GPU (adjacent threads, adjacent columns: coalesced loads);
    on the CPU `planes` whole planes of columns for H-scans (lanes = planes · W) and ROW_LANES rows for W-scans."""
    if backend == "cuda":
        return 1
    return planes * x.shape[3] if dim == 2 else ROW_LANES


def _lines(x: Tensor, dim: int) -> tuple[int, int, int, int, int]:
    """(n_planes, lines per plane, line length, line stride, element step) of a contiguous (N, C, H, W) tensor
    scanned along dim (the layout pooling.cu describes)."""
    n, c, h, w = x.shape
    if dim == 2:
        return n * c, w, h, 1, w
    return 1, n * c * h, w, w, 1


def _threads(lines: tuple[int, int, int, int, int], lanes: int) -> int:
    """Threads of a launch: each owns `lanes` lines of a plane or, with lanes >= lines per plane (CPU H-scans),
    lanes // lines whole planes."""
    n_planes, per_plane = lines[0], lines[1]
    if lanes >= per_plane and lines[3] == 1:
        return -(-n_planes // (lanes // per_plane))
    return n_planes * -(-per_plane // lanes)


def _scratch(x: Tensor, lines: tuple[int, int, int, int, int], lanes: int) -> list[Tensor]:
    """Per-line float64 sums and argmax positions, for threads that interleave several lines."""
    n = lines[0] * lines[1] if lanes > 1 else 1
    return [torch.empty(n, dtype=torch.float64, device=x.device), torch.empty(n, dtype=torch.int64, device=x.device)]


def corner_pool_forward(x: Tensor, direction: str, backend: str, lanes: int | None = None,
                        out: Tensor | None = None) -> Tensor:
    """Corner pooling forward by kernel (kpnet/cuda/pooling.cu); `lanes` overrides pool_lanes (tests), `out`
    is a contiguous tensor like x to write into (benchmarks/ops.py times the kernel alone with it)."""
    dim, reverse = SCAN[direction]
    x = x.contiguous()
    out = torch.empty_like(x) if out is None else out
    lines = _lines(x, dim)
    lanes = lanes or pool_lanes(backend, x, dim, PLANES)
    launch(f"corner_pool_forward_{POOL_TYPES[x.dtype][1]}", _threads(lines, lanes), [x, out, *lines, lanes,
                                                                                     int(reverse)], backend, x.device)
    return out


def _grad_buffer(x: Tensor) -> Tensor:
    grad_dtype = torch.float64 if POOL_TYPES[x.dtype][2] == "double" else x.dtype
    return torch.empty(x.shape, dtype=grad_dtype, device=x.device)


def corner_pool_backward(x: Tensor, grad: Tensor, direction: str, backend: str, lanes: int | None = None,
                         grad_in: Tensor | None = None) -> Tensor:
    """Corner pooling backward by kernel: recompute the argmax from x, sum gradients in double; `grad_in`
    as `out` of corner_pool_forward (float32 and float64 only: 16-bit types sum into a float64 buffer)."""
    dim, reverse = SCAN[direction]
    x, grad = x.contiguous(), grad.contiguous().to(x.dtype)
    grad_in = _grad_buffer(x) if grad_in is None else grad_in
    lines = _lines(x, dim)
    lanes = lanes or pool_lanes(backend, x, dim, PLANES)
    launch(f"corner_pool_backward_{POOL_TYPES[x.dtype][1]}", _threads(lines, lanes),
           [x, grad, grad_in, *lines, lanes, int(reverse)], backend, x.device)
    return grad_in.to(x.dtype)


def line_max_forward(x: Tensor, dim: int, backend: str, lanes: int | None = None) -> Tensor:
    """Full-line max broadcast, by kernel."""
    x = x.contiguous()
    out = torch.empty_like(x)
    lanes = lanes or pool_lanes(backend, x, dim)
    lines = _lines(x, dim)
    launch(f"line_max_forward_{POOL_TYPES[x.dtype][1]}", _threads(lines, lanes), [x, out, *lines, lanes], backend,
           x.device)
    return out


def line_max_backward(x: Tensor, grad: Tensor, dim: int, backend: str, lanes: int | None = None) -> Tensor:
    """Full-line max backward by kernel: each line's gradient sum (in double) goes to its argmax."""
    x, grad = x.contiguous(), grad.contiguous().to(x.dtype)
    grad_in = _grad_buffer(x)
    lanes = lanes or pool_lanes(backend, x, dim)
    lines = _lines(x, dim)
    launch(f"line_max_backward_{POOL_TYPES[x.dtype][1]}", _threads(lines, lanes),
           [x, grad, grad_in, *_scratch(x, lines, lanes), *lines, lanes], backend, x.device)
    return grad_in.to(x.dtype)


def peak_candidates(heat: Tensor, k: int, kernel: int, backend: str, rows: int | None = None) -> tuple[Tensor, Tensor]:
    """Each (B, M) candidate list of kernel×kernel peak scores (0 off-peak) and their flat (c, y, x) indices,
    by kernel (decoding.cu): per block of rows its top min(k, block size), so the stable top-k of the
    candidates in order is the top-k of the masked heatmap. Rows per thread: 1 on the GPU, the map on the CPU
    (`rows`, 1 or H, overrides it for tests)."""
    heat = heat.contiguous()
    if heat.numel() >= 2**31:
        raise ValueError(f"heatmap of {heat.numel()} elements exceeds the peak kernel's 32-bit indexing")
    b, c, h, w = heat.shape
    rows = rows or (1 if backend == "cuda" else h)
    cap = min(k, rows * w)
    n_threads = b * c * (h // rows)
    scores = torch.empty(n_threads * cap, dtype=heat.dtype, device=heat.device)
    index = torch.empty(n_threads * cap, dtype=torch.int64, device=heat.device)
    launch(f"peak_candidates_{PEAK_TYPES[heat.dtype][1]}", n_threads,
           [heat, scores, index, b * c, h, w, kernel // 2, rows, cap], backend, heat.device)
    image_start = torch.arange(b, device=heat.device).unsqueeze(1) * (c * h * w)
    return scores.view(b, -1), index.view(b, -1) - image_start


def pair_scores(
    mode: str,
    tl_scores: Tensor, tl_classes: Tensor, tl_xs: Tensor, tl_ys: Tensor,
    br_scores: Tensor, br_classes: Tensor, br_xs: Tensor, br_ys: Tensor,
    tl_embed: Tensor | None, br_embed: Tensor | None, ae_threshold: float | None,
    tl_ct_xs: Tensor | None, tl_ct_ys: Tensor | None, br_ct_xs: Tensor | None, br_ct_ys: Tensor | None,
    mu_area: float | None, mu_small: float | None, mu_large: float | None, centripetal_weighting: bool,
    allow_zero_size: bool, *, backend: str,
) -> Tensor:
    """The pair score of every pair, (B, K_tl, K_br), by kernel; same contract as the reference (the values
    the mode does not read, None there, travel as 0)."""
    device = tl_scores.device
    placeholder = torch.zeros(1, dtype=torch.float32, device=device)

    def f32(t: Tensor | None) -> Tensor:
        return placeholder if t is None else t.to(device, torch.float32).contiguous()

    def i32(t: Tensor) -> Tensor:
        return t.to(device, torch.int32).contiguous()

    b, k_tl = tl_scores.shape
    k_br = br_scores.shape[1]
    pair = torch.empty((b, k_tl, k_br), dtype=torch.float32, device=device)
    launch("pair_scores_f32", pair.numel(), [
        f32(tl_scores), i32(tl_classes), f32(tl_xs), f32(tl_ys),
        f32(br_scores), i32(br_classes), f32(br_xs), f32(br_ys),
        f32(tl_embed), f32(br_embed),
        f32(tl_ct_xs), f32(tl_ct_ys), f32(br_ct_xs), f32(br_ct_ys),
        pair,
        b, k_tl, k_br, {"ae": 0, "centripetal": 1}[mode], int(allow_zero_size), int(centripetal_weighting),
        ae_threshold or 0.0, mu_area or 0.0, mu_small or 0.0, mu_large or 0.0,
    ], backend, device)
    return pair


def soft_nms(
    boxes: Tensor, scores: Tensor, classes: Tensor, tl_scores: Tensor | None, br_scores: Tensor | None,
    method: int, sigma: float, iou_threshold: float, score_threshold: float, plus_one: bool, weight_exp: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class soft-NMS by kernel (one thread per class): (kept input indices, new scores, boxes), unordered."""
    device = scores.device
    order = torch.argsort(classes, stable=True)
    sorted_classes = classes[order]
    _, counts = torch.unique_consecutive(sorted_classes, return_counts=True)
    seg = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=device)
    seg[1:] = torch.cumsum(counts, 0)
    b = boxes[order].to(torch.float32).contiguous()
    s = scores[order].to(torch.float32).contiguous()
    merge = tl_scores is not None
    tl = tl_scores[order].to(torch.float32).contiguous() if merge else torch.zeros(1, device=device)
    br = br_scores[order].to(torch.float32).contiguous() if merge else torch.zeros(1, device=device)
    n = s.numel()
    active = torch.empty(n, dtype=torch.uint8, device=device)
    kept = torch.empty(n, dtype=torch.int64, device=device)
    n_kept = torch.empty(counts.numel(), dtype=torch.int64, device=device)
    merged = torch.empty((n, 4), dtype=torch.float32, device=device)
    launch("soft_nms_f32", counts.numel(), [
        b, s, tl, br, seg, active, kept, n_kept, merged,
        counts.numel(), method, sigma, iou_threshold, score_threshold, 1.0 if plus_one else 0.0, weight_exp,
        int(merge)], backend, device)
    segment = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts)
    valid = torch.arange(n, device=device) - seg[segment] < n_kept[segment]
    pos = kept[valid]
    return order[pos], s[pos], merged[pos]
