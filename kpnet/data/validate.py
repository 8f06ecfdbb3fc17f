"""Validating and repairing COCO detection files before they reach training or evaluation.

The one home of COCO annotation checking. `validate_coco` reports everything it finds; `fix_coco`
writes a cleaned copy and lists every change; `load_coco_checked` is the loader training, `kpnet eval`
(`load_gt` for `--gt`), `viz --gt` and `collision-stats` use: it raises a `KpnetError` naming the file
and the first culprit for what would break them, and tolerates degenerate and out-of-image boxes (the
dataset clips them and drops what is left empty, as the reference code does).

Why annotation id 0 is a problem: pycocotools' COCOeval records a match by storing the matched
ground-truth id, with 0 meaning "unmatched", so a ground-truth box with id 0 can never be
matched (a perfect self-evaluation of such a file scores below AP 1.0). `validate_coco` reports it;
`load_coco_checked` renumbers it in memory with a warning, so Roboflow exports (ids from 0) train and score.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
import contextlib
import io
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from kpnet.data.images import oriented_size
from kpnet.errors import KpnetError, warn
from kpnet.io import atomic_write_json

SECTIONS = ("images", "annotations", "categories")
REQUIRED_KEYS: Mapping[str, tuple[str, ...]] = {  # training and evaluation (COCOeval needs `area`)
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox", "area"),
    "categories": ("id", "name"),
}
# Statistics of the boxes alone (collision-stats): image sizes, image links and boxes; no file names,
# areas, annotation ids or categories needed (a present value is still checked).
BOX_STATISTICS_KEYS: Mapping[str, tuple[str, ...]] = {
    "images": ("id", "width", "height"),
    "annotations": ("image_id", "category_id", "bbox"),
}
# Problems that break training or evaluation: `load_coco_checked` raises on these.
FATAL_KINDS = frozenset({
    "malformed_json", "missing_key", "bad_value", "duplicate_image_id", "duplicate_annotation_id",
    "duplicate_category_id", "unknown_image_id", "unknown_category_id", "path_escape", "missing_image",
})
# Problems `load_coco_checked` repairs in memory with a warning: an annotation id 0 gets a new id.
RENUMBERED_KINDS = frozenset({"annotation_id_zero"})
# Problems the dataset tolerates (boxes are clipped, then dropped if empty) and `--fix` repairs.
TOLERATED_KINDS = frozenset({"degenerate_box", "out_of_image_box", "unreadable_image", "size_mismatch"})
COUNT_KEYS = ("images", "boxes", "classes", "classes_with_boxes", "crowd", "images_without_boxes")
BOX_EPS = 1e-3  # pixels of slack before a box edge counts as outside the image


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a COCO file; `id` is the id of the record at fault (image, annotation
    or category, as `kind` says) and `image_id` the image it belongs to, where known."""

    kind: str
    detail: str
    id: Any = None
    image_id: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "id": self.id, "image_id": self.image_id, "detail": self.detail}


@dataclass
class Report:
    """What `validate_coco` found in one file."""

    file: str
    images_dir: str | None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0))
    classes: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fixable: bool = True  # False when the file does not parse or lacks the top-level lists

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem_counts(self) -> dict[str, int]:
        return dict(Counter(p.kind for p in self.problems))

    def first_line(self) -> str:
        """One line naming the file and the first culprit (for the error message)."""
        p = self.problems[0]
        more = f" ({len(self.problems)} problems in all)" if len(self.problems) > 1 else ""
        return f"{self.file}: {p.detail}{more}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "images_dir": self.images_dir,
            "ok": self.ok,
            "counts": self.counts,
            "classes": self.classes,
            "problem_counts": self.problem_counts(),
            "problems": [p.to_dict() for p in self.problems],
            "notes": self.notes,
            "fixable": self.fixable,
        }


@dataclass
class FixResult:
    """What `fix_coco` changed, and the report on the file it wrote."""

    out: str
    changes: list[Problem]
    after: Report

    def change_counts(self) -> dict[str, int]:
        return dict(Counter(c.kind for c in self.changes))

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "change_counts": self.change_counts(),
                "changes": [c.to_dict() for c in self.changes], "after": self.after.to_dict()}


