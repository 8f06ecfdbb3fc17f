"""kpnet's exp and pow on float32 tensors: the steps of kp_exp / kp_pow in kpnet/cuda/kpnet_types.cuh, in the
same order on float64 tensors, so the PyTorch reference rounds exactly as the kernels do (docs/kernels.md,
"One arithmetic"). Relative error of the float64 approximation below 2^-40; results within 1 ulp."""

from __future__ import annotations

import torch
from torch import Tensor

_ROUND = 6755399441055744.0
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_LN2_HI = 0.6931471803691238
_LN2_LO = 1.9082149292705877e-10
_SQRT2 = 1.4142135623730951
# exp: Taylor coefficients 1/10! ... 1/0!; log: 1/17, 1/15, ..., 1/1 (the header's literals)
_EXP = (2.755731922398589e-07, 2.7557319223985893e-06, 2.48015873015873e-05, 0.0001984126984126984,
        0.001388888888888889, 0.008333333333333333, 0.041666666666666664, 0.16666666666666666, 0.5, 1.0, 1.0)
_LOG = (0.058823529411764705, 0.06666666666666667, 0.07692307692307693, 0.09090909090909091, 0.1111111111111111,
        0.14285714285714285, 0.2, 0.3333333333333333, 1.0)


def _horner(coeffs: tuple[float, ...], v: Tensor) -> Tensor:
    p = torch.full_like(v, coeffs[0])
    for c in coeffs[1:]:
        p = p * v + c
    return p


def _exp_to_float(y: Tensor) -> Tensor:
    """kp_exp_to_float: exp of a float64 tensor, rounded to float32."""
    inside = (y > -110.0) & (y < 90.0)
    y_in = torch.where(inside, y, torch.zeros_like(y))
    n = (y_in * _LOG2E + _ROUND) - _ROUND
    r = (y_in - n * _LN2_HI) - n * _LN2_LO
    scale = ((n.to(torch.int64) + 1023) << 52).view(torch.float64)
    out = (_horner(_EXP, r) * scale).to(torch.float32)
    out = torch.where(y < 90.0, out, torch.full_like(out, float("inf")))
    out = torch.where(y > -110.0, out, torch.zeros_like(out))
    return torch.where(y.isnan(), torch.full_like(out, float("nan")), out)


def _log_core(b: Tensor) -> Tensor:
    """kp_log_core: ln of a float64 tensor of positive finite values (other lanes: meaningless)."""
    bits = b.view(torch.int64)
    k = (((bits >> 52) & 0x7FF) - 1023).to(torch.float64)
    m = ((bits & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000).view(torch.float64)
    high = m > _SQRT2
    m = torch.where(high, m * 0.5, m)
    k = torch.where(high, k + 1.0, k)
    s = (m - 1.0) / (m + 1.0)
    return k * _LN2 + (2.0 * s) * _horner(_LOG, s * s)


def exp(x: Tensor) -> Tensor:
    """kp_exp of a float32 tensor (kpnet/cuda/kpnet_types.cuh)."""
    return _exp_to_float(x.to(torch.float64))


def pow(base: Tensor, exponent: float) -> Tensor:
    """kp_pow(base, exponent) of a float32 tensor of bases >= 0 and a float32 exponent (kpnet/cuda/kpnet_types.cuh)."""
    e = float(torch.tensor(exponent, dtype=torch.float32))
    b = base.to(torch.float64)
    positive = (b > 0.0) & (b < float("inf"))
    out = _exp_to_float(e * _log_core(torch.where(positive, b, torch.ones_like(b))))
    zero_base = torch.full_like(out, 0.0 if e > 0 else float("inf"))
    inf_base = torch.full_like(out, float("inf") if e > 0 else 0.0)
    out = torch.where(b == 0.0, zero_base, torch.where(b == float("inf"), inf_base, out))
    out = torch.where((b >= 0.0) & (e == e), out, torch.full_like(out, float("nan")))
    return torch.where((b == 1.0) | (e == 0.0), torch.ones_like(out), out)
