"""`kpnet visualize` (alias `viz`): detections, ground truth and heat heads drawn over images as PNGs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from kpnet.cli.common import DebugOpt, DeviceOpt, JsonOpt, Output, SetOpt, check_device, run
from kpnet.errors import KpnetError

HELP = (
    "Draw detections, ground truth and heatmaps over images as PNGs (alias: viz).\n\n"
    "kpnet viz IMAGE... [--checkpoint CKPT] draws detections (class name and score, score >= --score-thresh) "
    "into <stem>_det.png; --gt ANN adds the ground truth of images with the same file name in green; "
    "--heatmaps writes each heat head (sigmoid, max over classes) blended over the image into "
    "<stem>_heat_<head>.png. Without --checkpoint the newest runs/**/last.pt is used.\n\n"
    "kpnet viz --ann ANN --images DIR [--ids 1,2] browses a data set's ground truth into <stem>_gt.png "
    "(all images unless --ids); with --checkpoint it draws detections too."
)


@dataclass
class Item:
    """One image to draw: its file, and its ground truth when known (None: not in the annotation file)."""

    path: Path
    image_id: int | None
    gt_boxes: np.ndarray | None
    gt_labels: list[str]
    gt_keypoints: np.ndarray | None = None  # (N, J, 3) COCO keypoints when the annotations have them


def newest_checkpoint(runs: Path = Path("runs")) -> Path:
    """The most recently written runs/**/last.pt, or exit 2 explaining how to name one."""
    found = sorted(runs.glob("**/last.pt"), key=lambda p: p.stat().st_mtime) if runs.is_dir() else []
    if not found:
        raise KpnetError("--checkpoint", f"no checkpoint given and no {runs}/**/last.pt found; pass --checkpoint CKPT "
                                         "(e.g. runs/quickstart/last.pt, written by `kpnet train RECIPE`)")
    return found[-1]


def _gt_of(coco: Any, image_id: int) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    anns = [a for a in coco.imgToAnns.get(image_id, []) if a["bbox"][2] > 0 and a["bbox"][3] > 0]
    xywh = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    labels = [coco.cats[a["category_id"]]["name"] + (" (crowd)" if a.get("iscrowd") else "") for a in anns]
    keypoints = None
    if anns and all(a.get("keypoints") for a in anns) and len({len(a["keypoints"]) for a in anns}) == 1:
        keypoints = np.array([a["keypoints"] for a in anns], np.float64).reshape(len(anns), -1, 3)
    return boxes, labels, keypoints


def _parse_ids(texts: list[str], known: set[int]) -> list[int]:
    ids: list[int] = []
    for text in texts:
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            try:
                value = int(part)
            except ValueError:
                raise KpnetError("--ids", f"expected integer image ids like 139,285, got {part!r}") from None
            if value not in known:
                raise KpnetError("--ids", f"image id {value} is not in the annotation file")
            ids.append(value)
    return ids


def _browse_items(ann: Path, image_dir: Path, ids: list[str] | None) -> list[Item]:
    from kpnet.data.dataset import load_index

    index = load_index(ann, image_dir)
    chosen = _parse_ids(ids, set(index.image_ids)) if ids else index.image_ids
    return [Item(index.image_path(i), i, *_gt_of(index.coco, i)) for i in chosen]


def _image_items(o: Output, images: list[Path], gt: Path | None) -> list[Item]:
    missing = next((p for p in images if not p.is_file()), None)
    if missing is not None:
        raise KpnetError(missing, "image file not found")
    if gt is None:
        return [Item(p, None, None, []) for p in images]
    from kpnet.data.validate import load_gt

    coco = load_gt(gt)
    by_name = {Path(img["file_name"]).name: img["id"] for img in coco.dataset["images"]}
    items = []
    for p in images:
        image_id = by_name.get(p.name)
        if image_id is None:
            o.err.print(f"note: {p.name} is not in {gt}; drawn without ground truth", markup=False)
            items.append(Item(p, None, None, []))
        else:
            items.append(Item(p, image_id, *_gt_of(coco, image_id)))
    return items


def _count(n: int, noun: str, plural: str) -> str:
    return f"{n} {noun}{'' if n == 1 else plural}"


def _check_usage(images: list[Path], browse: bool, image_dir: Path | None, ids: list[str] | None, gt: Path | None,
                 has_recipe: bool, overrides: list[str] | None, score_thresh: float, device: str) -> None:
    check_device(device)
    if browse and images:
        raise KpnetError("--ann", "browses a data set: give --ann ANN --images DIR without IMAGE arguments")
    if browse and image_dir is None:
        raise KpnetError("--ann", "give the data set's image folder with --images DIR")
    if not browse and (image_dir is not None or ids):
        raise KpnetError("--images/--ids", "only with --ann ANN (browsing a data set)")
    if browse and gt is not None:
        raise KpnetError("--gt", "--ann already draws the data set's ground truth; drop --gt")
    if not browse and not images:
        raise KpnetError("visualize", "give IMAGE... to draw detections, or --ann ANN --images DIR to browse ground truth")
    if overrides and not has_recipe:
        raise KpnetError("--set", "overrides a recipe: give --recipe RECIPE too (else the checkpoint's own is used)")
    if not 0.0 <= score_thresh <= 1.0:
        raise KpnetError("--score-thresh", f"must lie in [0, 1], got {score_thresh}")


def _draw_item(it: Item, out: Path, detector: Any, names: list[str], score_thresh: float,
               heat_heads: tuple[str, ...], regions: bool = False, onnx_model: Any = None, masks: bool = False
               ) -> dict[str, Any]:
    """Draw one input's PNGs (ground truth, detections, heat heads) and describe them for --json."""
    from kpnet import viz
    from kpnet.data.images import read_image
    from kpnet.io import atomic_imwrite

    image = read_image(it.path)
    entry: dict[str, Any] = {"image": str(it.path), "image_id": it.image_id,
                             "size": [int(image.shape[1]), int(image.shape[0])],
                             "gt": None if it.gt_boxes is None else len(it.gt_labels), "files": []}
    drawn = image if it.gt_boxes is None else viz.draw_ground_truth(image, it.gt_boxes, it.gt_labels, it.gt_keypoints)
    if detector is None:
        entry["files"].append(str(atomic_imwrite(out / f"{it.path.stem}_gt.png", drawn)))
        return entry
    if onnx_model is None:
        inference = viz.infer(detector, image)
    else:  # an exported model in onnxruntime: detections only (no heads to draw)
        inference = viz.Inference(onnx_model.detect(detector, image), {}, {}, 1.0)
    dets = inference.dets.select(inference.dets.scores >= score_thresh)
    entry["detections"] = [{"bbox": [round(v, 2) for v in box], "score": round(score, 4), "class": cls, "name": names[cls]}
                           for box, score, cls in zip(dets.boxes.tolist(), dets.scores.tolist(), dets.classes.tolist())]
    if dets.keypoints is not None:  # a pose family: each joint's x, y and confidence
        for d, joints in zip(entry["detections"], dets.keypoints.tolist()):
            d["keypoints"] = [[round(x, 2), round(y, 2), round(c, 4)] for x, y, c in joints]
    entry["files"].append(str(atomic_imwrite(out / f"{it.path.stem}_det.png", viz.draw_detections(drawn, dets, names))))
    for head, overlay in viz.heat_overlays(image, inference, heat_heads).items():
        entry["files"].append(str(atomic_imwrite(out / f"{it.path.stem}_heat_{head}.png", overlay)))
    if regions:
        boxes, points = detector.central_regions(dets)
        drawn_regions = viz.draw_regions(image, boxes.numpy(), points.numpy(), dets.classes.tolist())
        entry["files"].append(str(atomic_imwrite(out / f"{it.path.stem}_regions.png", drawn_regions)))
    if masks:
        from kpnet.masks import paste_masks

        pasted = paste_masks(dets.masks, dets.boxes, image.shape[0], image.shape[1], detector.test.mask_threshold)
        drawn_masks = viz.draw_detections(viz.draw_masks(image, pasted, dets.classes.tolist()), dets, names)
        entry["files"].append(str(atomic_imwrite(out / f"{it.path.stem}_masks.png", drawn_masks)))
    return entry


