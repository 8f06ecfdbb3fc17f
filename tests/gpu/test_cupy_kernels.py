"""The CuPy path against the PyTorch reference, on a CUDA device (skipped, with the reason, elsewhere).

The reference runs on CPU copies: its CUDA scatter_add is atomic, so only the CPU reference has the
fixed summation order the kernels reproduce."""

from __future__ import annotations

import pytest
import torch

from kpnet.cuda import dispatch
from kpnet.ops import DIRECTIONS, corner_pool, group_corners, heatmap_peaks, line_max, soft_nms

_ok, _why = dispatch.cupy_status() if torch.cuda.is_available() else (False, "no CUDA device (torch.cuda)")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _ok, reason=f"needs a CUDA device with CuPy: {_why}")]


def _on(backend, monkeypatch, fn, *tensors, device):
    monkeypatch.setenv("KPNET_KERNELS", backend)
    return fn(*[t.to(device) for t in tensors])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_pooling_matches_reference(monkeypatch, dtype):
    x = torch.randint(-3, 4, (2, 5, 33, 17)).to(dtype)
    x[0, 0, 3, 3] = float("nan")
    for op, args in [(corner_pool, DIRECTIONS), (line_max, (2, 3))]:
        for arg in args:
            def run(t):
                t = t.detach().clone().requires_grad_()
                y = op(t, arg)
                y.backward(torch.arange(y.numel(), dtype=torch.float32).view_as(y).to(y) / 7)
                return y.detach().cpu(), t.grad.cpu()
            y_ref, g_ref = _on("torch", monkeypatch, run, x, device="cpu")
            assert dispatch.choose(torch.device("cuda")).backend == "cuda"
            y_gpu, g_gpu = _on("auto", monkeypatch, run, x, device="cuda")
            assert torch.equal(y_ref.nan_to_num(9), y_gpu.nan_to_num(9)) and torch.equal(g_ref, g_gpu)


def test_decoding_matches_reference(monkeypatch):
    heat = torch.rand(2, 80, 64, 64)
    ref = _on("torch", monkeypatch, lambda h: heatmap_peaks(h, 100), heat, device="cpu")
    gpu = _on("auto", monkeypatch, lambda h: heatmap_peaks(h, 100), heat, device="cuda")
    for a, b in zip(ref, gpu):
        assert torch.equal(a, b.cpu())
    s, c, y, x = ref
    emb = torch.rand(2, 100)
    args = (s, c, x.float(), y.float(), s.flip(1), c.flip(1), x.float().flip(1) + 5, y.float().flip(1) + 5)
    g_ref = _on("torch", monkeypatch, lambda *t: group_corners(*t[:8], tl_embed=t[8], br_embed=t[9]), *args, emb,
                emb.flip(1), device="cpu")
    g_gpu = _on("auto", monkeypatch, lambda *t: group_corners(*t[:8], tl_embed=t[8], br_embed=t[9]), *args, emb,
                emb.flip(1), device="cuda")
    assert torch.equal(g_ref.tl_index, g_gpu.tl_index.cpu())
    torch.testing.assert_close(g_ref.scores, g_gpu.scores.cpu(), atol=1e-6, rtol=0)
    boxes = torch.cat([torch.rand(500, 2) * 100, torch.rand(500, 2) * 100 + 100], 1)
    scores, classes = torch.rand(500), torch.randint(0, 10, (500,))
    k_ref, s_ref = _on("torch", monkeypatch, soft_nms, boxes, scores, classes, device="cpu")
    k_gpu, s_gpu = _on("auto", monkeypatch, soft_nms, boxes, scores, classes, device="cuda")
    assert torch.equal(k_ref, k_gpu.cpu())
    torch.testing.assert_close(s_ref, s_gpu.cpu(), atol=1e-6, rtol=0)