def is_int(v: Any) -> bool:
    """An integer (numpy scalars included), not a bool."""
    if type(v) is int:  # the JSON case first: the ABC check below costs about 1 µs (results files hold millions)
        return True
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def is_number(v: Any) -> bool:
    """A finite real number (numpy scalars included), not a bool."""
    if type(v) is float or type(v) is int:  # the JSON cases first (see is_int)
        return math.isfinite(v)
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v)


def _read_json(path: Path) -> tuple[Any, Problem | None]:
    """Parse the file; a syntax or encoding error becomes a `malformed_json` problem."""
    if not path.is_file():
        raise KpnetError(path, "no such annotation file")
    try:
        return json.loads(path.read_bytes()), None
    except json.JSONDecodeError as e:
        return None, Problem("malformed_json", f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}")
    except UnicodeDecodeError as e:
        return None, Problem("malformed_json", f"malformed JSON: not UTF-8 text ({e.reason} at byte {e.start})")
    except RecursionError:
        return None, Problem("malformed_json", "malformed JSON: nested too deeply")


def _structure_problems(doc: Any, required: Mapping[str, tuple[str, ...]] = REQUIRED_KEYS) -> list[Problem]:
    """The top level must be an object with `images`, `annotations` and (where required) `categories` lists."""
    if not isinstance(doc, dict):
        return [Problem("malformed_json", f"top level is a JSON {type(doc).__name__}, not an object")]
    out = []
    for key in SECTIONS:
        if key not in doc and key not in required:
            continue
        if key not in doc:
            out.append(Problem("missing_key", f"missing required top-level key '{key}'"))
        elif not isinstance(doc[key], list):
            out.append(Problem("bad_value", f"'{key}' is a JSON {type(doc[key]).__name__}, not a list"))
    return out


