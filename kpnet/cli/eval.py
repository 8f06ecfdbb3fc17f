"""`kpnet eval`: score a checkpoint on a split, or an existing results file (--gt/--dets), with COCOeval."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kpnet.cli.common import (DataOpt, DebugOpt, DeviceOpt, JsonOpt, Output, SetOpt, SplitOpt, check_device,
                               load_recipe_for_data, run)


def _scales(text: str | None) -> list[float] | None:
    from kpnet.errors import KpnetError

    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise KpnetError("--scales", f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise KpnetError("--scales", f"scales must be positive, got {text!r}")
    return values


def stats_table(title: str, stats: dict[str, float], per_row: int = 3) -> Table:
    """Stats as rows of `per_row` name/value pairs, so the 12 COCO stats read as pycocotools groups them and fit an 80-column log."""
    items = list(stats.items())
    table = Table(title=title)
    for _ in range(min(per_row, len(items))):
        table.add_column("", justify="left", style="bold", no_wrap=True)
        table.add_column("", justify="right", no_wrap=True)
    table.show_header = False
    for start in range(0, len(items), per_row):
        cells: list[str] = []
        for key, value in items[start:start + per_row]:
            cells += [key, f"{value:.3f}" if value is not None else "-"]
        table.add_row(*cells)
    return table


def eval_command(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe YAML of the checkpoint's model.")] = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="Checkpoint to evaluate.")] = None,
    onnx: Annotated[Path | None, typer.Option(
        "--onnx", help="Evaluate an exported model (kpnet export) in onnxruntime instead of a checkpoint.")] = None,
    overrides: SetOpt = None,
    data: DataOpt = None,
    split: SplitOpt = "val",
    flip: Annotated[bool | None, typer.Option("--flip/--no-flip", help="Flip test (default: the recipe's).")] = None,
    scales: Annotated[str | None, typer.Option("--scales", help="Test scales, e.g. 0.5,0.75,1,1.25,1.5.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write COCO results JSON here (metrics next to it).")] = None,
    gt: Annotated[Path | None, typer.Option("--gt", help="Score an existing results file: ground-truth COCO JSON.")] = None,
    dets: Annotated[Path | None, typer.Option("--dets", help="With --gt: COCO results JSON to score.")] = None,
    min_ap: Annotated[float | None, typer.Option("--min-ap", help="Exit 1 unless bbox AP (segm / keypoints AP with --iou-type segm / keypoints) >= this.")] = None,
    iou_type: Annotated[str, typer.Option(
        "--iou-type", help="auto (bbox, and segm / keypoints when the results carry masks / keypoints), bbox, segm "
                     "or keypoints.")] = "auto",
    fd: Annotated[bool, typer.Option("--fd-rates", help="Add false-discovery rates (triplet paper Tables 1, 3).")] = False,
    plots: Annotated[Path | None, typer.Option("--plots", help="Write precision-recall curves (PNG) into this folder.")] = None,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """COCO AP (bbox; segm for masks; keypoints for poses) of a checkpoint (RECIPE --checkpoint CKPT) or a results file (--gt ANN --dets RESULTS).

    Under torchrun each rank decodes a contiguous shard of the images; rank 0 gathers them in file order,
    writes the results and scores them (the other ranks print nothing).
    """
    from kpnet.engine.distributed import world_from_env

    main_rank = world_from_env().is_main

    def body(o: Output) -> dict[str, Any]:
        from kpnet import evaluation
        from kpnet.data.validate import load_gt
        from kpnet.errors import KpnetError
        from kpnet.io import atomic_write_json

        doc: dict[str, Any] = {}
        if iou_type not in ("auto", *evaluation.IOU_TYPES):
            raise KpnetError("--iou-type", f"expected auto, {', '.join(evaluation.IOU_TYPES)}; got {iou_type!r}")
        if gt is not None or dets is not None:
            if gt is None or dets is None:
                raise KpnetError("--gt/--dets", "give both --gt ANN and --dets RESULTS to score a results file")
            if recipe is not None or checkpoint is not None or onnx is not None or data is not None:
                raise KpnetError("--gt/--dets", "scores an existing results file: drop RECIPE, --checkpoint, --onnx and --data")
            coco_gt = load_gt(gt)
            coco_dt = evaluation.load_dets(dets, coco_gt)
            doc.update({"gt": str(gt), "dets": str(dets)})
            results_path = None
        else:
            if recipe is None or (checkpoint is None) == (onnx is None):
                raise KpnetError("eval", "give RECIPE and --checkpoint CKPT (or --onnx MODEL), or --gt ANN --dets RESULTS")
            check_device(device)
            coco_gt, results, results_path, info = _predict(o, recipe, checkpoint or onnx, overrides, data, split, flip,
                                                            scales, out, device, onnx is not None)
            coco_dt = evaluation.load_dets(results, coco_gt, source="predictions")
            doc.update(info)
        types = (["bbox"] + ["segm"] * evaluation.has_masks(coco_dt) + ["keypoints"] * evaluation.has_keypoints(coco_dt)
                 if iou_type == "auto" else [iou_type])
        evaluated = {kind: evaluation.evaluate(coco_gt, coco_dt, iou_type=kind) for kind in types}
        for kind, cocoeval in evaluated.items():
            doc[kind] = evaluation.stats_dict(cocoeval)
            o.print(stats_table(f"COCO {kind}", doc[kind]))
        cocoeval = evaluated[types[0]]
        if fd:
            doc["fd"] = evaluation.fd_rates(coco_gt, coco_dt)
            o.print(stats_table("false-discovery rates (IoU 0.05:0.05:0.5)", doc["fd"]))
        if plots is not None:
            doc["plots"] = [str(p) for p in evaluation.plot_pr_curves(cocoeval, plots)]
            o.print(f"precision-recall curves: {', '.join(doc['plots'])}")
        if results_path is not None:
            metrics_path = results_path.with_name(results_path.stem + ".metrics.json")
            atomic_write_json(metrics_path, {k: v for k, v in doc.items()}, indent=2)
            doc["metrics_file"] = str(metrics_path)
            o.print(f"results: {results_path}\nmetrics: {metrics_path}")
        if min_ap is not None:
            o.check(doc[types[0]]["AP"] >= min_ap, f"{types[0]} AP {doc[types[0]]['AP']:.4f} < --min-ap {min_ap}")
        return doc

    run(json_out and main_rank, debug, body)


def _predict(
    o: Output, recipe_path: Path, checkpoint: Path, overrides: list[str] | None, data: Path | None, split: str,
    flip: bool | None, scales: str | None, out: Path | None, device: str, is_onnx: bool,
) -> tuple[Any, list[dict[str, Any]], Path, dict[str, Any]]:
    import dataclasses
    import functools

    import torch
    from rich.progress import Progress

    from kpnet.api import load_checkpoint
    from kpnet.config import resolved_input_size
    from kpnet.data.dataset import load_split
    from kpnet.engine import distributed
    from kpnet.engine.inference import predict_dataset, warn_scale
    from kpnet.io import atomic_write_json

    r = load_recipe_for_data(recipe_path, overrides, data)
    test = r.test
    if flip is not None:
        test = dataclasses.replace(test, flip=flip)
    if (values := _scales(scales)) is not None:
        test = dataclasses.replace(test, scales=tuple(values))
    r = dataclasses.replace(r, test=test)
    detect = None
    with distributed.process_group("cpu" if is_onnx else device) as world:
        if is_onnx:
            from kpnet.export.runtime import load_onnx

            model, detector = load_onnx(checkpoint, r)
            detect = functools.partial(model.detect, detector)
        else:
            detector = load_checkpoint(checkpoint, recipe=r, device=device)
        r = detector.recipe
        index = load_split(r, split)
        if world.is_main:
            warn_scale(detector, [(im["height"], im["width"]) for im in index.coco.dataset["images"]])
        positions = distributed.shard(len(index.image_ids), world)
        with Progress(console=o.err, transient=True, disable=not world.is_main) as bar:
            task = bar.add_task(f"eval {split}", total=len(positions))
            results = predict_dataset(detector, index, r.data.num_workers, on_image=lambda: bar.advance(task),
                                      detect=detect, positions=positions if world.distributed else None)
        gathered = distributed.gather_json(results, world, detector.device if not is_onnx else torch.device("cpu"))
    if gathered is None:  # a rank other than 0: rank 0 writes and scores
        raise typer.Exit(0)
    results = gathered
    results_path = out or checkpoint.parent / f"results_{split}{'_onnx' if is_onnx else ''}.json"
    atomic_write_json(results_path, results)
    info = {
        "recipe": str(recipe_path), "onnx" if is_onnx else "checkpoint": str(checkpoint), "split": split, "images": len(index.image_ids),
        "detections": len(results), "results_file": str(results_path), "flip": test.flip, "scales": list(test.scales),
        "input_size": resolved_input_size(r.test, r),
    }
    return index.coco, results, results_path, info


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
