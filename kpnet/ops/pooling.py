"""Corner pooling (CornerNet §3.4, REFERENCE §1.3) and the full-line max of center pooling
(CenterNet-triplets §3.3, REFERENCE §1.5), forward and backward, on three backends.

Tie rule: a line is scanned from its scan start (the bottom row for top pooling, the right
column for left pooling, the top row for bottom pooling, the left column for right pooling,
index 0 for `line_max`). The running argmax moves to the current element when that element is
>= the running max, so among equal maxima the one scanned last wins — the one nearest the output
for corner pooling, the highest index for `line_max`. This is `torch.cummax`'s rule.

NaN rule: NaN counts as larger than every number and the latest NaN wins, so once a NaN has been
scanned the output stays NaN and its gradient goes to the most recent NaN (again `torch.cummax`).

Gradient rule: the gradient of an input element is the sum, in scan order, of the output
gradients whose argmax it is, accumulated in float64 and rounded once to the input dtype. (Which
payload a sum of two different NaN gradients keeps is left open, as IEEE 754 leaves it to operand
order.)

The PyTorch reference, the CUDA kernels (kpnet/cuda/pooling.cu) and the g++ emulator of those
kernels all follow these rules, so forward and backward agree bit for bit. Under ONNX export the
running max is computed by log-step doubling (pad/slice/max), because `torch.cummax` does not export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kpnet.cuda import dispatch, launch
from kpnet.cuda.launch import SCAN
from kpnet.errors import KpnetError

DIRECTIONS = ("top", "left", "bottom", "right")
# An exported graph with a dynamic side runs enough log steps for lines up to this long (16k-pixel inputs at stride 4)
EXPORT_MAX_LINE = 4096


def _check(x: Tensor, op: str) -> None:
    if x.dim() != 4:
        raise KpnetError(op, f"expected an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise KpnetError(op, f"expected a floating-point tensor, got {x.dtype}")


def _scan_view(t: Tensor, dim: int, reverse: bool) -> Tensor:
    return t.flip(dim) if reverse else t


class _CornerPoolReference(torch.autograd.Function):
    """Running max via `torch.cummax` on a flipped view; backward scatters into the argmax."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, reverse: bool) -> Tensor:
        values, indices = torch.cummax(_scan_view(x, dim, reverse), dim)
        ctx.save_for_backward(indices)
        ctx.dim, ctx.reverse, ctx.dtype = dim, reverse, x.dtype
        return _scan_view(values, dim, reverse)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (indices,) = ctx.saved_tensors
        g = _scan_view(grad, ctx.dim, ctx.reverse).to(torch.float64)
        acc = torch.zeros(indices.shape, dtype=torch.float64, device=grad.device)
        acc.scatter_add_(ctx.dim, indices, g)
        return _scan_view(acc, ctx.dim, ctx.reverse).to(ctx.dtype), None, None


class _LineMaxReference(torch.autograd.Function):
    """Max over a whole line broadcast back; backward puts the line's gradient sum on the argmax."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int) -> Tensor:
        n = x.shape[dim]
        values, indices = torch.cummax(x, dim)
        ctx.save_for_backward(indices.narrow(dim, n - 1, 1))
        ctx.dim, ctx.shape, ctx.dtype = dim, x.shape, x.dtype
        return values.narrow(dim, n - 1, 1).expand(x.shape).contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (argmax,) = ctx.saved_tensors
        n = ctx.shape[ctx.dim]
        line_sum = grad.to(torch.float64).cumsum(ctx.dim).narrow(ctx.dim, n - 1, 1)
        out = torch.zeros(ctx.shape, dtype=torch.float64, device=grad.device)
        out.scatter_(ctx.dim, argmax, line_sum)
        return out.to(ctx.dtype), None


class _CornerPoolKernel(torch.autograd.Function):
    """Corner pooling by the kernels in kpnet/cuda/pooling.cu (CuPy or the g++ emulator)."""

    @staticmethod
    def forward(ctx, x: Tensor, direction: str, backend: str) -> Tensor:
        ctx.save_for_backward(x)
        ctx.direction, ctx.backend = direction, backend
        return launch.corner_pool_forward(x, direction, backend)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        return launch.corner_pool_backward(x, grad, ctx.direction, ctx.backend), None, None


class _LineMaxKernel(torch.autograd.Function):
    """Full-line max by the kernels in kpnet/cuda/pooling.cu (CuPy or the g++ emulator)."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, backend: str) -> Tensor:
        ctx.save_for_backward(x)
        ctx.dim, ctx.backend = dim, backend
        return launch.line_max_forward(x, dim, backend)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        return launch.line_max_backward(x, grad, ctx.dim, ctx.backend), None, None


