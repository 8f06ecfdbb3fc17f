"""The onnxruntime side of `eval --onnx` and `viz --onnx`: an exported model (checked against its sidecar) run
on kpnet's own test input, with kpnet's host-side post-processing, so it is scored exactly like a checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kpnet.config import Recipe, TestConfig, resolved_input_size, with_num_classes
from kpnet.data.transforms import test_input
from kpnet.detectors.base import Detections, Detector, ScaleOutput
from kpnet.engine.inference import input_scale, postprocess_image, scale_output
from kpnet.errors import KpnetError
from kpnet.export.graph import EXTRA_HINT, FORMAT, sidecar_path


class OnnxModel:
    """An exported model in an onnxruntime CPU session, with its sidecar."""

    def __init__(self, path: Path) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise KpnetError("--onnx", f"needs the export extra (onnxruntime is missing): {EXTRA_HINT}") from None
        side = sidecar_path(path)
        if not path.is_file():
            raise KpnetError(path, "ONNX model not found")
        try:
            self.sidecar: dict[str, Any] = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise KpnetError(side, f"unreadable sidecar of {path.name} ({type(e).__name__}); re-run kpnet export") from None
        if not isinstance(self.sidecar, dict) or self.sidecar.get("format") != FORMAT:
            raise KpnetError(side, f"not a kpnet ONNX sidecar (format {FORMAT!r} expected)")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.sidecar.get("onnx_sha256"):
            raise KpnetError(path, f"sha256 differs from the one in {side.name}: the file is corrupted or was replaced")
        try:
            self.session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise KpnetError(path, f"onnxruntime cannot load it ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
        self.path = path
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.heads_only = self.sidecar["graph"] == "heads"

    def check_recipe(self, recipe: Recipe) -> None:
        """Exit 2 unless the recipe's family, classes and test settings are those the graph was exported with."""
        s, t = self.sidecar, recipe.test
        wanted = {"family": (s["family"], recipe.family), "model.num_classes": (s["num_classes"], recipe.model.num_classes),
                  "test.pad": (s["input"]["pad"]["pad"], t.pad), "test.pad_add": (s["input"]["pad"]["pad_add"], t.pad_add)}
        if "input_size" in s["input"]:  # sidecars before issue 18 ran every image at its original resolution
            wanted["test.input_size"] = (s["input"]["input_size"], resolved_input_size(t, recipe))
        for key, (exported, given) in wanted.items():
            if exported != given:
                raise KpnetError("--onnx", f"{self.path.name} was exported with {key}={exported!r}, the recipe has "
                                           f"{given!r}: re-export, or --set {key}={exported}")

    def check_decoding(self, test: TestConfig, decoding: Any) -> None:
        """Exit 2 unless the recipe's flip and decode settings (the detector's `decoding`, built from `test`) are
        those the graph was exported with (detections graphs)."""
        if self.heads_only:
            return
        wanted = {"test.flip": (self.sidecar["flip_in_graph"], test.flip)}
        given = dataclasses.asdict(decoding)
        wanted.update({f"test.{k}" if hasattr(test, k) else f"the decode setting {k}": (v, given.get(k))
                       for k, v in self.sidecar["decode"].items()})
        for key, (exported, now) in wanted.items():
            if exported != now:
                fix = f"--set {key}={exported}" if key.startswith("test.") else "the recipe's test settings it was exported with"
                raise KpnetError("--onnx", f"{self.path.name} was exported with {key}={exported!r}, the recipe gives "
                                           f"{now!r}: re-export, or use {fix}")

    def run(self, batch: np.ndarray) -> dict[str, Tensor]:
        """The graph's outputs by name for an (N, 3, H, W) input."""
        size, n = self.sidecar["input"]["size"], self.sidecar["input"]["batch"]
        if n != "dynamic" and batch.shape[0] != n:
            raise KpnetError("--onnx", f"{self.path.name} takes batches of {n}; kpnet feeds {batch.shape[0]} (export with "
                                       "--batch dynamic)")
        if size != "dynamic" and list(batch.shape[-2:]) != size:
            raise KpnetError("--onnx", f"{self.path.name} takes {size[0]}x{size[1]} inputs; this image pads to "
                                       f"{batch.shape[-2]}x{batch.shape[-1]} (export with --input-size dynamic)")
        outputs = self.session.run(None, {"images": np.ascontiguousarray(batch, np.float32)})
        return {name: torch.from_numpy(value) for name, value in zip(self.output_names, outputs)}

    def heads(self, batch: Tensor, meta: dict[str, float]) -> dict[str, Tensor]:
        """A head source for the test pipeline (heads-only graphs)."""
        return self.run(batch.numpy())

    def scale_output(self, detector: Detector, image: np.ndarray, scale: float,
                     full_hw: tuple[int, int] | None = None) -> ScaleOutput:
        """One scale of the test pipeline, in image pixels: decoded on the host (heads graphs) or in the graph."""
        test = detector.test
        if self.heads_only:
            return scale_output(self.heads, detector, image, test, scale, full_hw)
        full_hw = full_hw or image.shape[:2]
        inp, meta = test_input(image, scale * input_scale(detector, test, full_hw), test.pad, test.pad_add, full_hw)
        outputs = self.run(inp[None])
        return detector.export_scale_output({k: v[0] for k, v in outputs.items()}).to_image(meta, 1.0, 1.0)

    def detect(self, detector: Detector, image: np.ndarray, full_hw: tuple[int, int] | None = None) -> Detections:
        """Detections of one BGR image in image pixels: every scale, then kpnet's postprocess, NMS and top max_per_image."""
        per_scale = [self.scale_output(detector, image, scale, full_hw) for scale in detector.test.scales]
        return postprocess_image(detector, per_scale, detector.test)


def onnx_detector(recipe: Recipe, model: OnnxModel) -> Detector:
    """The recipe's Detector for host-side decoding, without a network (the graph replaces it)."""
    from kpnet.models import FAMILIES

    recipe = with_num_classes(recipe, model.sidecar["num_classes"])
    if recipe.test.input_size == "auto" and "input_size" in model.sidecar["input"]:
        recipe = dataclasses.replace(recipe, test=dataclasses.replace(recipe.test, input_size=model.sidecar["input"]["input_size"]))
    model.check_recipe(recipe)
    detector = FAMILIES[recipe.family](recipe, network=torch.nn.Module())
    model.check_decoding(recipe.test, detector.decoding)
    detector.class_names = model.sidecar["class_names"]
    detector.cat_ids = model.sidecar["category_ids"]
    return detector


def load_onnx(path: Path, recipe: Recipe) -> tuple[OnnxModel, Detector]:
    """An exported model and the recipe's Detector that pre- and post-processes for it."""
    model = OnnxModel(path)
    return model, onnx_detector(recipe, model)
