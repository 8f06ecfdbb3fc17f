"""COCO scoring (bbox, segm for instance masks, keypoints for poses), the one place it lives: loading results with errors
that name the culprit (ground truth comes through `kpnet.data.validate.load_gt`), the 12 COCO stats
(the 10 OKS stats for keypoints), the triplet paper's false-discovery rates (Tables 1 and 3) and precision-recall plots.

Boxes are scored by `kpnet.bbox_eval.BoxCOCOeval`, COCOeval's evaluate/accumulate vectorised over arrays (its matching
subtleties — crowd regions, area ranges, ignored detections, ties — reproduced bit for bit and held to pycocotools by
tests); masks and keypoints by faster-coco-eval's or pycocotools' COCOeval as is (identical numbers). Results files
are read in large `json.loads` batches checked as arrays; a batch with anything unusual is checked result by result, so an
error still names the culprit.
"""

from __future__ import annotations

import array
import contextlib
import gc
import io
import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from pycocotools.coco import COCO

from kpnet.bbox_eval import BoxCOCOeval, BoxResults, ranks_in_runs
from kpnet.data.validate import coco_index, is_int, is_number
from kpnet.errors import KpnetError

Backend = Literal["auto", "kpnet", "pycocotools", "faster"]
BACKENDS: tuple[str, ...] = get_args(Backend)
IouType = Literal["bbox", "segm", "keypoints"]
IOU_TYPES: tuple[str, ...] = get_args(IouType)

BBOX_KEYS: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)
# COCOeval's keypoint summary (OKS with COCO's 17 sigmas, maxDets 20): no small range for keypoints.
KEYPOINT_KEYS: tuple[str, ...] = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
FD_KEYS: tuple[str, ...] = ("FD", "FD5", "FD25", "FD50", "FD_S", "FD_M", "FD_L")
# Triplet paper (CenterNet: Keypoint Triplets) Tables 1/3: IoU 0.05:0.05:0.50, maxDets 100.
FD_IOU_THRESHOLDS = np.linspace(0.05, 0.5, 10)
AREA_LABELS: tuple[str, ...] = ("all", "small", "medium", "large")  # COCOeval's areaRng order

# COCOeval's largest maxDets here: a result ranked below it in its image and class never counts, so
# keeping only the best MAX_DETS leaves every score as it is and a file of millions fits in memory.
MAX_DETS = 100
MAX_PIXELS = 1e7  # a box coordinate or size beyond this is a unit or parsing error, not an image
_CHUNK = 1 << 20
_RESULTS_LIST = "a COCO results list [{image_id, category_id, bbox, score}, ...]"


