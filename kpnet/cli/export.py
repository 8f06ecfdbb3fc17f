"""`kpnet export`: a checkpoint to ONNX (detections or raw heads) with its sidecar JSON, for onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kpnet.cli.common import DebugOpt, JsonOpt, Output, SetOpt, run
from kpnet.errors import KpnetError


def parse_batch(text: str) -> int | None:
    """--batch N or dynamic -> N, or None for dynamic."""
    if text == "dynamic":
        return None
    if not text.isdigit() or int(text) < 1:
        raise KpnetError("--batch", f"expected a positive integer or 'dynamic', got {text!r}")
    return int(text)


def parse_input_size(text: str) -> tuple[int, int] | None:
    """--input-size H,W or dynamic -> (H, W), or None for dynamic."""
    if text == "dynamic":
        return None
    parts = text.replace(" ", "").split(",")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise KpnetError("--input-size", f"expected H,W (positive integers) or 'dynamic', got {text!r}")
    return int(parts[0]), int(parts[1])


def export_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML of the checkpoint's model.")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint to export.")],
    out: Annotated[Path, typer.Option("--out", help="The .onnx file to write (its sidecar .json goes beside it).")],
    overrides: SetOpt = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (>= 19).")] = 19,
    heads_only: Annotated[bool, typer.Option("--heads-only", help="End the graph in the raw heads, not detections.")] = False,
    batch: Annotated[str, typer.Option("--batch", help="Batch size N, or dynamic.")] = "dynamic",
    input_size: Annotated[str, typer.Option("--input-size", help="Padded input H,W, or dynamic.")] = "dynamic",
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Export a checkpoint to ONNX: padded, normalised images in; detections (or raw heads) out; sidecar JSON beside it."""

    def body(o: Output) -> dict[str, Any]:
        from kpnet.export.graph import check_out, require_export_extra, sidecar_path

        n, hw = parse_batch(batch), parse_input_size(input_size)
        if out.suffix != ".onnx":
            raise KpnetError("--out", f"name the file to write with the .onnx suffix, got {out}")
        require_export_extra()
        check_out(out)
        from kpnet.api import load_checkpoint
        from kpnet.config import load_recipe
        from kpnet.export.graph import export_onnx

        detector = load_checkpoint(checkpoint, recipe=load_recipe(recipe, list(overrides or [])))
        o.err.print(f"exporting {detector.recipe.family} ({detector.recipe.model.backbone}) ...", markup=False)
        if detector.has_masks:
            o.err.print("note: the instance-mask head is not exported (it runs after soft-NMS, outside the graph); "
                        "the exported model gives boxes", markup=False, soft_wrap=True)
        sidecar = export_onnx(detector, out, opset, heads_only, n, hw)
        o.print(f"wrote {out} ({sidecar['graph']}, opset {opset}) and {sidecar_path(out)}", markup=False, soft_wrap=True)
        return {"onnx": str(out), "sidecar": str(sidecar_path(out)), **sidecar}

    run(json_out, debug, body)


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
