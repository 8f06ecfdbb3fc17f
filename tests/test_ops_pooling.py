"""The PyTorch reference pooling ops: REFERENCE §1.3 direction semantics, gradcheck in float64, and the
ONNX-exportable log-step form (equal to the reference, chosen automatically under export)."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from kpnet.errors import KpnetError
from kpnet.ops import DIRECTIONS, corner_pool, line_max
from kpnet.cuda.launch import SCAN
from kpnet.ops.pooling import running_max_logstep


@pytest.fixture(autouse=True)
def _reference(monkeypatch):
    monkeypatch.setenv("KPNET_KERNELS", "torch")


def test_direction_semantics():
    x = torch.tensor([[1.0, 5.0, 2.0], [4.0, 0.0, 3.0], [0.0, 6.0, 1.0]]).view(1, 1, 3, 3)
    top = torch.tensor([[4.0, 6.0, 3.0], [4.0, 6.0, 3.0], [0.0, 6.0, 1.0]])  # max over rows k >= i
    left = torch.tensor([[5.0, 5.0, 2.0], [4.0, 3.0, 3.0], [6.0, 6.0, 1.0]])  # max over columns k >= j
    bottom = torch.tensor([[1.0, 5.0, 2.0], [4.0, 5.0, 3.0], [4.0, 6.0, 3.0]])  # rows k <= i
    right = torch.tensor([[1.0, 5.0, 5.0], [4.0, 4.0, 4.0], [0.0, 6.0, 6.0]])  # columns k <= j
    for name, want in (("top", top), ("left", left), ("bottom", bottom), ("right", right)):
        assert torch.equal(corner_pool(x, name)[0, 0], want), name
    assert torch.equal(line_max(x, 2)[0, 0], torch.tensor([4.0, 6.0, 3.0]).expand(3, 3))
    assert torch.equal(line_max(x, 3)[0, 0], torch.tensor([[5.0], [4.0], [6.0]]).expand(3, 3))
    # center pooling identity (REFERENCE §1.5): BottomPool(TopPool(x)) is the column max
    assert torch.equal(corner_pool(corner_pool(x, "top"), "bottom"), line_max(x, 2))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_gradcheck_corner_pool(direction):
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: corner_pool(t, direction), (x,))


@pytest.mark.parametrize("dim", [2, 3])
def test_gradcheck_line_max(dim):
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: line_max(t, dim), (x,))


def test_nan_rule():
    x = torch.tensor([[[[1.0, float("nan"), 3.0, 0.0]]]], requires_grad=True)
    y = corner_pool(x, "right")
    assert y[0, 0, 0, 0] == 1 and y[0, 0, 0, 1:].isnan().all()
    y.sum().backward()
    assert x.grad.flatten().tolist() == [1.0, 3.0, 0.0, 0.0]


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_logstep_equals_reference(direction):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (2, 3, 13, 9), generator=g).float()
    x[0, 0, 4, 4] = float("inf")
    x[1, 2, 7, 1] = float("-inf")
    x[1, 1, 3, 3] = float("nan")
    dim, reverse = SCAN[direction]
    assert torch.equal(running_max_logstep(x, dim, reverse).nan_to_num(7e7), corner_pool(x, direction).nan_to_num(7e7))


def test_onnx_export_uses_logstep():
    ort = pytest.importorskip("onnxruntime")

    class Pools(torch.nn.Module):
        def forward(self, x):
            return torch.cat([corner_pool(x, d) for d in DIRECTIONS] + [line_max(x, 2), line_max(x, 3)], 1)

    x = torch.randn(1, 2, 11, 7)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Pools(), (x,), buf, dynamo=False, opset_version=17)
    session = ort.InferenceSession(buf.getvalue())
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert torch.equal(torch.from_numpy(out), Pools()(x))


def test_bad_input_is_a_kpnet_error():
    with pytest.raises(KpnetError, match="unknown direction 'up'"):
        corner_pool(torch.zeros(1, 1, 2, 2), "up")
    with pytest.raises(KpnetError, match="N, C, H, W"):
        line_max(torch.zeros(2, 2), 1)
