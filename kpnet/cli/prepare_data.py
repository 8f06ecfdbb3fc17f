"""`kpnet prepare-data`: make the synthetic `shapes` and `poses` sets, validate or repair a COCO file, and
convert Pascal VOC or YOLO labels to COCO."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.table import Table

from kpnet.cli.common import EXIT_INPUT, DebugOpt, JsonOpt, Output, dumps, run

SHOWN_ROWS = 30  # problems / changes listed one by one in human output (all of them are in --json)

sub = typer.Typer(help="Make, validate, repair and convert detection data sets (COCO format).",
                  no_args_is_help=True)


def _fail_with_report(out: Output, line: str, doc: dict[str, Any], show: Callable[[], None]) -> NoReturn:
    """Exit 2 with the culprit as the FIRST stderr line, then the full report (and under
    `--json` the report document, plus `error` and `exit_code`, on stdout)."""
    out.err.print(f"error: {line}", markup=False, soft_wrap=True)
    show()
    if out.json:
        sys.stdout.write(dumps({**doc, "error": line, "exit_code": EXIT_INPUT, "checks_failed": []}) + "\n")
        sys.stdout.flush()
    raise typer.Exit(EXIT_INPUT)


@sub.command("shapes")
def shapes_command(
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder (train/, val/, annotations/).")],
    num_train: Annotated[int, typer.Option("--num-train", min=0, help="Training images.")] = 2000,
    num_val: Annotated[int, typer.Option("--num-val", min=0, help="Validation images.")] = 200,
    image_size: Annotated[int, typer.Option("--image-size", min=64, help="Square image side in pixels.")] = 128,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Same seed, byte-identical files.")] = 0,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write the synthetic shapes set (COCO format): 6 classes, small to large, occlusion, crowds, clutter."""

    def body(o: Output) -> dict[str, Any]:
        from kpnet.data.shapes import make_shapes

        result = make_shapes(out_dir, num_train, num_val, image_size, seed)
        table = Table(title=f"shapes -> {out_dir}  ({result['seconds']:.1f} s)")
        for col in ("split", "images", "boxes", "small", "medium", "large"):
            table.add_column(col, justify="left" if col == "split" else "right")
        for split in ("train", "val"):
            r = result[split]
            table.add_row(split, str(r["images"]), str(r["boxes"]), *(str(r["sizes"][k]) for k in
                          ("small", "medium", "large")))
        o.print(table)
        for split in ("train", "val"):
            o.print(f"{split}: images {result[split]['images_dir']}, annotations {result[split]['annotations']}",
                    markup=False, soft_wrap=True)
        o.print(f"classes: {', '.join(result['classes'])}", markup=False)
        return result

    run(json_out, debug, body)


