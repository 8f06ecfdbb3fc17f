"""The exported graph (`kpnet export`): a detector's network with its test flip and its `export_decode`, traced
by torch's dynamo ONNX exporter (opset >= 19: torchvision's deformable convolution exports there), checked by
`onnx.checker`, and written atomically with its sidecar JSON (everything needed to feed and read the model).

Input: (N, 3, H, W) float32, the padded and normalised BGR image (`kpnet.data.transforms.test_input`).
Outputs: the family's `export_outputs` (detections, the default) or its raw `heads` (`heads_only`).
Soft-NMS and the top `max_per_image` stay on the host (kpnet's `postprocess_image`), as does multi-scale resizing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kpnet import __version__
from kpnet.config import resolved_input_size
from kpnet.data.transforms import MEAN_BGR, STD_BGR
from kpnet.detectors.base import Detector
from kpnet.errors import KpnetError
from kpnet.io import atomic_write_bytes, atomic_write_json

FORMAT = "kpnet-onnx-1"
MIN_OPSET = 19  # torchvision's deform_conv2d exports from opset 19 (dynamo exporter)
DEFAULT_OPSET = 19
EXTRA_HINT = "pip install 'kpnet[export]'"

OUTPUT_MEANING = {
    "boxes": "(N, D, 4) x1, y1, x2, y2 in input pixels",
    "scores": "(N, D) score; -1 marks a rejected or padding row",
    "classes": "(N, D) contiguous class index (class_names[c], category_ids[c])",
    "corner_scores": "(N, D, 2) s_tl, s_br of each box (the multi-scale merge weights)",
    "pair_scores": "(N, D) corner-pair score before the central-region check",
    "centres": "(N, M, 2) centre keypoints x, y in input pixels (the image's, then its flipped copy's)",
    "centre_scores": "(N, M) centre keypoint score",
    "centre_classes": "(N, M) centre keypoint class",
}


def require_export_extra() -> None:
    """Exit 2 with the install hint unless onnx, onnxscript and onnxruntime import."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            raise KpnetError("kpnet export", f"needs the export extra ({module} is missing): {EXTRA_HINT}") from None


class ExportGraph(nn.Module):
    """Images -> the detector's export outputs (its flip inside the graph), or its raw heads with `heads_only`."""

    def __init__(self, detector: Detector, heads_only: bool, flip: bool) -> None:
        super().__init__()
        self.network = detector.network
        self.detector = detector
        self.heads_only = heads_only
        self.flip = flip and not heads_only

    def output_names(self) -> tuple[str, ...]:
        return self.detector.heads if self.heads_only else self.detector.export_outputs

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        batch = torch.cat([images, images.flip(-1)]) if self.flip else images
        heads = self.network(batch)[-1]
        if self.heads_only:
            return tuple(heads[name] for name in self.detector.heads)
        out_h, out_w = heads[self.detector.heads[0]].shape[-2:]
        down = (images.shape[-1] / out_w, images.shape[-2] / out_h)
        outputs = self.detector.export_decode(heads, self.flip, down)
        return tuple(outputs[name] for name in self.detector.export_outputs)


def padded_side(side: int, pad: int, pad_add: int) -> int:
    """The test pad rule of `test_input`: (side | pad) + pad_add."""
    return (side | pad) + pad_add


def padded_dim(name: str, pad: int, pad_add: int) -> Any:
    """A dynamic side that follows the pad rule: (pad + 1)·k − 1 + pad_add for pad = 2^m − 1 (so the exporter can
    reason about the strided sizes, which DLA-34 needs), else any size."""
    if (pad + 1) & pad:
        return torch.export.Dim.DYNAMIC
    return (pad + 1) * torch.export.Dim(f"{name}_blocks", min=1, max=4096) + (pad_add - 1)


def check_out(out: Path) -> None:
    """Exit 2 before exporting when `out` (and its sidecar) cannot be written."""
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if out.is_dir():
        raise KpnetError("--out", f"{out} is a folder; name the .onnx file to write")
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise KpnetError("--out", f"cannot write {out}: {folder} is not a writable folder")


