"""The g++-compiled kernels (the emulator) against the PyTorch reference: bit-identical pooling forward and
backward, identical decoding and soft-NMS (kept indices, scores and boxes), and the build cache."""

from __future__ import annotations

import os

import pytest
import torch

from kpnet.cuda import dispatch, emulator
from kpnet.ops import DIRECTIONS, corner_pool, group_corners, heatmap_peaks, line_max, soft_nms, soft_nms_merge
from kernel_cases import bits_equal, corners, nms_inputs

_EMULATOR = dispatch.emulator_status()
pytestmark = pytest.mark.skipif(not _EMULATOR[0], reason=f"the emulator cannot be built here: {_EMULATOR[1]}")


def _both(monkeypatch, fn):
    monkeypatch.setenv("KPNET_KERNELS", "torch")
    ref = fn()
    monkeypatch.setenv("KPNET_KERNELS", "emulate")
    assert dispatch.choose(torch.device("cpu")).backend == "emulate"
    return ref, fn()


def _pool_run(op, x, arg, seed=0):
    def fn():
        xx = x.detach().clone().requires_grad_()
        y = op(xx, arg)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(x.dtype)
        y.backward(g)
        return y.detach(), xx.grad
    return fn


def _pool_inputs():
    g = torch.Generator().manual_seed(3)
    ties = torch.randint(0, 3, (2, 3, 9, 7), generator=g).float()
    inf = torch.randn(2, 2, 6, 5, generator=g)
    inf[inf > 1] = float("inf")
    inf[inf < -1] = float("-inf")
    nan = torch.randn(1, 2, 7, 8, generator=g)
    nan[torch.rand(nan.shape, generator=g) < 0.1] = float("nan")
    return {
        "random": torch.randn(2, 4, 13, 11, generator=g),
        "ties": ties,
        "relu_zeros": torch.relu(torch.randn(1, 3, 8, 8, generator=g)),
        "inf": inf,
        "nan": nan,
        "signed_zeros": torch.tensor([-0.0, 0.0, -1.0, float("-inf")])[torch.randint(0, 4, (2, 3, 6, 37), generator=g)],
        "long_rows": torch.randint(-3, 4, (1, 2, 5, 300), generator=g).float(),
        "1x1": torch.randn(1, 2, 1, 1, generator=g),
        "odd": torch.randn(1, 1, 1, 9, generator=g),
        "noncontig": torch.randn(2, 9, 3, 7, generator=g).permute(0, 2, 3, 1),
        # CPU vector lanes: ragged blocks of rows and columns, several threads of rows, partial position tiles
        "ragged_tiles": torch.randn(1, 3, 203, 37, generator=g),
        "many_planes": torch.randn(3, 7, 9, 20, generator=g),  # 21 planes: H-scan threads of 16 planes and 5
        "all_equal": torch.full((1, 2, 19, 21), 0.5),  # every element is a new maximum (ties)
        "length_one": torch.randn(1, 2, 1, 40, generator=g).transpose(2, 3),
        "f64": torch.randn(1, 2, 5, 6, generator=g, dtype=torch.float64),
        "f16_ties": torch.randint(-2, 3, (1, 3, 7, 9), generator=g).half(),
        "bf16": torch.randn(1, 3, 7, 9, generator=g).bfloat16(),
        # W-scan forward: blocks of 8 rows and a ragged rest of rows, whole 16- (8-, float64) position pieces
        # and a ragged piece, a block with a NaN redone row by row
        "rows_nan": torch.where(torch.rand(1, 2, 9, 40, generator=g) < 0.02, float("nan"),
                                torch.randn(1, 2, 9, 40, generator=g)),
        "rows_f64": torch.tensor([-0.0, 0.0, -1.0, 2.0], dtype=torch.float64)[
            torch.randint(0, 4, (1, 2, 9, 21), generator=g)],
        "rows_bf16": torch.tensor([-0.0, 0.0, -1.0, 2.0])[torch.randint(0, 4, (1, 2, 9, 37), generator=g)].bfloat16(),
        # rows of whole 64-byte lines: every whole vector store is aligned (streamed stores, kpnet_cpu_lanes.h)
        "aligned_f32": torch.randn(2, 3, 20, 48, generator=g),
        "aligned_f64": torch.randint(-2, 3, (1, 3, 17, 32), generator=g).double(),
    }