@sub.command("poses")
def poses_command(
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder (train/, val/, annotations/).")],
    num_train: Annotated[int, typer.Option("--num-train", min=0, help="Training images.")] = 2000,
    num_val: Annotated[int, typer.Option("--num-val", min=0, help="Validation images.")] = 200,
    image_size: Annotated[int, typer.Option("--image-size", min=64, help="Square image side in pixels.")] = 128,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Same seed, byte-identical files.")] = 0,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write the synthetic people set (COCO person keypoints): stick figures with the 17 COCO joints, several per
    image, varied poses and scales, occlusion and truncation."""

    def body(o: Output) -> dict[str, Any]:
        from kpnet.data.poses import make_poses

        result = make_poses(out_dir, num_train, num_val, image_size, seed)
        table = Table(title=f"poses -> {out_dir}  ({result['seconds']:.1f} s)")
        for col in ("split", "images", "people", "labelled joints", "visible joints"):
            table.add_column(col, justify="left" if col == "split" else "right")
        for split in ("train", "val"):
            r = result[split]
            table.add_row(split, str(r["images"]), str(r["people"]), str(r["labelled_joints"]), str(r["visible_joints"]))
        o.print(table)
        for split in ("train", "val"):
            o.print(f"{split}: images {result[split]['images_dir']}, annotations {result[split]['annotations']}",
                    markup=False, soft_wrap=True)
        return result

    run(json_out, debug, body)


def _report_tables(o: Output, report: Any) -> None:
    counts = Table(title="COCO file", show_header=False)
    counts.add_row("file", report.file)
    for key, value in report.counts.items():
        counts.add_row(key.replace("_", " "), str(value))
    o.print(counts)
    if report.classes:
        classes = Table(title="classes")
        for col in ("id", "name", "boxes"):
            classes.add_column(col)
        for c in report.classes:
            classes.add_row(str(c["id"]), c["name"], str(c["boxes"]))
        o.print(classes)
    for note in report.notes:
        o.print(f"note: {note}", markup=False, soft_wrap=True)
    _listing(o, "problems", report.problems)


def _listing(o: Output, title: str, items: list[Any]) -> None:
    if not items:
        o.print(f"{title}: none")
        return
    by_kind: dict[str, int] = {}
    for item in items:
        by_kind[item.kind] = by_kind.get(item.kind, 0) + 1
    o.print(f"{title}: {len(items)} (" + ", ".join(f"{k} {n}" for k, n in by_kind.items()) + ")", markup=False)
    for item in items[:SHOWN_ROWS]:
        o.print(f"  {item.kind}: {item.detail}", markup=False, soft_wrap=True)
    if len(items) > SHOWN_ROWS:
        o.print(f"  ... {len(items) - SHOWN_ROWS} more (all of them under --json)")


@sub.command("coco")
def coco_command(
    ann: Annotated[Path, typer.Option("--ann", help="COCO annotation JSON.")],
    images: Annotated[Path, typer.Option("--images", help="Folder the images' file_name is relative to.")],
    fix: Annotated[Path | None, typer.Option("--fix", help="Write a repaired copy here and list every change.")] = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Validate a COCO file (ids, references, boxes, images): exit 2 on any problem; --fix OUT repairs a copy."""

    def body(o: Output) -> dict[str, Any]:
        from kpnet.data.validate import fix_coco, validate_coco

        report = validate_coco(ann, images)
        doc: dict[str, Any] = {**report.to_dict(), "fix": None}
        if fix is None:
            if not report.ok:
                hint = "; rerun with --fix OUT to repair" if report.fixable else ""
                _fail_with_report(o, f"{report.first_line()}{hint}", doc,
                                  lambda: _report_tables(o, report))
            _report_tables(o, report)
            return doc
        if not report.fixable:
            _fail_with_report(o, f"{report.first_line()}; --fix cannot repair a file without this structure", doc,
                              lambda: _report_tables(o, report))
        result = fix_coco(ann, images, fix)
        doc["fix"] = result.to_dict()

        def show() -> None:
            _report_tables(o, report)
            o.print(f"--fix wrote {result.out}", markup=False, soft_wrap=True)
            _listing(o, "changes", result.changes)
            o.print(f"{result.out}: " + ("clean" if result.after.ok else "still has problems"), markup=False)
            if not result.after.ok:
                _listing(o, "problems after --fix", result.after.problems)

        if not result.after.ok:
            _fail_with_report(o, f"{result.after.first_line()} (after --fix)", doc, show)
        show()
        return doc

    run(json_out, debug, body)


def _converted(o: Output, result: dict[str, Any], images: Path) -> dict[str, Any]:
    """Print what a converter wrote and validate it (without decoding images again)."""
    from kpnet.data.validate import validate_coco

    report = validate_coco(result["out"], images, check_images=False)
    table = Table(title=f"wrote {result['out']}", show_header=False)
    table.add_row("images", str(result["images"]))
    table.add_row("boxes", str(result["boxes"]))
    table.add_row("classes", ", ".join(result["classes"]))
    o.print(table)
    if not report.ok:
        o.print(f"warning: {len(report.problems)} problems in the converted file (training clips or drops such "
                f"boxes); `kpnet prepare-data coco --ann {result['out']} --images {images} --fix OUT` writes a "
                "clean copy", markup=False, soft_wrap=True)
        _listing(o, "problems", report.problems)
    return {**result, "validation": report.to_dict()}


@sub.command("voc")
def voc_command(
    xml_dir: Annotated[Path, typer.Option("--xml-dir", help="Folder of Pascal VOC *.xml files.")],
    images: Annotated[Path, typer.Option("--images", help="Folder holding the images named in <filename>.")],
    out: Annotated[Path, typer.Option("--out", help="COCO JSON to write.")],
    classes: Annotated[str | None, typer.Option("--classes", help="Comma-separated class order (ids 1..C); "
                                                "default: sorted names found.")] = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Convert Pascal VOC XML to COCO (1-based inclusive corners to x, y, w, h; `difficult` kept)."""

    def body(o: Output) -> dict[str, Any]:
        from kpnet.data.convert import voc_to_coco

        names = classes.split(",") if classes is not None else None
        return _converted(o, voc_to_coco(xml_dir, images, out, names), images)

    run(json_out, debug, body)


@sub.command("yolo")
def yolo_command(
    labels: Annotated[Path, typer.Option("--labels", help="Folder of YOLO <stem>.txt label files.")],
    images: Annotated[Path, typer.Option("--images", help="Folder of the images (sizes are read from them).")],
    classes: Annotated[Path, typer.Option("--classes", help="Class list, one name per line (index 0 first).")],
    out: Annotated[Path, typer.Option("--out", help="COCO JSON to write.")],
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Convert YOLO labels (class cx cy w h, normalised) to COCO."""

    def body(o: Output) -> dict[str, Any]:
        from kpnet.data.convert import yolo_to_coco

        return _converted(o, yolo_to_coco(labels, images, classes, out), images)

    run(json_out, debug, body)


def register(app: typer.Typer) -> None:
    app.add_typer(sub, name="prepare-data")