def export_onnx(
    detector: Detector, out: Path, opset: int = DEFAULT_OPSET, heads_only: bool = False,
    batch: int | None = None, input_hw: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Export `detector` to `out` (ONNX) and `out`.json (the sidecar); None batch / input_hw mean dynamic. Returns the sidecar."""
    require_export_extra()
    import onnx

    if opset < MIN_OPSET:
        raise KpnetError("--opset", f"must be >= {MIN_OPSET} (deformable convolution and the dynamo exporter), got {opset}")
    if not heads_only and not detector.export_outputs:
        raise KpnetError("--heads-only", f"{detector.recipe.family} has no export decode yet; export its raw heads with --heads-only")
    check_out(out)
    t = detector.test
    graph = ExportGraph(detector.eval(), heads_only, t.flip)
    side = padded_side(detector.recipe.train.input_size, t.pad, t.pad_add)
    example = torch.zeros(batch or 2, 3, *(input_hw or (side, side)))  # 2: a dynamic dimension must not trace as 1
    dynamic: dict[int, Any] = {0: torch.export.Dim.DYNAMIC} if batch is None else {}
    if input_hw is None:
        dynamic.update({2: padded_dim("height", t.pad, t.pad_add), 3: padded_dim("width", t.pad, t.pad_add)})
    names = graph.output_names()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, (example,), dynamo=True, opset_version=opset, input_names=["images"],
                                     output_names=list(names), dynamic_shapes=({**dynamic},), verbose=False)
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    with torch.no_grad():
        heads = detector.network(example[:1])[-1]
    stride = example.shape[-1] / heads[detector.heads[0]].shape[-1]
    sidecar = make_sidecar(detector, graph, opset, batch, input_hw, stride, hashlib.sha256(data).hexdigest())
    atomic_write_bytes(out, data)
    try:
        atomic_write_json(sidecar_path(out), sidecar, indent=2)
    except OSError:
        out.unlink(missing_ok=True)
        raise
    return sidecar


def sidecar_path(onnx_path: Path) -> Path:
    """The sidecar of model.onnx: model.json beside it."""
    return onnx_path.with_suffix(".json")


def make_sidecar(detector: Detector, graph: ExportGraph, opset: int, batch: int | None,
                 input_hw: tuple[int, int] | None, stride: float, sha256: str) -> dict[str, Any]:
    """What a user needs to feed and read the model, and what `eval --onnx` checks against its recipe."""
    r, t = detector.recipe, detector.test
    n = r.model.num_classes
    return {
        "format": FORMAT,
        "family": r.family,
        "recipe": r.name,
        "num_classes": n,
        "class_names": detector.class_names or [f"class {c}" for c in range(n)],
        "category_ids": detector.cat_ids or list(range(1, n + 1)),
        "graph": "heads" if graph.heads_only else "detections",
        "input": {
            "name": "images", "layout": "NCHW float32", "batch": batch or "dynamic",
            "size": list(input_hw) if input_hw else "dynamic", "channels": "BGR",
            "normalise": "x = (pixel / 255 - mean) / std", "mean": MEAN_BGR.tolist(), "std": STD_BGR.tolist(),
            "input_size": resolved_input_size(t, r),
            "resize": "the image's longer side to input_size (null: the original resolution), times each host_side "
                      "scale, before padding",
            "pad": {"pad": t.pad, "pad_add": t.pad_add,
                    "rule": "canvas (h | pad) + pad_add by (w | pad) + pad_add, zeros, the image centred at "
                            "(canvas // 2 - size // 2), padded before normalising"},
        },
        "output_stride": stride,
        "outputs": [{"name": name, "meaning": {**OUTPUT_MEANING, **detector.export_meanings}.get(
                        name, "raw head (logits for heatmaps)")} for name in graph.output_names()],
        "instance_masks": ("not exported: the mask head runs on the host after soft-NMS, which is outside the graph; "
                           "eval --onnx scores boxes") if detector.has_masks else None,
        "flip_in_graph": graph.flip,
        "decode": dataclasses.asdict(detector.decoding),
        "host_side": {"nms": t.nms, "nms_sigma": t.nms_sigma, "nms_threshold": t.nms_threshold,
                      "nms_merge": t.nms_merge, "weight_exp": t.weight_exp, "max_per_image": t.max_per_image,
                      "scales": list(t.scales),
                      "note": "per-class soft-NMS and the top max_per_image are not in the graph; kpnet runs them "
                              "on the host (eval --onnx)"},
        "opset": opset,
        "kpnet_version": __version__,
        "torch_version": torch.__version__,
        "onnx_sha256": sha256,
    }