@pytest.fixture(params=["cached", "streamed"])
def stores(request):
    """The emulator's output stores: as below the last-level cache, or streamed past the caches for every call,
    as calls larger than the cache do (kpnet_cpu_lanes.h, streams())."""
    from kpnet.cuda import launch

    lib = launch._emulator_library()
    emulator.set_host_cache_bytes(lib, 1 if request.param == "streamed" else 0)
    yield request.param
    emulator.set_host_cache_bytes(lib, emulator.host_cache_bytes())


@pytest.mark.parametrize("name", list(_pool_inputs()))
def test_corner_pool_bit_identical(monkeypatch, stores, name):
    x = _pool_inputs()[name]
    for direction in DIRECTIONS:
        (y_ref, g_ref), (y_emu, g_emu) = _both(monkeypatch, _pool_run(corner_pool, x, direction))
        bits_equal(y_ref, y_emu)
        bits_equal(g_ref, g_emu)


@pytest.mark.parametrize("name", list(_pool_inputs()))
def test_line_max_bit_identical(monkeypatch, name):
    x = _pool_inputs()[name]
    for dim in (2, 3):
        (y_ref, g_ref), (y_emu, g_emu) = _both(monkeypatch, _pool_run(line_max, x, dim))
        bits_equal(y_ref, y_emu)
        bits_equal(g_ref, g_emu)


def test_host_cache_bytes_reads_the_last_level(tmp_path):
    for index, level, size in (("index0", "1", "48K"), ("index2", "2", "1024K"), ("index3", "3", "32768K")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "level").write_text(level + "\n")
        (tmp_path / index / "size").write_text(size + "\n")
    assert emulator.host_cache_bytes(tmp_path) == 32 * 2**20
    assert emulator.host_cache_bytes(tmp_path / "missing") == 0


