"""`kpnet predict`: detections for unlabelled images as a COCO results file, streamed, with the decode of `eval`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from kpnet.cli.common import DebugOpt, DeviceOpt, JsonOpt, Output, SetOpt, check_device, run
from kpnet.errors import KpnetError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".pgm", ".ppm", ".pnm"})
HELP = (
    "Detect objects in unlabelled images and write them as COCO results (with each image's file_name).\n\n"
    "kpnet predict RECIPE --checkpoint CKPT IMAGE_OR_DIR... or kpnet predict CKPT IMAGE_OR_DIR... (the checkpoint's "
    "own recipe). Folders give their image files (sorted by name). The decode is `kpnet eval`'s (test.input_size, "
    "scales, flip, NMS, max_per_image), so with --score-thresh 0 and --ids-from the data set's COCO file, "
    "`kpnet eval --gt ANN --dets OUT` scores exactly what `kpnet eval RECIPE --checkpoint CKPT` scores. Image ids are "
    "1..N in input order unless --ids-from names a COCO file whose images give them by file name."
)


def image_files(inputs: list[Path]) -> list[Path]:
    """The image files named, folders expanded to their image files sorted by name; exit 2 on a missing input."""
    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise KpnetError(p, f"no image files in this folder ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise KpnetError(p, "no such image file or folder")
    return files


def image_ids(files: list[Path], ann: Path | None) -> list[int]:
    """Each file's image id: 1..N in order, or the id of the image with the same file name in `ann`."""
    if ann is None:
        return list(range(1, len(files) + 1))
    from kpnet.data.validate import load_gt

    by_name = {Path(img["file_name"]).name: img["id"] for img in load_gt(ann).dataset["images"]}
    missing = next((f for f in files if f.name not in by_name), None)
    if missing is not None:
        raise KpnetError(ann, f"has no image with the file name {missing.name!r} (--ids-from gives each input's id)")
    return [by_name[f.name] for f in files]


def predict_command(
    model: Annotated[Path, typer.Argument(metavar="RECIPE|CKPT", help="A recipe (with --checkpoint) or a checkpoint.")],
    inputs: Annotated[list[Path], typer.Argument(metavar="IMAGE_OR_DIR...", help="Images, or folders of images.")],
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="With a RECIPE: the checkpoint to run.")] = None,
    overrides: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", help="The COCO results JSON to write.")] = Path("predictions.json"),
    score_thresh: Annotated[float, typer.Option(
        "--score-thresh", help="Keep detections scoring at least this (0 keeps all, as eval scores them).")] = 0.0,
    ids_from: Annotated[Path | None, typer.Option(
        "--ids-from", help="A COCO file whose images give each input's image_id by file name.")] = None,
    viz: Annotated[Path | None, typer.Option("--viz", help="Also draw each image's detections into this folder.")] = None,
    viz_thresh: Annotated[float, typer.Option("--viz-thresh", help="With --viz: draw detections scoring at least this.")] = 0.3,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Detections for unlabelled images as COCO results (image_id, file_name, category_id, bbox, score)."""

    def body(o: Output) -> dict[str, Any]:
        from rich.progress import Progress

        from kpnet.api import load_checkpoint
        from kpnet.config import load_recipe, resolved_input_size, with_overrides
        from kpnet.data.images import header_sizes
        from kpnet.engine.checkpoint import checkpoint_recipe, read_checkpoint
        from kpnet.engine.inference import predict_files, to_coco_results, warn_scale
        from kpnet.io import atomic_write

        check_device(device)
        for name, value in (("--score-thresh", score_thresh), ("--viz-thresh", viz_thresh)):
            if not 0.0 <= value <= 1.0:
                raise KpnetError(name, f"must lie in [0, 1], got {value}")
        if model.suffix in (".yaml", ".yml"):
            if checkpoint is None:
                raise KpnetError(model, "a recipe needs --checkpoint CKPT (or give the checkpoint alone)")
            ckpt, recipe = checkpoint, load_recipe(model, list(overrides or []))
        else:
            if checkpoint is not None:
                raise KpnetError("--checkpoint", f"{model} is already the checkpoint; give RECIPE --checkpoint CKPT or CKPT")
            ckpt = model
            recipe = with_overrides(checkpoint_recipe(read_checkpoint(ckpt), ckpt), list(overrides or [])) if overrides else None
        files = image_files(inputs)
        ids = image_ids(files, ids_from)
        detector = load_checkpoint(ckpt, recipe=recipe, device=device)
        n = detector.recipe.model.num_classes
        cat_ids = detector.cat_ids or list(range(1, n + 1))
        names = detector.class_names or [f"class {c}" for c in range(n)]
        warn_scale(detector, header_sizes(files))
        counts = {"images": len(files), "detections": 0}
        drawn: list[str] = []

        def write(tmp: Path) -> None:
            with open(tmp, "w", encoding="utf-8") as f, Progress(console=o.err, transient=True) as bar:
                task = bar.add_task("predict", total=len(files))
                f.write("[")
                for item, dets in predict_files(detector, files, detector.recipe.data.num_workers):
                    dets = dets.select(dets.scores >= score_thresh)
                    path = files[item["index"]]
                    entries = to_coco_results(dets, ids[item["index"]], cat_ids, detector.test.round_decimals,
                                              item["full_hw"], detector.test.mask_threshold)
                    for entry in entries:
                        f.write(("," if counts["detections"] else "") + "\n" + json.dumps({**entry, "file_name": path.name}))
                        counts["detections"] += 1
                    if viz is not None:
                        drawn.append(_draw(viz, path, item, dets.select(dets.scores >= viz_thresh), names))
                    bar.advance(task)
                f.write("\n]\n")

        atomic_write(out, write)
        o.print(f"{counts['detections']} detections in {counts['images']} images -> {out}", markup=False, soft_wrap=True)
        if drawn:
            o.print(f"drawings: {viz}/ ({len(drawn)} PNGs)", markup=False, soft_wrap=True)
        return {"checkpoint": str(ckpt), "out": str(out), **counts, "score_thresh": score_thresh,
                "input_size": resolved_input_size(detector.test, detector.recipe), "files": drawn}

    run(json_out, debug, body)


def _draw(folder: Path, path: Path, item: dict[str, Any], dets: Any, names: list[str]) -> str:
    """The detections drawn over the decoded image (full-image boxes scaled to it) as <stem>_det.png."""
    from kpnet import viz
    from kpnet.io import atomic_imwrite

    image = item["image"]
    full_h, full_w = item["full_hw"]
    ratio = dets.boxes.new_tensor([image.shape[1] / full_w, image.shape[0] / full_h] * 2)
    return str(atomic_imwrite(folder / f"{path.stem}_det.png",
                              viz.draw_detections(image, dets.replace(boxes=dets.boxes * ratio), names)))


def register(app: typer.Typer) -> None:
    app.command("predict", help=HELP)(predict_command)
