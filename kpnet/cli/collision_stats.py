"""`kpnet collision-stats`: how often objects collide on a centre point, overlap as same-class pairs,
or need a forced anchor assignment (objects-as-points paper, Appendix C)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kpnet.cli.common import DebugOpt, JsonOpt, Output, run
from kpnet.errors import KpnetError

HELP = (
    "Appendix C's collision statistics of COCO annotation files, per file and per COCO size.\n\n"
    "Rows: objects (small < 32², medium < 96², large otherwise, by the annotation's `area`); centre-"
    "collision pairs (same image and class, equal cell floor((x + w/2)/stride), floor((y + h/2)/stride) "
    "in original pixels); objects lost (k − 1 per cell holding k objects; the largest survives); same-"
    "class pairs with IoU above each --iou threshold; RetinaNet forced assignments (15 anchors, sizes "
    "32-512 x aspect 0.5/1/2, stride 16, image resized to --short-edge; forced when the best anchor IoU < "
    "0.5). A pair is booked under the size of its smaller object.\n\n"
    "Crowd: as the reference does, crowd annotations count in the object total but are left out of the "
    "pairs, lost objects and forced anchors; --include-crowd treats them as ordinary objects everywhere."
)


def _parse_thresholds(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise KpnetError("--iou", f"expected comma-separated numbers like 0.5,0.7, got {text!r}") from None
    if not values or any(not 0.0 <= v < 1.0 for v in values):
        raise KpnetError("--iou", f"thresholds must lie in [0, 1), got {text!r}")
    return values


def _table(stats: dict[str, Any], thresholds: list[str]) -> Table:
    table = Table(title=f"{stats['file']}: {stats['images']} images, {stats['objects']} objects "
                        f"({stats['objects'] - stats['crowd']} without crowd)")
    table.add_column("statistic")
    for column in ("all", "small", "medium", "large", "% of objects"):
        table.add_column(column, justify="right")
    sizes = stats["by_size"]

    def row(label: str, total: int, per_size: list[int]) -> None:
        share = f"{100.0 * total / stats['objects']:.3f}" if stats["objects"] else "-"
        table.add_row(label, str(total), *(str(v) for v in per_size), share)

    row("objects", stats["objects"], [sizes[s]["objects"] for s in ("small", "medium", "large")])
    for key, label in (("center_collision_pairs", "centre-collision pairs"), ("objects_lost", "objects lost")):
        row(label, stats[key], [sizes[s][key] for s in ("small", "medium", "large")])
    for t in thresholds:
        row(f"same-class pairs IoU > {t}", stats["iou_pairs"][t],
            [sizes[s]["iou_pairs"][t] for s in ("small", "medium", "large")])
    row("forced anchor assignments", stats["forced_anchors"],
        [sizes[s]["forced_anchors"] for s in ("small", "medium", "large")])
    return table


def register(app: typer.Typer) -> None:
    @app.command("collision-stats", help=HELP)
    def collision_stats_cmd(
        ann: Annotated[list[Path], typer.Argument(
            metavar="ANN", help="COCO annotation JSON file(s).", show_default=False)],
        stride: Annotated[int, typer.Option(help="Output stride of the centre heatmap.")] = 4,
        iou: Annotated[str, typer.Option(help="Comma-separated IoU thresholds for same-class pairs.")] = "0.5,0.7",
        short_edge: Annotated[int, typer.Option(help="Shorter image edge after the RetinaNet resize.")] = 800,
        include_crowd: Annotated[bool, typer.Option(
            "--include-crowd", help="Count crowd annotations in pairs and anchors too.")] = False,
        json_out: JsonOpt = False,
        debug: DebugOpt = False,
    ) -> None:
        def body(out: Output) -> dict[str, Any]:
            from kpnet.analysis.collisions import (
                RETINA_RATIOS, RETINA_SIZES, RETINA_STRIDE, collision_stats, load_boxes, threshold_key,
            )

            if stride <= 0:
                raise KpnetError("--stride", f"must be a positive integer, got {stride}")
            if short_edge <= 0:
                raise KpnetError("--short-edge", f"must be a positive integer, got {short_edge}")
            thresholds = _parse_thresholds(iou)
            files = []
            for path in ann:
                stats = collision_stats(load_boxes(path), stride, thresholds, short_edge, include_crowd)
                out.print(_table(stats, [threshold_key(t) for t in thresholds]))
                files.append(stats)
            return {
                "stride": stride,
                "iou_thresholds": [threshold_key(t) for t in thresholds],
                "short_edge": short_edge,
                "include_crowd": include_crowd,
                "anchors": {"sizes": list(RETINA_SIZES), "aspect_ratios": list(RETINA_RATIOS),
                            "stride": RETINA_STRIDE},
                "files": files,
            }

        run(json_out, debug, body)