@pytest.mark.parametrize("specials", [(0x7FC00001, 0x7F800001, 0x7F800000), (0x7F800000, 0xFF800000)])
def test_corner_pool_nan_and_inf_gradients_bit_identical(monkeypatch, specials):
    """Gradients holding NaNs (a quiet and a signaling pattern of one payload) and infinities sum to the
    reference's bits. (Which payload a sum of two different NaNs keeps depends on operand order, which IEEE and
    compilers leave open, so each case holds one payload: NaN and +inf, or +inf and -inf, whose sum is NaN.)"""
    g = torch.Generator().manual_seed(8)
    x = torch.randint(0, 4, (1, 2, 17, 18), generator=g).float()
    grad = torch.randn(x.shape, generator=g)
    special = torch.tensor(specials, dtype=torch.int64)
    mask = torch.rand(x.shape, generator=g) < 0.2
    grad.view(torch.int32)[mask] = special[torch.randint(0, len(specials), (int(mask.sum()),), generator=g)].to(
        torch.int32)
    for direction in DIRECTIONS:
        (y_ref, g_ref), (y_emu, g_emu) = _both(monkeypatch, lambda: _grad_of(x, direction, grad))
        bits_equal(g_ref, g_emu)
        assert g_ref.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_corner_pool_every_16bit_pattern_bit_identical(monkeypatch, dtype):
    """Every 16-bit pattern (subnormals, ±0, ±inf, NaN payloads) keeps its bits through the CPU lanes' widening."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    perm = torch.randperm(bits.numel(), generator=torch.Generator().manual_seed(6))
    x = bits[perm].view(dtype).reshape(1, 4, 128, 128)
    for direction in DIRECTIONS:
        (y_ref, g_ref), (y_emu, g_emu) = _both(monkeypatch, _pool_run(corner_pool, x, direction))
        bits_equal(y_ref, y_emu)
        bits_equal(g_ref, g_emu)


def test_emulator_launches_from_two_threads(monkeypatch):
    """Concurrent launches (ctypes releases the GIL) keep their own launch state and scratch."""
    from concurrent.futures import ThreadPoolExecutor

    from kpnet.cuda import launch

    g = torch.Generator().manual_seed(10)
    xs = [torch.randn(2, 8, 64, 48, generator=g) for _ in range(8)]
    grads = [torch.randn(x.shape, generator=g) for x in xs]
    want = [(launch.corner_pool_forward(x, d, "emulate"), launch.corner_pool_backward(x, gr, d, "emulate"))
            for x, gr, d in zip(xs, grads, DIRECTIONS * 2)]

    def run(i):
        return [(launch.corner_pool_forward(xs[i], d, "emulate"), launch.corner_pool_backward(xs[i], grads[i], d,
                                                                                              "emulate"))
                for d in [DIRECTIONS[i % 4]] * 20][-1]

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(run, range(8)))
    for (y, gi), (y_want, g_want) in zip(got, want):
        bits_equal(y, y_want)
        bits_equal(gi, g_want)


def test_tie_rule_gradient_goes_to_latest_scanned(monkeypatch):
    """Ties: the gradient lands on the equal maximum scanned last (nearest the output), on both backends."""
    x = torch.tensor([[[[2.0, 2.0, 1.0, 2.0]]]])
    for backend in ("torch", "emulate"):
        monkeypatch.setenv("KPNET_KERNELS", backend)
        xx = x.clone().requires_grad_()
        corner_pool(xx, "right").sum().backward()  # scan left -> right, out[j] = max over k <= j
        assert xx.grad.flatten().tolist() == [1.0, 2.0, 0.0, 1.0]
        xx = x.clone().requires_grad_()
        line_max(xx, 3).sum().backward()
        assert xx.grad.flatten().tolist() == [0.0, 0.0, 0.0, 4.0]


def test_corner_pool_negative_zero_gradient(monkeypatch):
    """A -0.0 output gradient summed onto an argmax gives the reference's +0.0 (0.0 + -0.0), on every layout."""
    from kpnet.cuda import launch

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 9, 10, generator=g)
    grad = torch.full(x.shape, -0.0)
    for direction in DIRECTIONS:
        (y_ref, g_ref), (y_emu, g_emu) = _both(monkeypatch, lambda: _grad_of(x, direction, grad))
        bits_equal(g_ref, g_emu)
        assert not torch.signbit(g_ref).any()
        for lanes in (1, 3):
            bits_equal(launch.corner_pool_backward(x, grad, direction, "emulate", lanes=lanes), g_ref)


def _grad_of(x, direction, grad):
    xx = x.clone().requires_grad_()
    y = corner_pool(xx, direction)
    y.backward(grad)
    return y.detach(), xx.grad


def _peak_heats():
    g = torch.Generator().manual_seed(5)
    rand = torch.rand(2, 4, 17, 13, generator=g)
    nan = rand.clone()
    nan[0, 1, 3, 4] = float("nan")
    return {
        "random": rand,
        "quantised": (torch.rand(1, 3, 16, 16, generator=g) * 4).round() / 4,
        "empty": torch.zeros(2, 3, 8, 8),
        "all_equal": torch.full((1, 2, 5, 5), 0.3),
        "nan": nan,
        "f64": torch.rand(1, 2, 9, 9, generator=g, dtype=torch.float64),
    }