def _quiet(fn: Any, *args: Any) -> Any:
    """Call `fn` with pycocotools' progress printing silenced."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; KpnetError naming the file when it is missing or malformed."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise KpnetError(path, "no such file") from None
    except IsADirectoryError:
        raise KpnetError(path, "is a directory, expected a JSON file") from None
    except json.JSONDecodeError as e:
        raise KpnetError(path, f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise KpnetError(path, "not a UTF-8 text file") from None


def _check_box(source: str | Path, where: str, bbox: Any) -> None:
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
        raise KpnetError(source, f"{where}: 'bbox' must be [x, y, w, h] of 4 finite numbers, got {bbox!r}")
    if bbox[2] < 0 or bbox[3] < 0:
        raise KpnetError(source, f"{where}: 'bbox' {bbox!r} has a negative width or height")


def iter_json_list(path: str | Path, what: str = "a JSON list") -> Iterator[Any]:
    """The items of a JSON file's top-level list, parsed one at a time; any other JSON value is refused as not `what`."""
    path = Path(path)
    decoder = json.JSONDecoder()
    try:
        f = open(path, encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        read_json(path)  # raises the one-line error
        raise
    with f:
        buf, pos, eof = "", 0, False
        offset = lines = line_start = 0  # characters dropped from buf, the newlines among them, the last line's start

        def fill() -> bool:
            nonlocal buf, pos, eof, offset, lines, line_start
            if eof:
                return False
            try:
                chunk = f.read(_CHUNK)
            except UnicodeDecodeError:
                raise KpnetError(path, "not a UTF-8 text file") from None
            lines += buf.count("\n", 0, pos)
            if (k := buf.rfind("\n", 0, pos)) >= 0:
                line_start = offset + k + 1
            offset += pos
            buf, pos, eof = buf[pos:] + chunk, 0, not chunk
            return bool(chunk)

        def malformed(e: json.JSONDecodeError | None, what: str) -> KpnetError:
            at = e.pos if e is not None else pos
            line = lines + buf.count("\n", 0, at) + 1
            k = buf.rfind("\n", 0, at)
            column = offset + at - (offset + k + 1 if k >= 0 else line_start) + 1
            return KpnetError(path, f"malformed JSON at line {line} column {column}: {e.msg if e else what}")

        def next_char() -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or not fill():
                    return buf[pos] if pos < len(buf) else ""

        if next_char() != "[":
            f.close()
            other = read_json(path)  # raises on malformed JSON
            raise KpnetError(path, f"expected {what}, got {type(other).__name__}")
        pos += 1
        if next_char() == "]":
            pos += 1
        else:
            while True:
                next_char()
                while True:
                    try:
                        item, end = decoder.raw_decode(buf, pos)
                        if end < len(buf) or eof:
                            break
                    except json.JSONDecodeError as e:
                        if eof:
                            raise malformed(e, "") from None
                    fill()
                pos = end
                yield item
                sep = next_char()
                if sep not in ",]":
                    raise malformed(None, "Expecting ',' delimiter" if sep else "unexpected end of file")
                pos += 1
                if sep == "]":
                    break
        if next_char():
            raise malformed(None, "Extra data")


def _mask_rle(source: str | Path, where: str, seg: Any, image: dict[str, Any]) -> dict[str, Any]:
    """A result's `segmentation` as a compressed COCO RLE of its image's size (what COCOeval's segm reads)."""
    from pycocotools import mask as mask_utils

    size = [image.get("height"), image.get("width")]
    if not (isinstance(seg, dict) and isinstance(seg.get("counts"), (str, list)) and seg.get("size") == size):
        raise KpnetError(source, f"{where}: 'segmentation' must be a COCO RLE {{size: {size}, counts}} of image "
                                 f"{image['id']}")
    return mask_utils.frPyObjects(seg, *size) if isinstance(seg["counts"], list) else seg


def _check_result(source: str | Path, i: int, d: Any, images: dict[int, Any], cat_ids: set[int]
                  ) -> tuple[list[float], dict[str, Any] | None]:
    """A result's box and, for an instance mask, its RLE (the box then defaults to the mask's, as `loadRes`)."""
    where = f"result [{i}]"
    if not isinstance(d, dict):
        raise KpnetError(source, f"{where}: expected an object, got {type(d).__name__}")
    for key in ("image_id", "category_id"):
        if not is_int(d.get(key)):
            raise KpnetError(source, f"{where}: missing integer '{key}'")
    score = d.get("score")
    if not is_number(score):
        raise KpnetError(source, f"{where}: missing finite numeric 'score'")
    if not 0 <= score <= 1:
        raise KpnetError(source, f"{where}: score {score!r} is outside [0, 1]")
    if d["image_id"] not in images:
        raise KpnetError(source, f"{where}: image_id {d['image_id']} is not in the ground truth")
    if d["category_id"] not in cat_ids:
        raise KpnetError(source, f"{where}: category_id {d['category_id']} is not a ground-truth category")
    rle = None
    box = d.get("bbox")
    if "keypoints" in d:
        kps = d["keypoints"]
        if not (isinstance(kps, list) and kps and len(kps) % 3 == 0 and all(is_number(v) for v in kps)):
            raise KpnetError(source, f"{where}: 'keypoints' must be a list of x, y, v triples of finite numbers")
        if any(abs(v) > MAX_PIXELS for v in kps):
            raise KpnetError(source, f"{where}: 'keypoints' reach beyond {MAX_PIXELS:.0e} pixels")
        if "bbox" not in d:  # pycocotools' loadRes: the box of the keypoints' extent
            xs, ys = kps[0::3], kps[1::3]
            box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    if "segmentation" in d:
        from pycocotools import mask as mask_utils

        rle = _mask_rle(source, where, d["segmentation"], images[d["image_id"]])
        box = box if "bbox" in d else mask_utils.toBbox(rle).tolist()
    _check_box(source, where, box)
    if any(abs(v) > MAX_PIXELS for v in box):
        raise KpnetError(source, f"{where}: 'bbox' {box!r} reaches beyond {MAX_PIXELS:.0e} pixels")
    return box, rle


def _best_per_image_and_class(image: np.ndarray, category: np.ndarray, score: np.ndarray, keep: int) -> np.ndarray:
    """Indices (ascending) of the `keep` best-scoring results of each (image, category), ties to the earlier."""
    n = len(score)
    _, image_idx = np.unique(image, return_inverse=True)
    _, category_idx = np.unique(category, return_inverse=True)
    group = image_idx.ravel() * (int(category_idx.max(initial=0)) + 1) + category_idx.ravel()
    if np.bincount(group).max(initial=0) <= keep:
        return np.arange(n)
    order = np.lexsort((np.arange(n), -score, group))
    return np.sort(order[ranks_in_runs(group[order]) < keep])


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused (parsed results hold no cycles; each of the collections that half a
    million new dicts and lists would set off walks the whole heap: a third of the parse time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _NotFast(Exception):
    """The results file is not laid out for `_fast_batches`; `iter_json_list` reads it (and names any error)."""


def _fast_batches(path: Path) -> Iterator[list[Any]]:
    """The top-level list of a JSON file in batches, each one `json.loads` of about 4 * _CHUNK characters cut after an
    item's closing brace (the cut stands only where the text before it parses as whole items and a comma follows)."""
    try:
        f = open(path, encoding="utf-8")
    except OSError:
        raise _NotFast from None
    with f:
        try:
            buf = f.read(4 * _CHUNK).lstrip()
            if not buf.startswith("["):
                raise _NotFast
            buf, eof = buf[1:], False
            while True:
                if not eof:
                    more = f.read(4 * _CHUNK)
                    buf, eof = buf + more, not more
                if eof:
                    items = json.loads("[" + buf)
                    if items:
                        yield items
                    return
                cut = buf.rfind("}")
                for _ in range(4):
                    sep = len(buf) - len(buf[cut + 1:].lstrip()) if cut >= 0 else -1
                    if 0 <= sep < len(buf) and buf[sep] == ",":
                        try:
                            items = json.loads("[" + buf[:cut + 1] + "]")
                            break
                        except ValueError:
                            pass
                    cut = buf.rfind("}", 0, max(cut, 0))
                else:
                    continue  # no cut found: read on, the next chunk may end the item
                yield items
                buf = buf[sep + 1:]
        except (ValueError, UnicodeDecodeError):
            raise _NotFast from None


def _batched(items: Iterable[Any]) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == 1 << 16:
            yield batch
            batch = []
    if batch:
        yield batch


def _numbers_only(values: Iterable[Any]) -> bool:
    return set(map(type, values)) <= {int, float}


def _boxes_of_batch(items: list[Any], img_ids: np.ndarray, cat_ids: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray] | None:
    """A batch of plain box results checked as arrays: (image and category ids, [x, y, w, h, score] rows); None when
    any result needs a closer look (`_check_result` then names the culprit) or carries a mask or keypoints."""
    if set(map(type, items)) != {dict} or any("segmentation" in d or "keypoints" in d for d in items):
        return None
    image = [d.get("image_id") for d in items]
    category = [d.get("category_id") for d in items]
    score = [d.get("score") for d in items]
    bbox = [d.get("bbox") for d in items]
    if (set(map(type, image)) != {int} or set(map(type, category)) != {int} or not _numbers_only(score)
            or set(map(type, bbox)) != {list} or set(map(len, bbox)) != {4}
            or not _numbers_only(itertools.chain.from_iterable(bbox))):
        return None
    try:
        ids = np.array([image, category], np.int64).T
        values = np.concatenate([np.array(bbox, np.float64), np.array(score, np.float64)[:, None]], 1)
    except OverflowError:
        return None
    with np.errstate(invalid="ignore"):
        ok = (np.isfinite(values).all() and (values[:, 2:4] >= 0).all() and (np.abs(values[:, :4]) <= MAX_PIXELS).all()
              and (values[:, 4] >= 0).all() and (values[:, 4] <= 1).all()
              and np.isin(ids[:, 0], img_ids).all() and np.isin(ids[:, 1], cat_ids).all())
    return (ids, values) if ok else None


class LoadedResults(COCO):
    """Loaded results: `boxes` (the arrays kpnet's bbox scoring reads) and pycocotools' COCO index over the same
    annotations (ids = position in the results + 1), built on first use, since half a million dicts cost seconds."""

    _INDEX = frozenset({"dataset", "anns", "cats", "imgs", "imgToAnns", "catToImgs"})

    def __init__(self, gt: COCO, boxes: BoxResults, masks: dict[int, dict[str, Any]],
                 keypoints: dict[int, list[float]]) -> None:  # COCO.__init__ is not called: `_build` indexes
        self.boxes, self.masks, self.keypoints, self._gt = boxes, masks, keypoints, gt

    def __getattr__(self, name: str) -> Any:
        if name not in LoadedResults._INDEX:
            raise AttributeError(name)
        b = self.boxes
        annotations = [{"id": i + 1, "image_id": image, "category_id": category, "bbox": box, "area": area,
                        "score": score, "iscrowd": 0}
                       for i, image, category, box, area, score in zip(
                           b.order.tolist(), b.image_id.tolist(), b.category_id.tolist(), b.bbox.tolist(),
                           b.area.tolist(), b.score.tolist())]
        for ann in annotations:
            if (kps := self.keypoints.get(ann["id"] - 1)) is not None:
                ann["keypoints"] = kps
            if (rle := self.masks.get(ann["id"] - 1)) is not None:
                ann["segmentation"] = rle
        index = coco_index({"images": list(self._gt.dataset["images"]),
                            "categories": list(self._gt.dataset["categories"]), "annotations": annotations})
        self.__dict__.update({key: getattr(index, key) for key in LoadedResults._INDEX})
        return self.__dict__[name]


def load_dets(dets: str | Path | Sequence[dict[str, Any]], gt: COCO, source: str | None = None) -> LoadedResults:
    """COCO results (a JSON file, streamed, or a list of dicts) over `gt`'s images: the MAX_DETS best per image and
    class.

    A result with a `segmentation` (COCO RLE) is an instance mask: its area is the mask's, and its box, when
    absent, the mask's bounding box, as pycocotools' `loadRes` does. A result's `keypoints` are kept (a pose);
    its box, when absent, is the keypoints' extent, as `loadRes` does.
    """
    if isinstance(dets, (str, Path)):
        try:
            return _load_batches(_fast_batches(Path(dets)), gt, source or str(dets))
        except _NotFast:
            return _load_batches(_batched(iter_json_list(dets, _RESULTS_LIST)), gt, source or str(dets))
    if not isinstance(dets, list):
        raise KpnetError(source or "detections", f"expected {_RESULTS_LIST}, got {type(dets).__name__}")
    return _load_batches(_batched(dets), gt, source or "detections")


def _load_batches(batches: Iterable[list[Any]], gt: COCO, source: str) -> LoadedResults:
    img_ids, cat_ids = np.array(sorted(gt.imgs), np.int64), np.array(sorted(gt.getCatIds()), np.int64)
    cat_set = set(cat_ids.tolist())
    id_parts, value_parts = [], []
    masks: dict[int, dict[str, Any]] = {}
    keypoints: dict[int, list[float]] = {}
    start = 0
    with _gc_paused():  # the batches are parsed as this loop pulls them
        for batch in batches:
            checked = _boxes_of_batch(batch, img_ids, cat_ids)
            if checked is None:
                ids, floats = array.array("q"), array.array("d")
                for i, d in enumerate(batch, start):
                    box, rle = _check_result(source, i, d, gt.imgs, cat_set)
                    if rle is not None:
                        masks[i] = rle
                    if "keypoints" in d:
                        keypoints[i] = d["keypoints"]
                    ids.extend((d["image_id"], d["category_id"]))
                    floats.extend((*box, d["score"]))
                checked = np.frombuffer(ids, np.int64).reshape(-1, 2), np.frombuffer(floats, np.float64).reshape(-1, 5)
            id_parts.append(checked[0])
            value_parts.append(checked[1])
            start += len(batch)
    pairs = np.concatenate(id_parts) if id_parts else np.zeros((0, 2), np.int64)
    values = np.concatenate(value_parts) if value_parts else np.zeros((0, 5))
    keep = _best_per_image_and_class(pairs[:, 0], pairs[:, 1], values[:, 4], MAX_DETS) if len(pairs) else pairs[:0, 0]
    area = values[keep, 2] * values[keep, 3]
    if masks:
        from pycocotools import mask as mask_utils

        for j, i in enumerate(keep.tolist()):
            if (rle := masks.get(i)) is not None:
                area[j] = float(mask_utils.area(rle))
    kept = set(keep.tolist()) if masks or keypoints else set()
    boxes = BoxResults(pairs[keep, 0], pairs[keep, 1], values[keep, :4], values[keep, 4], area, keep.astype(np.int64))
    return LoadedResults(gt, boxes, {i: m for i, m in masks.items() if i in kept},
                         {i: k for i, k in keypoints.items() if i in kept})


def _cocoeval_class(backend: Backend, iou_type: IouType = "bbox") -> Any:
    """The COCOeval to run: kpnet's vectorised one for boxes (`auto`, `kpnet`), else faster-coco-eval where it is
    importable (`auto`, `faster`), else pycocotools."""
    if backend not in BACKENDS:
        raise KpnetError("--backend", f"unknown COCO eval backend {backend!r} ({', '.join(BACKENDS)})")
    if backend == "kpnet" and iou_type != "bbox":
        raise KpnetError("--backend", f"the kpnet backend scores boxes only, not {iou_type}")
    if backend in ("auto", "kpnet") and iou_type == "bbox":
        return BoxCOCOeval
    if backend in ("auto", "faster"):
        try:
            from faster_coco_eval import COCOeval_faster
        except ImportError:
            if backend == "faster":
                raise KpnetError("--backend", "faster-coco-eval is not installed "
                                              "(pip install faster-coco-eval)") from None
        else:
            return COCOeval_faster
    from pycocotools.cocoeval import COCOeval

    return COCOeval


def _faster_index(coco: COCO) -> Any:
    """The same document indexed by faster-coco-eval's COCO class."""
    from faster_coco_eval import COCO as FasterCOCO

    return _quiet(FasterCOCO, coco.dataset)


def has_masks(dt: COCO) -> bool:
    """Whether loaded results carry instance masks (so `segm` can be scored)."""
    if isinstance(dt, LoadedResults):
        return bool(dt.masks)
    return any("segmentation" in a for a in dt.dataset["annotations"])


def has_keypoints(dt: COCO) -> bool:
    """Whether loaded results carry keypoints (so `keypoints` can be scored)."""
    if isinstance(dt, LoadedResults):
        return bool(dt.keypoints)
    return any("keypoints" in a for a in dt.dataset["annotations"])


def _check_gt_keypoints(gt: COCO) -> None:
    missing = next((a for a in gt.dataset["annotations"] if "keypoints" not in a), None)
    if missing is not None:
        raise KpnetError("--iou-type", f"keypoints needs ground-truth keypoints; annotation id {missing.get('id')} has "
                                       "no 'keypoints'")


def _check_gt_masks(gt: COCO) -> None:
    missing = next((a for a in gt.dataset["annotations"] if "segmentation" not in a), None)
    if missing is not None:
        raise KpnetError("--iou-type", f"segm needs ground-truth masks; annotation id {missing.get('id')} has no "
                                       "'segmentation'")


def run_cocoeval(gt: COCO, dt: COCO, backend: Backend = "auto",
                 iou_thresholds: Sequence[float] | None = None,
                 max_dets: Sequence[int] | None = None, iou_type: IouType = "bbox") -> Any:
    """Run COCOeval (bbox, segm or keypoints: OKS with COCO's sigmas) evaluate + accumulate quietly; the object
    holds `eval['precision']` [T,R,K,A,M]."""
    if iou_type not in IOU_TYPES:
        raise KpnetError("--iou-type", f"unknown IoU type {iou_type!r}; valid: {', '.join(IOU_TYPES)}")
    if iou_type == "segm":
        _check_gt_masks(gt)
        if not has_masks(dt):
            raise KpnetError("--iou-type", "segm needs results with 'segmentation' masks")
    if iou_type == "keypoints":
        _check_gt_keypoints(gt)
        if not has_keypoints(dt):
            raise KpnetError("--iou-type", "keypoints needs results with 'keypoints'")
    cocoeval_class = _cocoeval_class(backend, iou_type)
    if cocoeval_class is BoxCOCOeval:
        boxes = dt.boxes if isinstance(dt, LoadedResults) else BoxResults.from_annotations(dt.dataset["annotations"])
        cocoeval = BoxCOCOeval(gt, dt, boxes)
    else:
        if iou_type == "keypoints" and cocoeval_class.__module__.startswith("faster_coco_eval"):
            gt, dt = _faster_index(gt), _faster_index(dt)  # its keypoint path reads faster-coco-eval's own index
        cocoeval = cocoeval_class(gt, dt, iou_type)
    if iou_thresholds is not None:
        cocoeval.params.iouThrs = np.asarray(iou_thresholds, dtype=np.float64)
    if max_dets is not None:
        cocoeval.params.maxDets = list(max_dets)
    _quiet(cocoeval.evaluate)
    _quiet(cocoeval.accumulate)
    return cocoeval


def evaluate(gt: COCO, dt: COCO, backend: Backend = "auto", iou_type: IouType = "bbox") -> Any:
    """The standard COCO evaluation (bbox, segm for masks, keypoints for poses), summarised: `.stats` holds the 12
    stats (10 for keypoints)."""
    cocoeval = run_cocoeval(gt, dt, backend, iou_type=iou_type)
    _quiet(cocoeval.summarize)
    return cocoeval


def stats_dict(cocoeval: Any) -> dict[str, float]:
    """The 12 COCO stats (10 for keypoints) of a summarised COCOeval under kpnet's stable keys (-1 where undefined)."""
    keys = KEYPOINT_KEYS if cocoeval.params.iouType == "keypoints" else BBOX_KEYS
    return {key: float(v) for key, v in zip(keys, cocoeval.stats[:len(keys)], strict=True)}


def bbox_stats(gt: COCO, dt: COCO, backend: Backend = "auto") -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl of `dt` against `gt`."""
    return stats_dict(evaluate(gt, dt, backend))


def _fd(precision: np.ndarray) -> float | None:
    """1 - mean precision over the valid (> -1) entries; None when no entry is valid."""
    valid = precision[precision > -1]
    return float(1.0 - valid.mean()) if valid.size else None


def fd_rates(gt: COCO, dt: COCO, backend: Backend = "auto") -> dict[str, float | None]:
    """False-discovery rates FD = 1 - AP at IoU 0.05:0.05:0.5, maxDets 100 (triplet paper Tables 1, 3).

    FD averages over thresholds, recalls and classes (area all); FD5/FD25/FD50 at IoU 0.05/0.25/0.5;
    FD_S/M/L over all ten thresholds per COCO area range. None where no entry is defined.
    """
    cocoeval = run_cocoeval(gt, dt, backend, FD_IOU_THRESHOLDS, (100,))
    precision = cocoeval.eval["precision"][..., -1]  # [T, R, K, A] at maxDets 100
    thresholds = np.asarray(cocoeval.params.iouThrs)

    def at(iou: float) -> int:
        return int(np.argmin(np.abs(thresholds - iou)))

    return {
        "FD": _fd(precision[:, :, :, 0]),
        "FD5": _fd(precision[at(0.05), :, :, 0]),
        "FD25": _fd(precision[at(0.25), :, :, 0]),
        "FD50": _fd(precision[at(0.5), :, :, 0]),
        "FD_S": _fd(precision[:, :, :, 1]),
        "FD_M": _fd(precision[:, :, :, 2]),
        "FD_L": _fd(precision[:, :, :, 3]),
    }


def _mean_pr(precision: np.ndarray) -> np.ndarray:
    """Mean precision over classes (and thresholds) at each recall level, -1 entries excluded."""
    valid = precision > -1
    total = np.where(valid, precision, 0.0).sum(axis=tuple(i for i in range(precision.ndim) if i != 1))
    count = valid.sum(axis=tuple(i for i in range(precision.ndim) if i != 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def plot_pr_curves(cocoeval: Any, out_dir: str | Path) -> list[Path]:
    """Write precision-recall curves of an accumulated bbox COCOeval (area all / maxDets 100) as PNG:
    `pr_by_iou.png` (IoU 0.5, 0.75, mean over 0.5:0.95) and `pr_by_size.png` (all/small/medium/large)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kpnet.io import atomic_savefig

    out_dir = Path(out_dir)
    precision = np.asarray(cocoeval.eval["precision"])[..., -1]  # [T, R, K, A]
    recall = np.asarray(cocoeval.params.recThrs)
    thresholds = np.asarray(cocoeval.params.iouThrs)

    def ap(curve: np.ndarray) -> float:
        return float(np.nanmean(curve)) if np.isfinite(curve).any() else float("nan")

    written: list[Path] = []
    fig, ax = plt.subplots(figsize=(6, 5))
    for iou in (0.5, 0.75):
        t = np.flatnonzero(np.isclose(thresholds, iou))
        if t.size:
            curve = _mean_pr(precision[t[0], :, :, 0][None])
            ax.plot(recall, curve, label=f"IoU {iou:.2f} (AP {ap(curve):.3f})")
    curve = _mean_pr(precision[:, :, :, 0])
    ax.plot(recall, curve, label=f"IoU {thresholds[0]:.2f}:{thresholds[-1]:.2f} mean (AP {ap(curve):.3f})")
    _style_pr(ax, "Precision-recall by IoU threshold (area all, maxDets 100)")
    written.append(atomic_savefig(out_dir / "pr_by_iou.png", fig, dpi=100))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 5))
    for a, label in enumerate(AREA_LABELS):
        curve = _mean_pr(precision[:, :, :, a])
        if np.isfinite(curve).any():
            ax.plot(recall, curve, label=f"{label} (AP {ap(curve):.3f})")
    _style_pr(ax, f"Precision-recall by object size (IoU {thresholds[0]:.2f}:{thresholds[-1]:.2f})")
    written.append(atomic_savefig(out_dir / "pr_by_size.png", fig, dpi=100))
    plt.close(fig)
    return written


def _style_pr(ax: Any, title: str) -> None:
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