def visualize_command(
    images: Annotated[list[Path] | None, typer.Argument(metavar="IMAGE...", help="Images to draw on.", show_default=False)] = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", help="Recipe YAML (default: the checkpoint's own).")] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint", help="Checkpoint (default: the newest runs/**/last.pt).")] = None,
    onnx: Annotated[Path | None, typer.Option(
        "--onnx", help="Draw with an exported model (kpnet export) in onnxruntime; needs --recipe.")] = None,
    overrides: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for the PNGs.")] = Path("viz"),
    score_thresh: Annotated[float, typer.Option("--score-thresh", help="Draw detections scoring at least this.")] = 0.3,
    heatmaps: Annotated[bool, typer.Option("--heatmaps", help="Also write each heat head blended over the image.")] = False,
    regions: Annotated[bool, typer.Option(
        "--regions", help="Triplet and CentripetalNet models: draw each box's central region and the centre(s) that "
                          "validated it.")] = False,
    masks: Annotated[bool, typer.Option(
        "--masks", help="Models with the instance-mask head (model.mask): also write the masks over the image.")] = False,
    gt: Annotated[Path | None, typer.Option("--gt", help="COCO annotations: overlay the ground truth by file name.")] = None,
    ann: Annotated[Path | None, typer.Option("--ann", help="Browse a data set: its COCO annotation file.")] = None,
    image_dir: Annotated[Path | None, typer.Option("--images", help="With --ann: the folder of its images.")] = None,
    ids: Annotated[list[str] | None, typer.Option("--ids", help="With --ann: image ids to draw, e.g. 139,285.")] = None,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Draw detections, ground truth and heatmaps over images (PNG per input)."""

    def body(o: Output) -> dict[str, Any]:
        from kpnet import viz

        browse = ann is not None
        _check_usage(list(images or []), browse, image_dir, ids, gt, recipe is not None, overrides, score_thresh, device)
        items = _browse_items(ann, image_dir, ids) if browse else _image_items(o, list(images or []), gt)
        stems = [it.path.stem for it in items]
        if len(set(stems)) != len(stems):
            dup = next(s for s in stems if stems.count(s) > 1)
            raise KpnetError("--out", f"two inputs share the name {dup!r}, so their PNGs would collide; draw them separately")
        use_model = not browse or checkpoint is not None or recipe is not None or onnx is not None
        if heatmaps and not use_model:
            raise KpnetError("--heatmaps", "needs a model: add --checkpoint CKPT")
        if masks and not use_model:
            raise KpnetError("--masks", "needs a model: add --checkpoint CKPT")
        if onnx is not None and (checkpoint is not None or recipe is None or heatmaps):
            raise KpnetError("--onnx", "give --recipe RECIPE with --onnx MODEL, without --checkpoint or --heatmaps")

        doc: dict[str, Any] = {"checkpoint": None, "recipe": None, "class_names_from": None, "score_thresh": score_thresh,
                               "out": str(out), "images": [], "files": []}
        detector, names, heat_heads, onnx_model = None, [], (), None
        if onnx is not None:
            from kpnet.config import load_recipe
            from kpnet.export.runtime import load_onnx

            onnx_model, detector = load_onnx(onnx, load_recipe(recipe, list(overrides or [])))
            if regions and not detector.has_central_regions:
                raise KpnetError("--regions", f"{detector.recipe.family!r} models have no central regions")
            if masks:
                raise KpnetError("--masks", "an exported model returns no masks; draw them with --checkpoint")
            names = list(detector.class_names)
            doc.update({"onnx": str(onnx), "recipe": str(recipe), "class_names_from": f"{onnx.with_suffix('.json')}"})
        elif use_model:
            from kpnet.api import load_checkpoint
            from kpnet.config import load_recipe

            ckpt = checkpoint
            if ckpt is None:
                ckpt = newest_checkpoint()
                o.err.print(f"using the newest checkpoint: {ckpt}", markup=False)
            r = load_recipe(recipe, list(overrides or [])) if recipe is not None else None
            detector = load_checkpoint(ckpt, recipe=r, device=device)
            family = detector.recipe.family
            heat_heads = detector.heat_heads if heatmaps else ()
            if regions and not detector.has_central_regions:
                raise KpnetError("--regions", f"{family!r} models have no central regions "
                                              "(centernet_triplet and centripetalnet models do)")
            if masks and not detector.has_masks:
                raise KpnetError("--masks", f"{ckpt} has no instance-mask head (train a recipe with model.mask: true, "
                                            "e.g. recipes/centripetalnet_small_shapes_mask.yaml)")
            names, source, why = viz.class_names_for(detector.recipe)
            if detector.class_names and len(detector.class_names) == detector.recipe.model.num_classes:
                names, source = list(detector.class_names), f"{ckpt} (training set)"
            if source is None:
                o.err.print(f"note: {why}; classes are labelled by index", markup=False, soft_wrap=True)
            doc.update({"checkpoint": str(ckpt), "recipe": None if recipe is None else str(recipe), "class_names_from": source})

        if detector is not None:
            from kpnet.data.images import header_sizes
            from kpnet.engine.inference import warn_scale

            warn_scale(detector, header_sizes([it.path for it in items]))
        for it in items:
            entry = _draw_item(it, out, detector, names, score_thresh, heat_heads, regions, onnx_model, masks)
            counts = [_count(len(entry["detections"]), "detection", "s") if "detections" in entry else "",
                      _count(entry["gt"], "ground-truth box", "es") if entry["gt"] is not None else ""]
            o.print(f"{it.path}: {', '.join(c for c in counts if c)} -> {', '.join(entry['files'])}",
                    markup=False, soft_wrap=True)
            doc["images"].append(entry)
            doc["files"] += entry["files"]
        return doc

    run(json_out, debug, body)


def register(app: typer.Typer) -> None:
    app.command("visualize", help=HELP)(visualize_command)
    app.command("viz", help=HELP, hidden=True)(visualize_command)