@pytest.mark.parametrize("name", list(_peak_heats()))
@pytest.mark.parametrize("k", [1, 40, 10_000])
def test_heatmap_peaks_identical(monkeypatch, name, k):
    heat = _peak_heats()[name]
    ref, emu = _both(monkeypatch, lambda: heatmap_peaks(heat, k))
    for a, b in zip(ref, emu):
        assert torch.equal(a, b)
    b, c, h, w = heat.shape
    assert ref[0].shape == (b, min(k, c * h * w))


def test_heatmap_peaks_semantics():
    heat = torch.zeros(1, 2, 4, 4)
    heat[0, 1, 2, 3] = 0.9
    heat[0, 0, 0, 0] = 0.5
    heat[0, 0, 0, 1] = 0.4  # next to a higher value: not a peak, scores 0
    scores, classes, ys, xs = heatmap_peaks(heat, 3)
    assert scores.tolist() == [[pytest.approx(0.9), 0.5, 0.0]]
    # the suppressed (0, 0, 1) scores 0 and is the next zero in (c, y, x) order
    assert (classes.tolist(), ys.tolist(), xs.tolist()) == ([[1, 0, 0]], [[2, 0, 0]], [[3, 0, 1]])


@pytest.mark.parametrize("mode", ["ae", "centripetal"])
@pytest.mark.parametrize("allow_zero_size", [True, False])
def test_group_corners_identical(monkeypatch, mode, allow_zero_size):
    tl = corners(30, 1)
    br = corners(25, 2)
    br[2], br[3] = br[2] + 20, br[3] + 20
    g = torch.Generator().manual_seed(7)
    if mode == "ae":
        extra = dict(tl_embed=torch.rand(2, 30, generator=g), br_embed=torch.rand(2, 25, generator=g), ae_threshold=0.5)
    else:
        extra = dict(tl_ct_xs=tl[2] + torch.rand(2, 30, generator=g) * 30, tl_ct_ys=tl[3] + 15.0,
                     br_ct_xs=br[2] - torch.rand(2, 25, generator=g) * 30, br_ct_ys=br[3] - 15.0,
                     mu_area=3500.0, mu_small=1 / 2.1, mu_large=1 / 2.4, centripetal_weighting=True)
    ref, emu = _both(monkeypatch, lambda: group_corners(*tl, *br, mode=mode, allow_zero_size=allow_zero_size,
                                                        num_dets=300, **extra))
    for a, b in zip(ref, emu):
        bits_equal(a, b)
    assert (ref.scores > -1).any() and (ref.scores == -1).any()


def test_group_corners_rules():
    one = torch.ones(1, 1)
    base = dict(tl_embed=torch.zeros(1, 1), br_embed=torch.full((1, 1), 0.5), ae_threshold=0.5, num_dets=10)
    out = group_corners(one * 0.8, one.long(), one * 2, one * 2, one * 0.4, one.long(), one * 2, one * 9, **base)
    assert out.scores.item() == pytest.approx(0.6)  # mean; |e| = 0.5 not > 0.5; zero width allowed
    out = group_corners(one * 0.8, one.long(), one * 2, one * 2, one * 0.4, one.long(), one * 2, one * 9, **base,
                        allow_zero_size=False)
    assert out.scores.item() == -1
    out = group_corners(one * 0.8, one.long(), one * 2, one * 2, one * 0.4, one.long() * 2, one * 5, one * 9, **base)
    assert out.scores.item() == -1  # classes differ


@pytest.mark.parametrize(("mode", "drop", "message"), [
    ("ae", "ae_threshold", "mode 'ae' needs ae_threshold"),
    ("ae", "num_dets", "mode 'ae' needs num_dets"),
    ("centripetal", "mu_small", "mode 'centripetal' needs mu_small"),
    ("triplet", None, "unknown mode 'triplet'; expected one of ae, centripetal"),
])
def test_group_corners_needs_the_recipes_values(mode, drop, message):
    """No defaults for what the recipe carries: a missing value (or the removed triplet mode) is a KpnetError."""
    from kpnet.errors import KpnetError

    one = torch.ones(1, 1)
    given = dict(tl_embed=one, br_embed=one, ae_threshold=0.5, tl_ct_xs=one, tl_ct_ys=one, br_ct_xs=one,
                 br_ct_ys=one, mu_area=3500.0, mu_small=0.5, mu_large=0.4, num_dets=10)
    given.pop(drop, None)
    with pytest.raises(KpnetError, match=f"^group_corners: {message}"):
        group_corners(one, one.long(), one, one, one, one.long(), one * 2, one * 2, mode=mode, **given)