def running_max_logstep(x: Tensor, dim: int, reverse: bool) -> Tensor:
    """Running max along `dim` by log-step doubling with pad/slice/max (CornerNet-Lite's form, REFERENCE §8).

    ⌈log₂ n⌉ steps of `maximum(out, out shifted by 2^s)`, padding with -inf; exportable to ONNX. When the
    side is symbolic (a dynamic export dimension) the steps cover EXPORT_MAX_LINE, so the graph is right for any size.
    """
    n = x.shape[dim]
    longest = n if isinstance(n, int) else EXPORT_MAX_LINE
    pad = [0, 0] * (x.dim() - 1 - dim)
    out, step = x, 1
    while step < longest:
        if reverse:  # out[i] = max(out[i], out[i + step])
            shifted = F.pad(out, pad + [0, step], value=float("-inf")).narrow(dim, step, n)
        else:  # out[i] = max(out[i], out[i - step])
            shifted = F.pad(out, pad + [step, 0], value=float("-inf")).narrow(dim, 0, n)
        out = torch.maximum(out, shifted)
        step *= 2
    return out


def corner_pool(x: Tensor, direction: str) -> Tensor:
    """Directional running max of an (N, C, H, W) map (CornerNet §3.4; directions as REFERENCE §1.3).

    top: max over rows k >= i; left: max over columns k >= j; bottom: rows k <= i; right: columns k <= j.
    Tie, NaN and gradient rules are in this module's docstring.
    """
    if direction not in SCAN:
        raise KpnetError("corner_pool", f"unknown direction {direction!r}; expected one of {', '.join(DIRECTIONS)}")
    _check(x, "corner_pool")
    dim, reverse = SCAN[direction]
    if torch.onnx.is_in_onnx_export():
        return running_max_logstep(x, dim, reverse)
    if x.shape[dim] == 0 or x.numel() == 0:
        return x.clone()
    choice = dispatch.choose(x.device, x.dtype in launch.POOL_TYPES)
    if choice.backend == "torch":
        return _CornerPoolReference.apply(x, dim, reverse)
    return _CornerPoolKernel.apply(x, direction, choice.backend)


def line_max(x: Tensor, dim: int) -> Tensor:
    """Max over the whole of each line along `dim` (2: columns, 3: rows) broadcast back to every position.

    Center pooling's TopPool∘BottomPool and LeftPool∘RightPool (CenterNet-triplets §3.3, REFERENCE §1.5);
    the gradient of a line goes to the argmax of the tie rule in this module's docstring.
    """
    _check(x, "line_max")
    if dim not in (2, 3, -1, -2):
        raise KpnetError("line_max", f"dim must be 2 (H) or 3 (W) of an (N, C, H, W) tensor, got {dim}")
    dim = dim % 4
    if torch.onnx.is_in_onnx_export():
        return x.amax(dim, keepdim=True).expand(x.shape)
    if x.numel() == 0:
        return x.clone()
    choice = dispatch.choose(x.device, x.dtype in launch.POOL_TYPES)
    if choice.backend == "torch":
        return _LineMaxReference.apply(x, dim)
    return _LineMaxKernel.apply(x, dim, choice.backend)
