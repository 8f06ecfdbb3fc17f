"""The launch layer shared by both kernel backends: the kernel table (source file and C parameter
types), grid/block computation, argument packing, and one function per op that allocates outputs
and launches. `backend` is "cuda" (CuPy, kpnet/cuda/cupy_backend.py) or "emulate" (g++,
kpnet/cuda/emulator.py); everything else here is the same for both, so the emulator tests exercise
all of it but the device.
"""

from __future__ import annotations

import ctypes
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
for _t, _suffix, _g in POOL_TYPES.values():
    _line = ("kp_index", "kp_index", "kp_index")
    KERNELS[f"corner_pool_forward_{_suffix}"] = ("pooling.cu", (f"const {_t}*", f"{_t}*", *_line, "int"))
    KERNELS[f"corner_pool_backward_{_suffix}"] = ("pooling.cu", (f"const {_t}*", f"const {_t}*", f"{_g}*", *_line,
                                                                 "int"))
    KERNELS[f"line_max_forward_{_suffix}"] = ("pooling.cu", (f"const {_t}*", f"{_t}*", *_line))
    KERNELS[f"line_max_backward_{_suffix}"] = ("pooling.cu", (f"const {_t}*", f"const {_t}*", f"{_g}*", *_line))
for _t, _suffix in PEAK_TYPES.values():
    KERNELS[f"peak_scores_{_suffix}"] = ("decoding.cu", (f"const {_t}*", f"{_t}*", "kp_index", "int", "int", "int"))
KERNELS["pair_scores_f32"] = ("decoding.cu", (
    "const float*", "const int*", "const float*", "const float*",
    "const float*", "const int*", "const float*", "const float*",
    "const float*", "const float*",
    "const float*", "const int*", "const float*", "const float*",
    "const float*", "const float*", "const float*", "const float*",
    "float*", "float*",
    "int", "int", "int", "int", "int", "int", "int",
    "float", "float", "float", "float", "float", "float", "float"))
KERNELS["soft_nms_f32"] = ("nms.cu", (
    "const float*", "float*", "const float*", "const float*",
    "const kp_index*", "unsigned char*", "kp_index*", "kp_index*", "float*",
    "int", "int", "float", "float", "float", "float", "float", "int"))

_SCALARS = {  # C scalar type -> (ctypes type for the emulator, numpy type for CuPy)
    "int": (ctypes.c_int, np.int32),
    "kp_index": (ctypes.c_longlong, np.int64),
    "float": (ctypes.c_float, np.float32),
}
_SCAN = {"top": (2, True), "left": (3, True), "bottom": (2, False), "right": (3, False)}


def grid_for(n_threads: int, block: int = BLOCK) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, block) covering n_threads threads along x, one thread per independent output."""
    return (max(1, -(-n_threads // block)), 1, 1), (block, 1, 1)


def _raw(t: Tensor) -> Tensor:
    """16-bit floats travel as int16 (CuPy has no bfloat16; the kernels read the bits)."""
    return t.view(torch.int16) if t.dtype in (torch.float16, torch.bfloat16) else t


def launch(name: str, n_threads: int, args: list[Any], backend: str, device: torch.device) -> None:
    """Pack `args` for `backend` following the kernel table and launch `name` over n_threads threads."""
    source, params = KERNELS[name]
    if len(args) != len(params):
        raise TypeError(f"{name} takes {len(params)} arguments, got {len(args)}")
    grid, block = grid_for(n_threads)
    if backend == "cuda":
        from kpnet.cuda import cupy_backend

        packed = [_raw(a) if isinstance(a, Tensor) else _SCALARS[p][1](a) for a, p in zip(args, params)]
        cupy_backend.run(source, name, grid, block, packed, device)
    elif backend == "emulate":
        packed = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, Tensor) else _SCALARS[p][0](a)
                  for a, p in zip(args, params)]
        emulator.run(KERNELS, name, grid, block, packed)
    else:
        raise ValueError(f"unknown kernel backend {backend!r}")


def _lines(x: Tensor, dim: int) -> tuple[int, int, int]:
    """(number of lines, line length, element stride) of a contiguous (N, C, H, W) tensor scanned along dim."""
    length = x.shape[dim]
    inner = x.shape[3] if dim == 2 else 1
    return x.numel() // length, length, inner


def corner_pool_forward(x: Tensor, direction: str, backend: str) -> Tensor:
    """Corner pooling forward by kernel (kpnet/cuda/pooling.cu)."""
    dim, reverse = _SCAN[direction]
    x = x.contiguous()
    out = torch.empty_like(x)
    n_lines, length, inner = _lines(x, dim)
    launch(f"corner_pool_forward_{POOL_TYPES[x.dtype][1]}", n_lines, [x, out, n_lines, length, inner, int(reverse)],
           backend, x.device)
    return out


def _grad_buffer(x: Tensor) -> Tensor:
    grad_dtype = torch.float64 if POOL_TYPES[x.dtype][2] == "double" else x.dtype
    return torch.empty(x.shape, dtype=grad_dtype, device=x.device)


def corner_pool_backward(x: Tensor, grad: Tensor, direction: str, backend: str) -> Tensor:
    """Corner pooling backward by kernel: recompute the argmax from x, sum gradients in double."""
    dim, reverse = _SCAN[direction]
    x, grad = x.contiguous(), grad.contiguous().to(x.dtype)
    grad_in = _grad_buffer(x)
    n_lines, length, inner = _lines(x, dim)
    launch(f"corner_pool_backward_{POOL_TYPES[x.dtype][1]}", n_lines,
           [x, grad, grad_in, n_lines, length, inner, int(reverse)], backend, x.device)
    return grad_in.to(x.dtype)


def line_max_forward(x: Tensor, dim: int, backend: str) -> Tensor:
    """Full-line max broadcast, by kernel."""
    x = x.contiguous()
    out = torch.empty_like(x)
    n_lines, length, inner = _lines(x, dim)
    launch(f"line_max_forward_{POOL_TYPES[x.dtype][1]}", n_lines, [x, out, n_lines, length, inner], backend, x.device)
    return out


def line_max_backward(x: Tensor, grad: Tensor, dim: int, backend: str) -> Tensor:
    """Full-line max backward by kernel: each line's gradient sum (in double) goes to its argmax."""
    x, grad = x.contiguous(), grad.contiguous().to(x.dtype)
    grad_in = _grad_buffer(x)
    n_lines, length, inner = _lines(x, dim)
    launch(f"line_max_backward_{POOL_TYPES[x.dtype][1]}", n_lines, [x, grad, grad_in, n_lines, length, inner],
           backend, x.device)
    return grad_in.to(x.dtype)


