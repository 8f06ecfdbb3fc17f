"""`kpnet error-analysis`: COCO AP with chosen heads replaced by ground truth, in the papers' row order
(objects as points Table 7, CornerNet Table 3, triplet Table 5)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from kpnet.cli.common import (DataOpt, DebugOpt, DeviceOpt, JsonOpt, Output, SetOpt, SplitOpt, check_device,
                               load_recipe_for_data, run)
from kpnet.errors import KpnetError

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
KEYPOINT_AP_KEYS = ("AP", "AP50", "AP75", "APm", "APl")

HELP = (
    "COCO bbox AP with chosen heads replaced by ground truth, in the papers' row order.\n\n"
    "As in objects as points Table 7, CornerNet Table 3 and triplet Table 5, the gap between rows says "
    "which head limits the detector.\n\n"
    "Rows: the baseline (nothing replaced, equal to `kpnet eval`), then the paper's rows for the recipe's "
    "family, ending with every head replaced -- for centernet_points: wh (size), hm (heatmap), hm+wh, "
    "hm+wh+reg (offset); for cornernet: heatmaps, heatmaps+offsets, all; for centernet_triplet: centre "
    "keypoints (ct_heat+ct_regr), all; for centernet_pose (scored by keypoint AP too): centre heatmap, + joint "
    "offsets (hps), + joint heatmaps (hm_hp+hp_offset), all. --replace GROUP "
    "(heads joined by ',' or '+', repeatable) evaluates those rows instead, after the baseline."
)


def parse_groups(groups: list[str], heads: tuple[str, ...], family: str) -> list[tuple[str, ...]]:
    """`--replace` values -> head tuples in the family's head order; unknown heads stop with exit 2."""
    rows: list[tuple[str, ...]] = []
    for text in groups:
        names = [n for n in re.split(r"[,+\s]+", text) if n]
        if not names:
            raise KpnetError("--replace", f"empty head group {text!r}; valid heads for {family}: {', '.join(heads)}")
        unknown = [n for n in names if n not in heads]
        if unknown:
            raise KpnetError("--replace", f"unknown head {unknown[0]!r} for family {family}; valid heads: {', '.join(heads)}")
        row = tuple(h for h in heads if h in names)
        if row not in rows:
            rows.append(row)
    return rows


def row_label(replace: tuple[str, ...], paper_rows: tuple[tuple[tuple[str, ...], str], ...]) -> str:
    """The paper's name of a row ('baseline', 'w/ gt heatmap+size'), or 'w/ gt' and the heads for other rows."""
    if not replace:
        return "baseline"
    return dict(paper_rows).get(replace, "w/ gt " + "+".join(replace))


def _table(doc: dict[str, Any], kind: str = "bbox", keys: tuple[str, ...] = AP_KEYS) -> Table:
    table = Table(title=f"{doc['family']} on {doc['split']} ({doc['images']} images): heads replaced by ground truth",
                  caption=f"COCO {kind} AP in %; - where no object has that size",
                  box=box.SIMPLE_HEAD, collapse_padding=True)
    table.add_column("row", no_wrap=True)
    for key in keys:
        table.add_column(key, justify="right", min_width=5, no_wrap=True)
    for row in doc["rows"]:
        figures = (f"{100 * row[kind][k]:.1f}" if row[kind][k] >= 0 else "-" for k in keys)
        table.add_row(row["label"], *figures)
    return table


def error_analysis_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML of the checkpoint's model.")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint to analyse.")],
    replace: Annotated[list[str] | None, typer.Option(
        "--replace", help="Heads to replace in one row, e.g. hm,wh (repeatable; default: the paper's rows).")] = None,
    overrides: SetOpt = None,
    data: DataOpt = None,
    split: SplitOpt = "val",
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """AP with heads replaced by ground truth, one row per head group (objects as points Table 7)."""

    def body(o: Output) -> dict[str, Any]:
        from rich.progress import Progress

        from kpnet import evaluation
        from kpnet.analysis.error_analysis import predict_with_replacement
        from kpnet.api import load_checkpoint
        from kpnet.data.dataset import load_split
        from kpnet.engine.inference import warn_scale

        check_device(device)
        r = load_recipe_for_data(recipe, overrides, data)
        detector = load_checkpoint(checkpoint, recipe=r, device=device)
        r = detector.recipe
        index = load_split(r, split)
        warn_scale(detector, [(im["height"], im["width"]) for im in index.coco.dataset["images"]])
        heads, paper_rows = detector.heads, detector.error_rows
        rows = [()] + (parse_groups(replace, heads, r.family) if replace else [g for g, _ in paper_rows])
        doc: dict[str, Any] = {"recipe": str(recipe), "checkpoint": str(checkpoint), "split": split,
                               "family": r.family, "images": len(index.image_ids), "rows": []}
        with Progress(console=o.err, transient=True) as bar:
            task = bar.add_task("error analysis", total=len(rows))
            for row in rows:
                label = row_label(row, paper_rows)
                bar.update(task, description=label)
                results = predict_with_replacement(detector, index, set(row), r.data.num_workers)
                dets = evaluation.load_dets(results, index.coco, source=f"predictions ({label})")
                stats = evaluation.stats_dict(evaluation.evaluate(index.coco, dets))
                doc["rows"].append({"replace": list(row), "label": label,
                                    "bbox": {k: stats[k] for k in AP_KEYS}})
                if detector.flip_pairs is not None:
                    kp = evaluation.stats_dict(evaluation.evaluate(index.coco, dets, iou_type="keypoints"))
                    doc["rows"][-1]["keypoints"] = {k: kp[k] for k in KEYPOINT_AP_KEYS}
                bar.advance(task)
        o.print(_table(doc))
        if detector.flip_pairs is not None:
            o.print(_table(doc, "keypoints", KEYPOINT_AP_KEYS))
        return doc

    run(json_out, debug, body)


def register(app: typer.Typer) -> None:
    app.command("error-analysis", help=HELP)(error_analysis_command)
