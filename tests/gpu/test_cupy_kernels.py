"""Every op's CuPy path against the PyTorch reference and the emulator (tests/gpu/conftest.py: on the stand-in in the
default suite, and on a CUDA device with CuPy where there is one): pooling forward and backward in every dtype
(requires-grad, non-contiguous and subnormal inputs) and peaks bit-identical; grouping and soft-NMS (kept
indices, scores, merged boxes) identical; a non-default stream; a second device; pooling past 2^31 elements.

The reference runs on CPU copies: its CUDA scatter_add is atomic, so only the CPU reference has the fixed
summation order the kernels reproduce."""

from __future__ import annotations

import pytest
import torch

from kpnet.ops import DIRECTIONS, corner_pool, group_corners, heatmap_peaks, line_max, soft_nms, soft_nms_merge
from kernel_cases import bits_equal, corners, nms_inputs

POOL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def all_bits_equal(ref, emu, cupy) -> None:
    for r, e, c in zip(ref, emu, cupy):
        bits_equal(r, e)
        bits_equal(r, c)


def _smallest(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny if dtype != torch.float16 else 6e-8  # float16: its subnormals are widened exactly


def pool_input(case: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output gradient) of one pooling case."""
    g = torch.Generator().manual_seed(POOL_DTYPES.index(dtype))
    if case == "ties_nan":
        x = torch.randint(-3, 4, (2, 5, 33, 17), generator=g).to(dtype)
        x[0, 0, 3, 3] = float("nan")
    elif case == "noncontiguous":
        x = torch.randint(-3, 4, (2, 9, 5, 7), generator=g).to(dtype).permute(0, 2, 3, 1)
    else:  # subnormals (of the dtype) among zeros of both signs: kept, never flushed to zero
        tiny = _smallest(dtype)
        values = torch.tensor([0.0, -0.0, tiny / 4, -tiny / 8, tiny / 2, tiny * 0.75], dtype=torch.float64)
        x = values[torch.randint(0, len(values), (2, 3, 11, 13), generator=g)].to(dtype)
    grad = (torch.randint(-6, 7, x.shape, generator=g) / 7).to(dtype)
    if case == "subnormals":
        grad = grad * _smallest(dtype) / 8
    return x, grad


def forward_backward(op, arg):
    def fn(x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = x.detach().requires_grad_()  # a requires-grad input, layout kept
        y = op(t, arg)
        y.backward(grad)
        return y, t.grad
    return fn


@pytest.mark.parametrize("case", ["ties_nan", "noncontiguous", "subnormals"])
@pytest.mark.parametrize("dtype", POOL_DTYPES)
def test_pooling_bit_identical(cupy_path, monkeypatch, dtype, case):
    x, grad = pool_input(case, dtype)
    if case == "subnormals":
        assert (x.double().abs() < torch.finfo(torch.float32).tiny).any() and (x != 0).any()
    for op, args in ((corner_pool, DIRECTIONS), (line_max, (2, 3))):
        for arg in args:
            all_bits_equal(*cupy_path.three_ways(monkeypatch, forward_backward(op, arg), x, grad))


def _heats():
    g = torch.Generator().manual_seed(5)
    nan = torch.rand(2, 6, 40, 33, generator=g)
    nan[0, 1, 3, 4] = float("nan")
    tiny = torch.finfo(torch.float32).tiny
    return {
        "random": torch.rand(2, 80, 24, 24, generator=g),
        "quantised": (torch.rand(1, 3, 16, 16, generator=g) * 4).round() / 4,
        "nan": nan,
        "subnormal": torch.tensor([0.0, tiny / 2, tiny / 4])[torch.randint(0, 3, (1, 2, 9, 9), generator=g)],
        "f64": torch.rand(1, 2, 9, 9, generator=g, dtype=torch.float64),
    }


@pytest.mark.parametrize("name", list(_heats()))
@pytest.mark.parametrize("k", [1, 100])
def test_peaks_bit_identical(cupy_path, monkeypatch, name, k):
    all_bits_equal(*cupy_path.three_ways(monkeypatch, lambda h: heatmap_peaks(h, k), _heats()[name]))


@pytest.mark.parametrize("mode", ["ae", "centripetal"])
@pytest.mark.parametrize("allow_zero_size", [True, False])
def test_grouping_identical(cupy_path, monkeypatch, mode, allow_zero_size):
    tl, br = corners(30, 1), corners(25, 2)
    br[2], br[3] = br[2] + 20, br[3] + 20
    g = torch.Generator().manual_seed(7)
    if mode == "ae":
        extra = [torch.rand(2, 30, generator=g), torch.rand(2, 25, generator=g)]
        names = ("tl_embed", "br_embed")
        params = dict(ae_threshold=0.5)
    else:
        extra = [tl[2] + torch.rand(2, 30, generator=g) * 30, tl[3] + 15.0, br[2] - torch.rand(2, 25, generator=g) * 30,
                 br[3] - 15.0]
        names = ("tl_ct_xs", "tl_ct_ys", "br_ct_xs", "br_ct_ys")
        params = dict(mu_area=3500.0, mu_small=1 / 2.1, mu_large=1 / 2.4, centripetal_weighting=True)

    def fn(*t):
        return group_corners(*t[:8], mode=mode, allow_zero_size=allow_zero_size, num_dets=300,
                             **dict(zip(names, t[8:])), **params)

    ref, emu, cupy = cupy_path.three_ways(monkeypatch, fn, *tl, *br, *extra)
    all_bits_equal(ref, emu, cupy)
    assert (ref.scores > -1).any() and (ref.scores == -1).any()


@pytest.mark.parametrize("method", ["gaussian", "linear", "hard"])
def test_soft_nms_identical(cupy_path, monkeypatch, method):
    fn = lambda b, s, c: soft_nms(b, s, c, method=method, sigma=0.5, iou_threshold=0.5)
    ref, emu, cupy = cupy_path.three_ways(monkeypatch, fn, *nms_inputs())
    all_bits_equal(ref, emu, cupy)


def test_soft_nms_merge_identical(cupy_path, monkeypatch):
    boxes, scores, classes = nms_inputs(seed=12)
    fn = lambda b, s, c, tl, br: soft_nms_merge(b, s, c, tl, br, method="gaussian", sigma=0.5, iou_threshold=0.5,
                                                weight_exp=10)
    ref, emu, cupy = cupy_path.three_ways(monkeypatch, fn, boxes, scores, classes, scores.roll(1), scores.roll(2))
    all_bits_equal(ref, emu, cupy)
    assert not torch.equal(ref[2], boxes[ref[0]])  # merging moved some boxes


def _reference_run(monkeypatch, direction: str):
    """(input, gradient, the run, its reference outputs) of one float32 corner pooling; KPNET_KERNELS=cuda after."""
    x, grad = pool_input("ties_nan", torch.float32)
    run = forward_backward(corner_pool, direction)
    monkeypatch.setenv("KPNET_KERNELS", "torch")
    want = run(x, grad)
    monkeypatch.setenv("KPNET_KERNELS", "cuda")
    return x, grad, run, [t.detach() for t in want]


def test_launches_on_a_non_default_stream(cupy_path, monkeypatch):
    """Kernels run on PyTorch's current stream: on a device, a fresh stream's results match the reference; on the
    stand-in, every launch names the stream torch reported."""
    x, grad, run, want = _reference_run(monkeypatch, "top")
    if cupy_path.cupy is not None:
        cupy_path.stream_handle = 0x5EED
        got = run(x, grad)
        assert {launch["stream"] for launch in cupy_path.cupy.log.launches} == {0x5EED}
    else:
        stream = torch.cuda.Stream()
        xd, gd = x.cuda(), grad.cuda()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            got = run(xd, gd)
        stream.synchronize()
    for a, b in zip(want, got):
        bits_equal(a, b.detach().cpu())


def test_second_device(cupy_path, monkeypatch):
    """On cuda:1 (two devices needed; the stand-in plays two): modules and functions are loaded there, launches run
    there, results match the reference."""
    x, grad, run, want = _reference_run(monkeypatch, "left")
    if cupy_path.cupy is not None:
        monkeypatch.setattr(cupy_path.cupy.cuda.runtime, "DEVICE_COUNT", 2)
        cupy_path.device_index = 1  # the tensors' device; device 0 stays current
        got = run(x, grad)
        log = cupy_path.cupy.log
        assert {d for _, d in log.modules} == {1} and {launch["device"] for launch in log.launches} == {1}
    else:
        if torch.cuda.device_count() < 2:
            pytest.skip("needs two CUDA devices")
        got = run(x.to("cuda:1"), grad.to("cuda:1"))
    for a, b in zip(want, got):
        bits_equal(a, b.detach().cpu())


def test_pooling_past_2_31_elements(cupy_path, monkeypatch):
    """A (1, 1, 2^16, 2^15 + 1) float16 map (2^31 + 2^16 elements): 64-bit line arithmetic, every direction."""
    if cupy_path.cupy is not None:
        pytest.skip("2^31 elements are for a device: the stand-in would take minutes and 12 GiB of host memory")
    monkeypatch.setenv("KPNET_KERNELS", "cuda")
    h, w = 2**16, 2**15 + 1
    need = 3 * h * w * 2
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free device memory")
    x = torch.zeros((1, 1, h, w), dtype=torch.float16, device="cuda")
    x[0, 0, h - 1, w - 1] = 1.0
    x[0, 0, 0, 0] = 2.0
    top = corner_pool(x, "top")
    assert top[0, 0, :, w - 1].eq(1).all() and top[0, 0, 1:, 0].eq(0).all() and top[0, 0, 0, 0] == 2
    del top
    left = corner_pool(x, "left")
    assert left[0, 0, h - 1].eq(1).all() and left[0, 0, 0, 0] == 2 and left[0, 0, 0, 1:].eq(0).all()
    assert left[0, 0, 1:h - 1].eq(0).all()