@pytest.mark.parametrize("method", ["gaussian", "linear", "hard"])
@pytest.mark.parametrize("plus_one", [True, False])
def test_soft_nms_identical(monkeypatch, method, plus_one):
    boxes, scores, classes = nms_inputs()
    (k_ref, s_ref), (k_emu, s_emu) = _both(
        monkeypatch, lambda: soft_nms(boxes, scores, classes, method=method, sigma=0.5, iou_threshold=0.5,
                                      plus_one=plus_one))
    assert torch.equal(k_ref, k_emu)
    bits_equal(s_ref, s_emu)
    assert len(set(k_ref.tolist())) == len(k_ref)  # keep honoured: no stale duplicate rows
    if method != "linear":  # linear decay rarely drops a score below 0.001
        assert len(k_ref) < len(scores)


def test_soft_nms_merge_identical(monkeypatch):
    boxes, scores, classes = nms_inputs(seed=12)
    tl, br = scores.roll(1), scores.roll(2)
    (k_ref, s_ref, b_ref), (k_emu, s_emu, b_emu) = _both(
        monkeypatch, lambda: soft_nms_merge(boxes, scores, classes, tl, br, method="gaussian", sigma=0.5,
                                            iou_threshold=0.5, weight_exp=10))
    assert torch.equal(k_ref, k_emu)
    bits_equal(s_ref, s_emu)
    bits_equal(b_ref, b_emu)
    assert not torch.equal(b_ref, boxes[k_ref])  # merging moved some boxes


