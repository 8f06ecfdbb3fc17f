"""Converters from Pascal VOC XML and YOLO txt labels to a COCO detection file.

Both write COCO atomically with image, annotation and category ids numbered from 1 (images
in sorted file order), `bbox` as [x, y, w, h] in continuous pixel coordinates, `area` = w*h,
`iscrowd` 0 and an empty `segmentation` (neither format has masks).

VOC: corners are 1-based inclusive pixel indices, so, as the usual converters do,
x = xmin - 1, y = ymin - 1, w = xmax - xmin + 1, h = ymax - ymin + 1. VOC's `difficult` flag
is kept as an extra `difficult` field (0/1) on each annotation; COCOeval ignores that field,
so difficult objects count as ordinary ground truth.

YOLO: one `<stem>.txt` per image with lines `class cx cy w h`, normalised to [0, 1] by the
image size, which is read from the image file. An image without a label file has no objects.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from kpnet.data.validate import escapes_root, read_image_size
from kpnet.errors import KpnetError
from kpnet.io import atomic_write_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _coco_document(images: list[dict[str, Any]], annotations: list[dict[str, Any]],
                   classes: list[str], source: str) -> dict[str, Any]:
    return {
        "info": {"description": f"converted by kpnet from {source}"},
        "licenses": [],
        "images": images,
        "annotations": [{"id": i, **a} for i, a in enumerate(annotations, start=1)],
        "categories": [{"id": i, "name": n, "supercategory": "none"} for i, n in enumerate(classes, start=1)],
    }


def _annotation(image_id: int, category_id: int, x: float, y: float, w: float, h: float,
                **extra: Any) -> dict[str, Any]:
    box = [round(x, 3), round(y, 3), round(w, 3), round(h, 3)]
    return {"image_id": image_id, "category_id": category_id, "bbox": box, "area": round(box[2] * box[3], 3),
            "iscrowd": 0, "segmentation": [], **extra}


def _parse_classes(classes: list[str], source: str) -> list[str]:
    names = [c.strip() for c in classes if c.strip()]
    if not names:
        raise KpnetError(source, "the class list is empty")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise KpnetError(source, f"class {dup[0]!r} is listed more than once")
    return names


def _xml_text(node: ET.Element, path: str, xml_file: Path) -> str:
    el = node.find(path)
    if el is None or el.text is None or not el.text.strip():
        raise KpnetError(xml_file, f"missing <{path}>")
    return el.text.strip()


def _xml_number(node: ET.Element, path: str, xml_file: Path) -> float:
    text = _xml_text(node, path, xml_file)
    try:
        value = float(text)
    except ValueError:
        raise KpnetError(xml_file, f"<{path}> is {text!r}, not a number") from None
    if not math.isfinite(value):
        raise KpnetError(xml_file, f"<{path}> is {text!r}, not a finite number")
    return value


def voc_to_coco(xml_dir: str | Path, images_dir: str | Path, out_path: str | Path,
                classes: list[str] | None = None) -> dict[str, Any]:
    """Convert every `*.xml` in `xml_dir` (Pascal VOC) to one COCO file; `classes` fixes the
    category order (ids 1..C) and rejects other names, otherwise the sorted names found are used."""
    xml_dir, images_dir = Path(xml_dir), Path(images_dir)
    for d, what in ((xml_dir, "XML folder"), (images_dir, "image folder")):
        if not d.is_dir():
            raise KpnetError(d, f"no such {what}")
    names = _parse_classes(classes, "--classes") if classes is not None else None
    files = sorted(xml_dir.glob("*.xml"))
    if not files:
        raise KpnetError(xml_dir, "no *.xml files")
    parsed = []
    for xml_file in files:
        try:
            root = ET.parse(xml_file).getroot()
        except ET.ParseError as e:
            raise KpnetError(xml_file, f"malformed XML: {e}") from None
        file_name = _xml_text(root, "filename", xml_file)
        if escapes_root(file_name):
            raise KpnetError(xml_file, f"<filename> {file_name!r} escapes the image folder")
        if not (images_dir / file_name).is_file():
            raise KpnetError(xml_file, f"image {file_name!r} not found in {images_dir}")
        objects = []
        for obj in root.findall("object"):
            name = _xml_text(obj, "name", xml_file)
            if names is not None and name not in names:
                raise KpnetError(xml_file, f"object class {name!r} is not in --classes ({', '.join(names)})")
            corners = [_xml_number(obj, f"bndbox/{k}", xml_file) for k in ("xmin", "ymin", "xmax", "ymax")]
            difficult = obj.find("difficult")
            objects.append((name, corners, int(difficult is not None and (difficult.text or "0").strip() == "1")))
        size = root.find("size")
        if size is not None and size.find("width") is not None and size.find("height") is not None:
            width, height = int(_xml_number(size, "width", xml_file)), int(_xml_number(size, "height", xml_file))
        else:
            width, height = 0, 0
        if width <= 0 or height <= 0:
            width, height = _image_size(images_dir / file_name, xml_file)
        parsed.append((file_name, width, height, objects))
    class_names = names if names is not None else sorted({o[0] for p in parsed for o in p[3]})
    category = {n: i for i, n in enumerate(class_names, start=1)}
    images, annotations = [], []
    for image_id, (file_name, width, height, objects) in enumerate(parsed, start=1):
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for name, (xmin, ymin, xmax, ymax), difficult in objects:
            annotations.append(_annotation(image_id, category[name], xmin - 1, ymin - 1, xmax - xmin + 1,
                                           ymax - ymin + 1, difficult=difficult))
    doc = _coco_document(images, annotations, class_names, f"Pascal VOC {xml_dir}")
    atomic_write_json(out_path, doc)
    return {"out": str(out_path), "images": len(images), "boxes": len(annotations), "classes": class_names}


def _image_size(path: Path, source: Path) -> tuple[int, int]:
    try:
        return read_image_size(path)
    except (OSError, ValueError, SyntaxError) as e:
        raise KpnetError(source, f"cannot read image {path.name!r}: {e}") from None


def yolo_to_coco(labels_dir: str | Path, images_dir: str | Path, classes_file: str | Path,
                 out_path: str | Path) -> dict[str, Any]:
    """Convert YOLO labels (`<stem>.txt`: class cx cy w h, normalised) for every image in
    `images_dir` to one COCO file; class index k becomes category id k + 1."""
    labels_dir, images_dir, classes_file = Path(labels_dir), Path(images_dir), Path(classes_file)
    for d, what in ((labels_dir, "label folder"), (images_dir, "image folder")):
        if not d.is_dir():
            raise KpnetError(d, f"no such {what}")
    if not classes_file.is_file():
        raise KpnetError(classes_file, "no such class list")
    try:
        names = _parse_classes(classes_file.read_text(encoding="utf-8").splitlines(), str(classes_file))
    except UnicodeDecodeError:
        raise KpnetError(classes_file, "not UTF-8 text") from None
    image_files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not image_files:
        raise KpnetError(images_dir, f"no images ({', '.join(IMAGE_SUFFIXES)})")
    stems = {p.stem for p in image_files}
    if len(stems) != len(image_files):
        raise KpnetError(images_dir, "two images share a file stem, so their label file is ambiguous")
    orphans = sorted(p.name for p in labels_dir.glob("*.txt") if p.stem not in stems)
    if orphans:
        raise KpnetError(labels_dir / orphans[0], f"no image named {Path(orphans[0]).stem}.* in {images_dir}")
    images, annotations = [], []
    for image_id, image_file in enumerate(image_files, start=1):
        width, height = _image_size(image_file, image_file)
        images.append({"id": image_id, "file_name": image_file.name, "width": width, "height": height})
        label_file = labels_dir / f"{image_file.stem}.txt"
        if not label_file.is_file():
            continue
        for lineno, line in enumerate(label_file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            where = f"{label_file}:{lineno}"
            if len(fields) != 5:
                raise KpnetError(where, f"expected 'class cx cy w h', got {line.strip()!r}")
            try:
                cls = int(fields[0])
                cx, cy, w, h = (float(v) for v in fields[1:])
            except ValueError:
                raise KpnetError(where, f"expected an integer class and 4 numbers, got {line.strip()!r}") from None
            if not 0 <= cls < len(names):
                raise KpnetError(where, f"class {cls} is outside 0..{len(names) - 1} of {classes_file}")
            if not all(math.isfinite(v) for v in (cx, cy, w, h)):
                raise KpnetError(where, f"non-finite coordinate in {line.strip()!r}")
            annotations.append(_annotation(image_id, cls + 1, (cx - w / 2) * width, (cy - h / 2) * height,
                                           w * width, h * height))
    doc = _coco_document(images, annotations, names, f"YOLO labels {labels_dir}")
    atomic_write_json(out_path, doc)
    return {"out": str(out_path), "images": len(images), "boxes": len(annotations), "classes": names}