def peak_scores(heat: Tensor, kernel: int, backend: str) -> Tensor:
    """Heat at kernel×kernel local maxima, 0 elsewhere, by kernel (kpnet/cuda/decoding.cu)."""
    heat = heat.contiguous()
    if heat.numel() >= 2**31:
        raise ValueError(f"heatmap of {heat.numel()} elements exceeds the peak kernel's 32-bit indexing")
    out = torch.empty_like(heat)
    b, c, h, w = heat.shape
    launch(f"peak_scores_{PEAK_TYPES[heat.dtype][1]}", heat.numel(), [heat, out, b * c, h, w, kernel // 2],
           backend, heat.device)
    return out


def pair_scores(
    mode: str,
    tl_scores: Tensor, tl_classes: Tensor, tl_xs: Tensor, tl_ys: Tensor,
    br_scores: Tensor, br_classes: Tensor, br_xs: Tensor, br_ys: Tensor,
    tl_embed: Tensor | None, br_embed: Tensor | None, ae_threshold: float,
    ct_scores: Tensor | None, ct_classes: Tensor | None, ct_xs: Tensor | None, ct_ys: Tensor | None,
    region_area: float, region_n_small: float, region_n_large: float,
    tl_ct_xs: Tensor | None, tl_ct_ys: Tensor | None, br_ct_xs: Tensor | None, br_ct_ys: Tensor | None,
    mu_area: float, mu_small: float, mu_large: float, centripetal_weighting: bool,
    allow_zero_size: bool, *, backend: str,
) -> tuple[Tensor, Tensor]:
    """(pair score, final score), each (B, K_tl, K_br), by kernel; same contract as the reference."""
    device = tl_scores.device
    placeholder = torch.zeros(1, dtype=torch.float32, device=device)

    def f32(t: Tensor | None) -> Tensor:
        return placeholder if t is None else t.to(device, torch.float32).contiguous()

    def i32(t: Tensor | None) -> Tensor:
        return placeholder.to(torch.int32) if t is None else t.to(device, torch.int32).contiguous()

    b, k_tl = tl_scores.shape
    k_br = br_scores.shape[1]
    k_ct = 0 if ct_scores is None else ct_scores.shape[1]
    pair = torch.empty((b, k_tl, k_br), dtype=torch.float32, device=device)
    final = torch.empty_like(pair)
    mode_id = {"ae": 0, "triplet": 1, "centripetal": 2}[mode]
    launch("pair_scores_f32", pair.numel(), [
        f32(tl_scores), i32(tl_classes), f32(tl_xs), f32(tl_ys),
        f32(br_scores), i32(br_classes), f32(br_xs), f32(br_ys),
        f32(tl_embed), f32(br_embed),
        f32(ct_scores), i32(ct_classes), f32(ct_xs), f32(ct_ys),
        f32(tl_ct_xs), f32(tl_ct_ys), f32(br_ct_xs), f32(br_ct_ys),
        pair, final,
        b, k_tl, k_br, k_ct, mode_id, int(allow_zero_size), int(centripetal_weighting),
        ae_threshold, region_area, region_n_small, region_n_large, mu_area, mu_small, mu_large,
    ], backend, device)
    return pair, final


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
