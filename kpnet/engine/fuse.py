"""Batch-norm folding for inference: a copy of a network in which every BatchNorm2d that only ever reads a
convolution's output is folded into that convolution's weight and bias (w' = w·γ/σ, b' = (b − μ)·γ/σ + β,
σ = √(var + ε)) and replaced by the identity. The training network and its checkpoint are never touched.

Which batch norm reads which convolution is found from one probe forward, not from the module layout:
forward hooks record each convolution's output tensor and each batch norm's input tensor, and the autograd
graph of the probe says how many operations read each convolution's output. A pair is folded only when the
batch norm's input *is* the convolution's output, each module ran once, and nothing else reads that output
(a residual that adds the raw convolution output, a head that returns it, an output read twice all keep
the batch norm), so folding changes no value beyond float rounding.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torchvision.ops import DeformConv2d

CONVOLUTIONS = (nn.Conv2d, nn.ConvTranspose2d, DeformConv2d)


def fold_batch_norm(network: nn.Module, probe: Tensor) -> tuple[nn.Module, int]:
    """A folded eval-mode copy of `network` and the number of batch norms folded; `probe` is one valid input."""
    folded = copy.deepcopy(network).eval()
    pairs = _conv_bn_pairs(folded, probe)
    parents = {id(m): [] for _, m in pairs}
    for parent in folded.modules():
        for name, child in parent.named_children():
            if id(child) in parents:
                parents[id(child)].append((parent, name))
    with torch.no_grad():
        for conv, bn in pairs:
            _fold_into(conv, bn)
            for parent, name in parents[id(bn)]:
                setattr(parent, name, nn.Identity())
    return folded, len(pairs)


def _conv_bn_pairs(network: nn.Module, probe: Tensor) -> list[tuple[nn.Module, nn.BatchNorm2d]]:
    """(convolution, batch norm) pairs whose batch norm is the only reader of the convolution's output (one probe run)."""
    conv_out: dict[int, list[Tensor]] = {}
    bn_in: dict[int, list[Tensor]] = {}
    modules = {id(m): m for m in network.modules()}

    def on_conv(module: nn.Module, args: tuple, output: Tensor) -> None:
        conv_out.setdefault(id(module), []).append(output)

    def on_bn(module: nn.Module, args: tuple) -> None:
        bn_in.setdefault(id(module), []).append(args[0])

    hooks = [m.register_forward_hook(on_conv) for m in network.modules() if isinstance(m, CONVOLUTIONS)]
    hooks += [m.register_forward_pre_hook(on_bn) for m in network.modules() if _foldable(m)]
    try:
        with torch.enable_grad():
            outputs = list(_tensors(network(probe.detach().clone().requires_grad_(True))))
    finally:
        for h in hooks:
            h.remove()
    readers = _reader_counts(outputs)
    returned = {id(t) for t in outputs}
    by_output = {id(outs[0]): conv_id for conv_id, outs in conv_out.items() if len(outs) == 1}
    pairs = []
    for bn_id, inputs in bn_in.items():
        conv_id = by_output.get(id(inputs[0])) if len(inputs) == 1 else None
        if conv_id is None:
            continue
        out = conv_out[conv_id][0]
        if out.grad_fn is not None and readers.get(out.grad_fn, 0) == 1 and id(out) not in returned:
            pairs.append((modules[conv_id], modules[bn_id]))
    return pairs


def _foldable(module: nn.Module) -> bool:
    """A batch norm that normalises with running statistics in eval mode (the only kind that folds)."""
    return type(module) is nn.BatchNorm2d and module.track_running_stats and module.running_var is not None


def _tensors(value: object) -> Iterator[Tensor]:
    """Every tensor in a network's output (tensors, dicts, lists, tuples, nested)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _reader_counts(outputs: list[Tensor]) -> dict[object, int]:
    """How many autograd edges point at each node of the graph behind `outputs` (a node's number of readers)."""
    counts: dict[object, int] = {}
    seen: set[object] = set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None:
                counts[child] = counts.get(child, 0) + 1
                stack.append(child)
    return counts


def _fold_into(conv: nn.Module, bn: nn.BatchNorm2d) -> None:
    """w' = w·γ/σ per output channel, b' = (b − μ)·γ/σ + β (in place on the copy's convolution)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else torch.rsqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(scale)
    weight = conv.weight
    if isinstance(conv, nn.ConvTranspose2d):  # (in, out / groups, kh, kw): output channels on dim 1, per group
        g = conv.groups
        w = weight.view(g, weight.shape[0] // g, weight.shape[1], *weight.shape[2:])
        w.mul_(scale.view(g, 1, -1, 1, 1).to(weight.dtype))
    else:
        weight.mul_(scale.view(-1, 1, 1, 1).to(weight.dtype))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = ((bias - bn.running_mean) * scale + shift).to(weight.dtype)
    if conv.bias is not None:
        conv.bias.copy_(new_bias)
    else:
        conv.bias = nn.Parameter(new_bias, requires_grad=False)