def _record_problem(section: str, index: int, rec: Any,
                    required: Mapping[str, tuple[str, ...]] = REQUIRED_KEYS) -> Problem | None:
    """Missing keys or wrongly typed values in one record of `section` (keys not required are checked when present)."""
    what = section[:-1] if section != "categories" else "category"
    if not isinstance(rec, dict):
        return Problem("bad_value", f"{section}[{index}] is not an object")
    rid = rec.get("id")
    name = f"{what} id {rid}" if "id" in rec else f"{section}[{index}]"
    for key in required.get(section, ()):
        if key not in rec:
            return Problem("missing_key", f"{name} has no '{key}'", rid, rec.get("image_id"))
    if "id" in rec and not is_int(rid):
        return Problem("bad_value", f"{section}[{index}] has id {rid!r}, not an integer", rid)
    if section == "images":
        if "file_name" in rec and (not isinstance(rec["file_name"], str) or not rec["file_name"]):
            return Problem("bad_value", f"{name} has file_name {rec['file_name']!r}, not a path", rid, rid)
        for key in ("width", "height"):
            if not is_int(rec[key]) or rec[key] <= 0:
                return Problem("bad_value", f"{name} has {key} {rec[key]!r}, not a positive integer", rid, rid)
    elif section == "annotations":
        for key in ("image_id", "category_id"):
            if not is_int(rec[key]):
                return Problem("bad_value", f"{name} has {key} {rec[key]!r}, not an integer", rid, rec.get("image_id"))
        box = rec["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(is_number(v) for v in box)):
            return Problem("bad_value", f"{name} (image {rec['image_id']}) has bbox {box!r}, not 4 finite numbers",
                           rid, rec["image_id"])
        if "area" in rec and not is_number(rec["area"]):
            return Problem("bad_value", f"{name} (image {rec['image_id']}) has area {rec['area']!r}, not a number",
                           rid, rec["image_id"])
        if rec.get("iscrowd", 0) not in (0, 1):
            return Problem("bad_value", f"{name} (image {rec['image_id']}) has iscrowd {rec['iscrowd']!r}, not 0 or 1",
                           rid, rec["image_id"])
    elif "name" in rec and not isinstance(rec["name"], str):
        return Problem("bad_value", f"{name} has name {rec['name']!r}, not a string", rid)
    return None


def escapes_root(file_name: str) -> bool:
    """Is `file_name` absolute, or does it climb out of the image folder with '..'?"""
    p = PurePosixPath(file_name.replace("\\", "/"))
    if p.is_absolute() or (len(file_name) > 1 and file_name[1] == ":"):
        return True
    return os.path.normpath(p.as_posix()).split("/")[0] == ".."


def read_image_size(path: Path) -> tuple[int, int]:
    """Decode the whole image (JPEGs at reduced DCT scale) and return its (width, height) as shown, EXIF
    orientation applied (as every kpnet command reads it); raises OSError or ValueError for unreadable,
    truncated or corrupt files."""
    return oriented_size(path, decode=True)


def _image_problems(rec: dict[str, Any], root: Path, decode: bool) -> Problem | None:
    path = root / rec["file_name"]
    rid = rec["id"]
    if not path.is_file():
        return Problem("missing_image", f"image id {rid}: file {rec['file_name']!r} not found in {root}", rid, rid)
    if not decode:
        return None
    try:
        width, height = read_image_size(path)
    except (OSError, ValueError, SyntaxError) as e:
        return Problem("unreadable_image", f"image id {rid}: {rec['file_name']!r} cannot be decoded ({e})", rid, rid)
    if (width, height) != (rec["width"], rec["height"]):
        return Problem("size_mismatch", f"image id {rid}: {rec['file_name']!r} is {width}x{height}, "
                                        f"the file says {rec['width']}x{rec['height']}", rid, rid)
    return None


def _box_problem(ann: dict[str, Any], image: dict[str, Any] | None) -> Problem | None:
    x, y, w, h = ann["bbox"]
    aid, iid = ann.get("id"), ann["image_id"]
    if w <= 0 or h <= 0:
        return Problem("degenerate_box", f"annotation id {aid} (image {iid}) has an empty box {ann['bbox']} "
                                         "(width or height <= 0)", aid, iid)
    if image is not None and (x < -BOX_EPS or y < -BOX_EPS or x + w > image["width"] + BOX_EPS
                              or y + h > image["height"] + BOX_EPS):
        return Problem("out_of_image_box", f"annotation id {aid} (image {iid}) has box {ann['bbox']} outside the "
                                           f"{image['width']}x{image['height']} image", aid, iid)
    return None


def _keypoint_problem(ann: dict[str, Any], category: dict[str, Any] | None) -> Problem | None:
    """COCO person keypoints: x, y, v triples (3 × the category's joint names, 51 for COCO's person), v in {0, 1, 2},
    and `num_keypoints`, when given, the count of labelled joints (v > 0), which COCOeval's keypoint scoring reads."""
    kps = ann["keypoints"]
    aid, iid = ann.get("id"), ann["image_id"]
    names = category.get("keypoints") if category is not None else None
    expected = 3 * len(names) if isinstance(names, list) else None
    if not (isinstance(kps, list) and kps and len(kps) % 3 == 0 and all(is_number(v) for v in kps)):
        return Problem("bad_value", f"annotation id {aid} (image {iid}) has keypoints that are not x, y, v triples of "
                                    "finite numbers", aid, iid)
    if expected is not None and len(kps) != expected:
        return Problem("bad_value", f"annotation id {aid} (image {iid}) has {len(kps)} keypoint numbers; its category "
                                    f"names {len(names)} joints, so {expected} are expected", aid, iid)
    bad_v = next((v for v in kps[2::3] if v not in (0, 1, 2)), None)
    if bad_v is not None:
        return Problem("bad_value", f"annotation id {aid} (image {iid}) has keypoint visibility {bad_v!r}, not 0, 1 or 2",
                       aid, iid)
    labelled = sum(1 for v in kps[2::3] if v > 0)
    if "num_keypoints" in ann and ann["num_keypoints"] != labelled:
        return Problem("bad_value", f"annotation id {aid} (image {iid}) has num_keypoints {ann['num_keypoints']!r} but "
                                    f"{labelled} labelled keypoints (v > 0)", aid, iid)
    return None


def _check(doc: Any, report: Report, images_dir: Path | None, image_check: str,
           required: Mapping[str, tuple[str, ...]] = REQUIRED_KEYS) -> None:
    """Fill `report` with the problems, counts and classes of a parsed COCO document.
    `image_check`: "decode" (open every image), "exists" (file present) or "none"."""
    structure = _structure_problems(doc, required)
    report.problems += structure
    if structure:
        report.fixable = False
        return
    has_categories = "categories" in doc
    valid: dict[str, list[dict[str, Any]]] = {}
    for section in ("categories", "images", "annotations"):
        valid[section] = []
        seen: set[int] = set()
        for index, rec in enumerate(doc.get(section, [])):
            p = _record_problem(section, index, rec, required)
            if p is not None:
                report.problems.append(p)
                continue
            if "id" not in rec:
                valid[section].append(rec)
                continue
            if rec["id"] in seen:
                what = {"images": "image", "annotations": "annotation", "categories": "category"}[section]
                report.problems.append(Problem(f"duplicate_{what}_id", f"{what} id {rec['id']} appears more than once",
                                               rec["id"], rec["id"] if section == "images" else rec.get("image_id")))
                continue
            seen.add(rec["id"])
            valid[section].append(rec)
    images = {im["id"]: im for im in valid["images"]}
    categories = {c["id"]: c for c in valid["categories"]}
    for im in valid["images"]:
        if "file_name" not in im:
            continue
        if escapes_root(im["file_name"]):
            report.problems.append(Problem("path_escape", f"image id {im['id']}: file_name {im['file_name']!r} "
                                                          "escapes the image folder", im["id"], im["id"]))
        elif images_dir is not None and image_check != "none":
            p = _image_problems(im, images_dir, image_check == "decode")
            if p is not None:
                report.problems.append(p)
    boxes_per_class: Counter[int] = Counter()
    images_with_boxes: set[int] = set()
    crowd = 0
    for ann in valid["annotations"]:
        aid, iid = ann.get("id"), ann["image_id"]
        if aid == 0:
            report.problems.append(Problem("annotation_id_zero", f"annotation id 0 (image {iid}): pycocotools "
                                                                 "cannot match a ground-truth id 0", aid, iid))
        if iid not in images:
            report.problems.append(Problem("unknown_image_id", f"annotation id {aid} refers to unknown image id {iid}",
                                           aid, iid))
        if has_categories and ann["category_id"] not in categories:
            report.problems.append(Problem("unknown_category_id", f"annotation id {aid} (image {iid}) refers to "
                                           f"unknown category id {ann['category_id']}", aid, iid))
        p = _box_problem(ann, images.get(iid))
        if p is not None:
            report.problems.append(p)
        if "keypoints" in ann and (p := _keypoint_problem(ann, categories.get(ann["category_id"]))) is not None:
            report.problems.append(p)
        boxes_per_class[ann["category_id"]] += 1
        images_with_boxes.add(iid)
        crowd += ann.get("iscrowd", 0) == 1
    report.classes = [{"id": c["id"], "name": c.get("name"), "boxes": boxes_per_class[c["id"]]}
                      for c in valid["categories"]]
    report.counts = {
        "images": len(doc["images"]),
        "boxes": len(doc["annotations"]),
        "classes": len(doc.get("categories", [])),
        "classes_with_boxes": sum(1 for c in report.classes if c["boxes"]),
        "crowd": crowd,
        "images_without_boxes": sum(1 for i in images if i not in images_with_boxes),
    }
    empty = [c["name"] for c in report.classes if not c["boxes"]]
    if empty:
        report.notes.append(f"{len(empty)} categor{'y has' if len(empty) == 1 else 'ies have'} no boxes: "
                            + ", ".join(empty))
    if 0 in images:
        report.notes.append("image ids start at 0: harmless to pycocotools; --fix renumbers them from 1")
    if 0 in categories:
        report.notes.append("a category has id 0: kept as is (category ids are never renumbered)")
    if crowd:
        report.notes.append(f"{crowd} crowd boxes (iscrowd 1): COCOeval ignores detections matched to them")


def _open(ann_path: str | Path, images_dir: str | Path | None) -> tuple[Path, Path | None, Report, Any, Problem | None]:
    """The annotation path, the image folder (which must exist when given), an empty report and the parsed file."""
    ann_path = Path(ann_path)
    root = Path(images_dir) if images_dir is not None else None
    if root is not None and not root.is_dir():
        raise KpnetError(root, "no such image folder")
    doc, problem = _read_json(ann_path)
    return ann_path, root, Report(str(ann_path), str(root) if root is not None else None), doc, problem


def validate_coco(ann_path: str | Path, images_dir: str | Path | None, check_images: bool = True) -> Report:
    """Report every problem in a COCO detection file; with `check_images`, decode every image."""
    ann_path, root, report, doc, problem = _open(ann_path, images_dir)
    if problem is not None:
        report.problems.append(problem)
        report.fixable = False
        return report
    _check(doc, report, root, "decode" if check_images else "none")
    return report


def load_coco_checked(ann_path: str | Path, images_dir: str | Path | None, *,
                      required: Mapping[str, tuple[str, ...]] = REQUIRED_KEYS,
                      tolerate: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Load a COCO file for training or evaluation, raising `KpnetError` (file + first culprit) on
    structural problems (FATAL_KINDS less `tolerate`); degenerate or out-of-image boxes are returned as
    they are, and a missing `iscrowd` becomes 0, COCO's default, which COCOeval reads. With `images_dir`,
    every image file must exist (they are not decoded here)."""
    ann_path, root, report, doc, problem = _open(ann_path, images_dir)
    if problem is not None:
        raise KpnetError(ann_path, problem.detail)
    _check(doc, report, root, "exists", required)
    fatal = [p for p in report.problems if p.kind in FATAL_KINDS - tolerate]
    if fatal:
        more = f" ({len(fatal)} such problems)" if len(fatal) > 1 else ""
        raise KpnetError(ann_path, f"{fatal[0].detail}{more}; `kpnet prepare-data coco --ann {ann_path} "
                                   f"--images {root or 'DIR'} --fix OUT` reports them all and repairs what it can")
    for ann in doc["annotations"]:
        ann.setdefault("iscrowd", 0)
        if "keypoints" in ann:  # COCOeval's keypoint scoring reads it
            ann.setdefault("num_keypoints", sum(1 for v in ann["keypoints"][2::3] if v > 0))
    renumber_id_zero(doc, ann_path)
    return doc


def renumber_id_zero(doc: dict[str, Any], source: str | Path) -> None:
    """Give an annotation with id 0 (which COCOeval can never match) the id after the largest, in memory, with a
    one-line warning; image ids are kept, so results still name the file's images."""
    zero = [ann for ann in doc["annotations"] if ann.get("id") == 0]
    if not zero:
        return
    new_id = max(ann.get("id", 0) for ann in doc["annotations"]) + 1
    zero[0]["id"] = new_id
    warn(source, f"annotation id 0 (image {zero[0]['image_id']}) renumbered to {new_id} in memory: pycocotools "
                 "cannot match a ground-truth id 0 (`kpnet prepare-data coco --fix` writes a renumbered copy)")


def coco_index(doc: dict[str, Any]) -> COCO:
    """A pycocotools COCO object over an already parsed document, built without its progress printing."""
    coco = COCO()
    coco.dataset = doc
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_gt(path: str | Path) -> COCO:
    """Ground truth for scoring (`eval --gt`, `fd-analysis`, `viz --gt`): `load_coco_checked` without images."""
    return coco_index(load_coco_checked(path, None))


def _clip_box(box: list[float], width: int, height: int) -> list[float]:
    x1, y1 = min(max(box[0], 0.0), width), min(max(box[1], 0.0), height)
    x2, y2 = min(max(box[0] + box[2], 0.0), width), min(max(box[1] + box[3], 0.0), height)
    return [x1, y1, x2 - x1, y2 - y1]


def _repair_annotation(index: int, rec: Any, changes: list[Problem]) -> Any:
    """Fill what `--fix` can supply: an id (renumbered anyway), an area from a valid box, and `num_keypoints` counted
    from the keypoints."""
    if not isinstance(rec, dict):
        return rec
    rec = dict(rec)
    if not is_int(rec.get("id")):
        changes.append(Problem("assigned_annotation_id", f"annotations[{index}] had id {rec.get('id')!r}; "
                               "it gets a new id", None, rec.get("image_id")))
        rec["id"] = -1 - index
    box = rec.get("bbox")
    if (not is_number(rec.get("area")) and isinstance(box, list) and len(box) == 4
            and all(is_number(v) for v in box)):
        changes.append(Problem("computed_area", f"annotations[{index}] had area {rec.get('area')!r}; "
                               "set to the box area", rec["id"], rec.get("image_id")))
        rec["area"] = float(box[2]) * float(box[3])
    kps = rec.get("keypoints")
    if isinstance(kps, list) and len(kps) % 3 == 0 and all(is_number(v) for v in kps) and "num_keypoints" in rec:
        labelled = sum(1 for v in kps[2::3] if v > 0)
        if rec["num_keypoints"] != labelled:
            changes.append(Problem("counted_keypoints", f"annotations[{index}] had num_keypoints "
                                   f"{rec['num_keypoints']!r}; set to its {labelled} labelled keypoints",
                                   rec["id"], rec.get("image_id")))
            rec["num_keypoints"] = labelled
    return rec


def fix_coco(ann_path: str | Path, images_dir: str | Path | None, out_path: str | Path,
             check_images: bool = True) -> FixResult:
    """Write a cleaned copy of a COCO file (atomically) and list every change.

    Records with missing keys or bad values, and later duplicates of an id, are dropped; images
    that escape the image folder, are missing or cannot be decoded are dropped with their
    annotations; wrong image sizes are replaced by the file's; annotations of unknown images or
    categories and empty boxes are dropped; boxes are clipped to the image (the area scaled by
    the kept fraction of the box); images and annotations are renumbered from 1 in file order
    with references updated. Category ids and every other key are kept.
    """
    ann_path, out_path = Path(ann_path), Path(out_path)
    root = Path(images_dir) if images_dir is not None else None
    if root is not None and not root.is_dir():
        raise KpnetError(root, "no such image folder")
    doc, problem = _read_json(ann_path)
    if problem is not None:
        raise KpnetError(ann_path, f"{problem.detail}; cannot fix a file that does not parse")
    structure = _structure_problems(doc)
    if structure:
        raise KpnetError(ann_path, f"{structure[0].detail}; cannot fix")
    changes: list[Problem] = []

    def keep_valid(section: str) -> list[dict[str, Any]]:
        kept, seen = [], set()
        for index, rec in enumerate(doc[section]):
            rec = _repair_annotation(index, rec, changes) if section == "annotations" else rec
            p = _record_problem(section, index, rec)
            if p is not None:
                changes.append(Problem(f"dropped_{p.kind}", f"dropped: {p.detail}", p.id, p.image_id))
            elif rec["id"] in seen and section != "annotations":  # annotation ids are renumbered anyway
                changes.append(Problem("dropped_duplicate_id", f"dropped a later {section} record with id {rec['id']}",
                                       rec["id"], rec["id"] if section == "images" else None))
            else:
                seen.add(rec["id"])
                kept.append(dict(rec))
        return kept

    categories = keep_valid("categories")
    images = []
    for im in keep_valid("images"):
        if escapes_root(im["file_name"]):
            changes.append(Problem("dropped_path_escape", f"dropped image id {im['id']}: file_name "
                                   f"{im['file_name']!r} escapes the image folder", im["id"], im["id"]))
            continue
        p = _image_problems(im, root, check_images) if root is not None else None
        if p is not None and p.kind == "size_mismatch" and root is not None:
            width, height = read_image_size(root / im["file_name"])
            changes.append(Problem("fixed_image_size", f"image id {im['id']}: width x height "
                                   f"{im['width']}x{im['height']} -> {width}x{height} (read from the file)",
                                   im["id"], im["id"]))
            im["width"], im["height"] = width, height
        elif p is not None:
            changes.append(Problem(f"dropped_{p.kind}", f"dropped: {p.detail}", im["id"], im["id"]))
            continue
        images.append(im)
    image_by_id = {im["id"]: im for im in images}
    category_ids = {c["id"] for c in categories}
    annotations = []
    for ann in keep_valid("annotations"):
        aid, iid = ann["id"], ann["image_id"]
        image = image_by_id.get(iid)
        if image is None:
            changes.append(Problem("dropped_unknown_image", f"dropped annotation id {aid}: image id {iid} unknown "
                                   "or dropped", aid, iid))
            continue
        if ann["category_id"] not in category_ids:
            changes.append(Problem("dropped_unknown_category", f"dropped annotation id {aid} (image {iid}): "
                                   f"category id {ann['category_id']} unknown", aid, iid))
            continue
        box = [float(v) for v in ann["bbox"]]
        clipped = _clip_box(box, image["width"], image["height"])
        if clipped[2] <= 0 or clipped[3] <= 0:
            changes.append(Problem("dropped_degenerate_box", f"dropped annotation id {aid} (image {iid}): box "
                                   f"{ann['bbox']} is empty inside the {image['width']}x{image['height']} image",
                                   aid, iid))
            continue
        if _box_problem(ann, image) is not None:
            ann["bbox"] = [round(v, 3) for v in clipped]
            ann["area"] = round(float(ann["area"]) * clipped[2] * clipped[3] / (box[2] * box[3]), 3)
            changes.append(Problem("clipped_box", f"annotation id {aid} (image {iid}): box {box} clipped to "
                                   f"{ann['bbox']}", aid, iid))
        annotations.append(ann)
    new_image_id = {im["id"]: i for i, im in enumerate(images, start=1)}
    changed_images = sum(old != new for old, new in new_image_id.items())
    if changed_images:
        changes.append(Problem("renumbered_images", f"{changed_images} of {len(images)} image ids changed: "
                               f"renumbered 1..{len(images)} in file order"))
    for im in images:
        im["id"] = new_image_id[im["id"]]
    changed_anns = 0
    for new, ann in enumerate(annotations, start=1):
        changed_anns += ann["id"] != new
        ann["id"], ann["image_id"] = new, new_image_id[ann["image_id"]]
    if changed_anns:
        changes.append(Problem("renumbered_annotations", f"{changed_anns} of {len(annotations)} annotation ids "
                               f"changed: renumbered 1..{len(annotations)} in file order"))
    fixed = {k: v for k, v in doc.items() if k not in SECTIONS}
    fixed.update(images=images, annotations=annotations, categories=categories)
    atomic_write_json(out_path, fixed)
    return FixResult(str(out_path), changes, validate_coco(out_path, root, check_images))


def require_segmentations(doc: dict[str, Any], path: Path) -> None:
    """Every annotation carries an instance mask (polygons or RLE), as a mask head needs; else one line naming it."""
    for ann in doc["annotations"]:
        seg = ann.get("segmentation")
        polygons_ok = isinstance(seg, list) and len(seg) > 0 and all(
            isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(is_number(v) for v in p) for p in seg)
        rle_ok = isinstance(seg, dict) and "counts" in seg and "size" in seg
        if not (polygons_ok or rle_ok):
            raise KpnetError(path, f"annotation id {ann.get('id')} has no usable 'segmentation' (polygons of >= 3 "
                                   f"points or an RLE), which model.mask needs on every annotation; got {str(seg)[:60]}")
