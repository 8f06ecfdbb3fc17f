"""kpnet's exp and pow (kpnet/cuda/kpnet_types.cuh, kpnet/ops/kpmath.py): within 1 ulp of float64 libm and almost
always correctly rounded; the C functions, compiled with the emulator's flags, give the reference's bits; and no
kernel calls a libm or device transcendental."""

from __future__ import annotations

import ctypes
import re
import subprocess

import pytest
import torch

from kpnet.cuda import dispatch, emulator
from kpnet.ops import kpmath

_EMULATOR = dispatch.emulator_status()
needs_emulator = pytest.mark.skipif(not _EMULATOR[0], reason=f"the emulator cannot be built here: {_EMULATOR[1]}")


def _exp_args() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    dense = torch.rand(1 << 20, generator=g, dtype=torch.float64) * 200 - 110  # the whole range, subnormal results
    small = (torch.rand(1 << 18, generator=g) - 0.5) * 2.0 ** -torch.randint(0, 30, (1 << 18,), generator=g)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 88.72283, 88.72284, -87.33654, -103.27893, -103.97208, -104.0,
                            -110.0, 90.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45])
    return torch.cat([dense.float(), small, special])


def _pow_args() -> tuple[torch.Tensor, list[float]]:
    g = torch.Generator().manual_seed(1)
    bases = torch.cat([torch.rand(1 << 18, generator=g), torch.rand(1 << 12, generator=g) * 1e-30,
                       torch.tensor([0.0, 1.0, 0.5, 1e-45, 1 - 2**-24, float("inf"), float("nan")])])
    return bases, [8.0, 10.0, 0.5, 2.5, 1.0, 0.0, -1.5, 33.3]


def _ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| in units of the float32 spacing at `want` (finite lanes)."""
    near = want.float().abs()
    spacing = (torch.nextafter(near, torch.tensor(float("inf"))).double() - near.double())
    return (got.double() - want).abs() / spacing


def _check_accuracy(got: torch.Tensor, want: torch.Tensor) -> float:
    """Asserts got is within 1 ulp of want where want is finite in float32 (specials must match exactly); returns
    the fraction correctly rounded."""
    finite = want.float().isfinite()
    assert torch.equal(got[~finite].nan_to_num(7.0), want[~finite].float().nan_to_num(7.0))
    assert float(_ulps(got[finite], want[finite]).max()) <= 1.0
    return float((got[finite] == want[finite].float()).double().mean())


def test_exp_within_one_ulp():
    x = _exp_args()
    got = kpmath.exp(x)
    assert got.dtype == torch.float32
    assert _check_accuracy(got, torch.exp(x.double())) > 0.99999


def test_pow_within_one_ulp():
    bases, exponents = _pow_args()
    for e in exponents:
        got = kpmath.pow(bases, e)
        want = torch.pow(bases.double(), float(torch.tensor(e, dtype=torch.float32)))
        assert _check_accuracy(got, want) > 0.99999, e
    assert kpmath.pow(torch.tensor([-0.5]), 8.0).isnan().all()  # its domain: bases >= 0


_PROBE = r"""
#include "kpnet_shim.h"
#include "kpnet_types.cuh"
extern "C" void exp_n(const float* x, float* y, long long n) { for (long long i = 0; i < n; ++i) y[i] = kp_exp(x[i]); }
extern "C" void pow_n(const float* b, float e, float* y, long long n) {
    for (long long i = 0; i < n; ++i) y[i] = kp_pow(b[i], e);
}
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> ctypes.CDLL:
    """kp_exp and kp_pow compiled as the emulator compiles the kernels (its compiler and flags)."""
    tmp = tmp_path_factory.mktemp("kpmath")
    (tmp / "probe.cpp").write_text(_PROBE)
    proc = subprocess.run([emulator.compiler(), *emulator.CXX_FLAGS, "-I", str(emulator.SOURCE_DIR),
                           str(tmp / "probe.cpp"), "-o", str(tmp / "probe.so")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return ctypes.CDLL(str(tmp / "probe.so"))


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


@needs_emulator
def test_c_exp_gives_the_references_bits(compiled):
    x = _exp_args()
    y = torch.empty_like(x)
    compiled.exp_n(_ptr(x), _ptr(y), ctypes.c_longlong(x.numel()))
    assert torch.equal(y.view(torch.int32), kpmath.exp(x).view(torch.int32))


@needs_emulator
def test_c_pow_gives_the_references_bits(compiled):
    bases, exponents = _pow_args()
    for e in exponents:
        y = torch.empty_like(bases)
        compiled.pow_n(_ptr(bases), ctypes.c_float(e), _ptr(y), ctypes.c_longlong(bases.numel()))
        assert torch.equal(y.view(torch.int32), kpmath.pow(bases, e).view(torch.int32)), e


def test_kernels_call_no_library_transcendental():
    """Every exp/pow/log in the kernels is kpnet's: a libm or CUDA one (expf, __expf, pow, logf, ...) would round
    differently on the device and on the host."""
    libm = re.compile(r"(?<![\w.])_*(exp|exp2|expf|exp2f|expm1f?|pow|powf|log|logf|log2f?|log1pf?)\s*\(")
    for path in sorted(emulator.SOURCE_DIR.glob("*.cu*")):
        code = re.sub(r"//[^\n]*", "", path.read_text())
        assert not libm.findall(code), (path.name, libm.findall(code))
