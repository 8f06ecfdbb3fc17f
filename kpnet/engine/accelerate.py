"""The inference engine: the network as the test pipeline runs it (docs/architecture.md, "Data flows").

`inference_network(network, recipe)` is the one place a network is prepared for inference: an eval-mode copy with
batch norm folded into the convolutions (kpnet.engine.fuse), deformable convolutions as sampling + one matrix
product (`SampledDeformConv`), channels-last weights and inputs, run under
`torch.inference_mode`, in the precision `test.precision` resolves to (autocast), optionally compiled
(`test.compile`); heads come back as contiguous float32. The copy is rebuilt when the network's weights,
device or the test settings change, so training and checkpoints only ever see the network itself.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import DeformConv2d

from kpnet.config import Recipe, TestConfig
from kpnet.data.transforms import test_input
from kpnet.engine.fuse import fold_batch_norm
from kpnet.errors import KpnetError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Plan:
    """What the engine does to a network on a device: the autocast precision, whether it compiles, and why."""

    precision: str  # fp32 | bf16 | fp16
    compile: bool
    reason: str


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles), where bf16 autocast can pay."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


# Backbones whose network measured faster under bf16 autocast on a CPU with native bf16 (benchmarks/inference.py):
# HG-104 / HG-52. ResNet / DLA-34 with their deformable up-path measured slower, the small hourglass no faster.
BF16_BACKBONES = ("hourglass104", "hourglass52")


def plan(test: TestConfig, device: torch.device, backbone: str) -> Plan:
    """Resolve `test.precision` and `test.compile` for `device` and a network on `backbone`. The `auto` rules are the
    measured ones (benchmarks/inference.py): on a CPU with native bf16, bf16 for BF16_BACKBONES and fp32 for the
    others; bf16 on CUDA where supported, else fp16 (not measured here); fp32 elsewhere; no compilation (on CPU
    `torch.compile` took minutes and ran slower: the kernel dispatch breaks the graph)."""
    precision, why = test.precision, f"test.precision={test.precision}"
    if precision == "auto":
        if device.type == "cuda":
            precision, why = ("bf16", "CUDA with bf16") if torch.cuda.is_bf16_supported() else ("fp16", "CUDA without bf16")
        elif device.type == "cpu" and native_bf16_cpu():
            precision, why = ("bf16", f"CPU with native bf16 (AVX512-BF16/AMX), {backbone}") if backbone in BF16_BACKBONES \
                else ("fp32", f"CPU with native bf16, but {backbone} measured no faster in bf16")
        else:
            precision, why = "fp32", f"{device.type} without native bf16"
    compile_on = test.compile == "on"
    return Plan(precision, compile_on, f"{why}; compile {'on' if compile_on else 'off'} (test.compile={test.compile})")


class InferenceNetwork:
    """A network prepared for inference (BN folded, channels-last, autocast, optionally compiled): call it on
    a batch, get the network's eval outputs with every tensor contiguous float32 (normal tensors, not
    inference tensors, so the decode may work on them in place)."""

    def __init__(self, network: nn.Module, probe: Tensor, plan: Plan) -> None:
        self.plan = plan
        self.device = probe.device
        folded, self.folded = fold_batch_norm(network, probe)
        folded = folded.to(memory_format=torch.channels_last)
        for parent in list(folded.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, DeformConv2d):  # in fp32, as torchvision's CPU kernel (no bf16 / fp16) would
                    sampled = SampledDeformConv(child)
                    sampled.register_forward_pre_hook(_float32_inputs)
                    setattr(parent, name, sampled)
        for p in folded.parameters():
            p.requires_grad_(False)
        self.network: Any = torch.compile(folded, dynamic=True) if plan.compile else folded

    def __call__(self, batch: Tensor) -> Any:
        batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        dtype = DTYPES[self.plan.precision]
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            try:
                outputs = self.network(batch)
            except Exception as e:
                if not self.plan.compile:
                    raise
                raise KpnetError("test.compile", f"torch.compile failed ({type(e).__name__}: {e}); set test.compile=off") from e
        return _to_float32(outputs)


class SampledDeformConv(nn.Module):
    """A DeformConv2d (DCNv1/v2; Dai et al. 2017, Zhu et al. 2019) computed as bilinear sampling then one matrix
    product: each kernel tap's deformed positions are sampled with `grid_sample` (zero outside the input, as
    torchvision's kernel), weighted by the modulation mask, and contracted with the weights. The same values up to
    float rounding, on PyTorch's threaded, vectorised ops (torchvision's CPU kernel measured slower,
    benchmarks/inference.py). Shapes it does not cover (groups, several offset groups, a side of 1) use the module."""

    def __init__(self, conv: DeformConv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        conv = self.conv
        (kh, kw), taps = conv.kernel_size, conv.kernel_size[0] * conv.kernel_size[1]
        n, c, h, w = x.shape
        ho, wo = offset.shape[-2:]
        if conv.groups != 1 or offset.shape[1] != 2 * taps or h < 2 or w < 2:
            return conv(x, offset, mask)
        (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
        iy = torch.arange(kh, device=x.device).repeat_interleave(kw) * dh  # tap t = i·kw + j
        ix = torch.arange(kw, device=x.device).repeat(kh) * dw
        base_y = (torch.arange(ho, device=x.device) * sh - ph)[None, :, None] + iy[:, None, None]  # (taps, ho, 1)
        base_x = (torch.arange(wo, device=x.device) * sw - pw)[None, None, :] + ix[:, None, None]  # (taps, 1, wo)
        off = offset.view(n, taps, 2, ho, wo).float()  # per tap (dy, dx), torchvision's layout
        ys = (base_y + off[:, :, 0]) * (2.0 / (h - 1)) - 1.0
        xs = (base_x + off[:, :, 1]) * (2.0 / (w - 1)) - 1.0
        grid = torch.stack([xs, ys], dim=-1).view(n, taps * ho, wo, 2).to(x.dtype)
        sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        sampled = sampled.view(n, c, taps, ho, wo)
        if mask is not None:
            sampled = sampled * mask.view(n, 1, taps, ho, wo).to(sampled.dtype)
        weight = conv.weight.reshape(conv.out_channels, c * taps).to(sampled.dtype)
        out = torch.matmul(weight, sampled.reshape(n, c * taps, ho * wo))
        if conv.bias is not None:
            out = out + conv.bias.to(out.dtype)[None, :, None]
        return out.view(n, conv.out_channels, ho, wo)


def _float32_inputs(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)


def _to_float32(value: Any) -> Any:
    """Network outputs as fresh contiguous float32 tensors (same nesting)."""
    if isinstance(value, Tensor):
        return value.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    if isinstance(value, dict):
        return {k: _to_float32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(v) for v in value)
    return value


_PREPARED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, InferenceNetwork]] = weakref.WeakKeyDictionary()


def inference_network(network: nn.Module, recipe: Recipe) -> InferenceNetwork:
    """The prepared copy of `network` (built from `recipe`) for its test settings, rebuilt when its weights, device or
    the settings changed."""
    test = recipe.test
    tensors = [*network.parameters(), *network.buffers()]
    device = tensors[0].device
    key = (device, test.precision, test.compile, recipe.model.backbone, tuple((t.data_ptr(), t._version) for t in tensors))
    cached = _PREPARED.get(network)
    if cached is not None and cached[0] == key:
        return cached[1]
    image = np.zeros((96, 96, 3), np.uint8)  # a small valid input for every backbone under the recipe's padding
    probe = torch.from_numpy(test_input(image, 1.0, test.pad, test.pad_add)[0])[None].to(device)
    prepared = InferenceNetwork(network, probe, plan(test, device, recipe.model.backbone))
    _PREPARED[network] = (key, prepared)
    return prepared