def test_soft_nms_semantics():
    boxes = torch.tensor([[0.0, 0, 9, 9], [0, 0, 9, 9], [20, 20, 29, 29], [0, 0, 9, 9]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    keep, new = soft_nms(boxes, scores, torch.tensor([0, 0, 0, 1]), method="hard", sigma=0.5, iou_threshold=0.5)
    assert keep.tolist() == [0, 2, 3]  # box 1 is the same box as 0 (IoU 1): removed; class 1 untouched
    keep, new = soft_nms(boxes, scores, torch.tensor([0, 0, 0, 1]), method="gaussian", sigma=0.5, iou_threshold=0.5)
    assert keep.tolist() == [0, 2, 3, 1]
    assert new[-1].item() == pytest.approx(0.8 * torch.exp(torch.tensor(-1 / 0.5)).item())


def test_build_is_cached_by_source_hash(monkeypatch, tmp_path):
    from kpnet.cuda.launch import KERNELS

    monkeypatch.setenv("KPNET_CACHE_DIR", str(tmp_path))
    subset = {"peak_candidates_f32": KERNELS["peak_candidates_f32"]}
    first = emulator.build(subset)
    assert first.parent == tmp_path and first.exists()
    stamp = first.stat().st_mtime_ns
    assert emulator.build(subset) == first and first.stat().st_mtime_ns == stamp  # no rebuild
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # the temporary build dir is gone
    other = emulator.build({"peak_candidates_f64": KERNELS["peak_candidates_f64"]})
    assert other != first  # different launcher set -> different hash


def test_missing_compiler_refuses_with_reason(monkeypatch):
    """KPNET_KERNELS=emulate without a usable compiler is a one-line error; the default still runs the reference."""
    from kpnet.errors import KpnetError

    monkeypatch.setenv("KPNET_KERNELS", "emulate")
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("PATH", os.devnull)
    with pytest.raises(KpnetError, match="^KPNET_KERNELS: emulate requested but no C\\+\\+ compiler found"):
        dispatch.choose(torch.device("cpu"))
    monkeypatch.setenv("KPNET_KERNELS", "auto")
    x = torch.randn(1, 1, 4, 4)
    assert torch.equal(corner_pool(x, "top"), torch.cummax(x.flip(2), 2).values.flip(2))


@pytest.mark.parametrize("lanes", [1, 3])
def test_pooling_gpu_thread_layout_bit_identical(lanes):
    """The GPU's launch shape (lanes=1: one scan line per thread) and a ragged one (3) give the reference's bits."""
    from kpnet.cuda import launch
    from kpnet.cuda.launch import SCAN

    g = torch.Generator().manual_seed(9)
    for x in (torch.randint(0, 3, (2, 3, 9, 7), generator=g).float(), torch.randn(1, 2, 6, 11, generator=g)):
        grad = torch.randn(x.shape, generator=g)
        for direction, (dim, reverse) in SCAN.items():
            values, indices = torch.cummax(x.flip(dim) if reverse else x, dim)
            want = values.flip(dim) if reverse else values
            acc = torch.zeros(x.shape, dtype=torch.float64).scatter_add_(
                dim, indices, (grad.flip(dim) if reverse else grad).double())
            want_grad = (acc.flip(dim) if reverse else acc).float()
            bits_equal(launch.corner_pool_forward(x, direction, "emulate", lanes=lanes), want)
            bits_equal(launch.corner_pool_backward(x, grad, direction, "emulate", lanes=lanes), want_grad)
        for dim in (2, 3):
            bits_equal(launch.line_max_forward(x, dim, "emulate", lanes=lanes),
                        x.amax(dim, keepdim=True).expand(x.shape))


@pytest.mark.parametrize("planes", [1, 2, 3])
def test_pooling_threads_of_whole_planes_bit_identical(planes):
    """H-scan CPU threads that own several planes (the backward pipelines one plane's pass 2 with the next
    plane's pass 1), the last thread with fewer, give the reference's bits."""
    from kpnet.cuda import launch
    from kpnet.cuda.launch import SCAN

    g = torch.Generator().manual_seed(12)
    x = torch.randint(-2, 3, (1, 7, 11, 21), generator=g).float()
    grad = torch.randn(x.shape, generator=g)
    for direction in ("top", "bottom"):
        dim, reverse = SCAN[direction]
        values, indices = torch.cummax(x.flip(dim) if reverse else x, dim)
        want = values.flip(dim) if reverse else values
        acc = torch.zeros(x.shape, dtype=torch.float64).scatter_add_(dim, indices,
                                                                     (grad.flip(dim) if reverse else grad).double())
        want_grad = (acc.flip(dim) if reverse else acc).float()
        lanes = planes * x.shape[3]
        bits_equal(launch.corner_pool_forward(x, direction, "emulate", lanes=lanes), want)
        bits_equal(launch.corner_pool_backward(x, grad, direction, "emulate", lanes=lanes), want_grad)


@pytest.mark.parametrize("k", [1, 5, 40])
def test_peak_candidates_row_threads_identical(monkeypatch, k):
    """The GPU's layout (one thread per heatmap row) selects the same peaks as the whole-map CPU layout."""
    from kpnet.cuda import launch
    from kpnet.ops.decoding import topk_stable

    heat = _peak_heats()["quantised"]
    monkeypatch.setenv("KPNET_KERNELS", "torch")
    want = heatmap_peaks(heat, k)
    for rows in (1, heat.shape[2]):
        scores, index = launch.peak_candidates(heat, k, 3, "emulate", rows=rows)
        top, order = topk_stable(scores, k)
        assert torch.equal(top, want[0])
        flat = torch.gather(index, 1, order)
        assert torch.equal(flat, want[1] * 256 + want[2] * 16 + want[3])
