"""COCO scoring (bbox, segm for instance masks, keypoints for poses), the one place it lives: loading results with errors
that name the culprit (ground truth comes through `kpnet.data.validate.load_gt`), the 12 COCO stats
(pycocotools or faster-coco-eval, identical numbers; the 10 OKS stats for keypoints), the triplet paper's false-discovery rates (Tables
1 and 3) and precision-recall plots.

Both backends' COCOeval is used as is: its matching (crowd regions, area ranges, ignored
detections, ties) has subtleties a hand-written matcher gets wrong.
"""

from __future__ import annotations

import array
import contextlib
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pycocotools.coco import COCO

from kpnet.data.validate import coco_index, is_int, is_number
from kpnet.errors import KpnetError

Backend = Literal["auto", "pycocotools", "faster"]
IouType = Literal["bbox", "segm", "keypoints"]
IOU_TYPES: tuple[str, ...] = ("bbox", "segm", "keypoints")

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
    _, group = np.unique(np.stack([image, category], axis=1), axis=0, return_inverse=True)
    order = np.lexsort((np.arange(n), -score, group.ravel()))
    sorted_group = group.ravel()[order]
    starts = np.flatnonzero(np.r_[True, sorted_group[1:] != sorted_group[:-1]])
    rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    return np.sort(order[rank < keep])


def load_dets(dets: str | Path | Sequence[dict[str, Any]], gt: COCO, source: str | None = None) -> COCO:
    """COCO results (a JSON file, streamed, or a list of dicts) over `gt`'s images: the MAX_DETS best per image and class.

    A result with a `segmentation` (COCO RLE) is an instance mask: its area is the mask's, and its box, when
    absent, the mask's bounding box, as pycocotools' `loadRes` does. A result's `keypoints` are kept (a pose);
    its box, when absent, is the keypoints' extent, as `loadRes` does.
    """
    entries: Iterable[Any]
    if isinstance(dets, (str, Path)):
        source = source or str(dets)
        entries = iter_json_list(dets, _RESULTS_LIST)
    else:
        source = source or "detections"
        if not isinstance(dets, list):
            raise KpnetError(source, f"expected {_RESULTS_LIST}, got {type(dets).__name__}")
        entries = dets
    cat_ids = set(gt.getCatIds())
    ids, floats = array.array("q"), array.array("d")
    masks: dict[int, dict[str, Any]] = {}
    keypoints: dict[int, list[float]] = {}
    for i, d in enumerate(entries):
        box, rle = _check_result(source, i, d, gt.imgs, cat_ids)
        if rle is not None:
            masks[i] = rle
        if "keypoints" in d:
            keypoints[i] = d["keypoints"]
        ids.extend((d["image_id"], d["category_id"]))
        floats.extend((*box, d["score"]))
    pairs = np.frombuffer(ids, np.int64).reshape(-1, 2)
    values = np.frombuffer(floats, np.float64).reshape(-1, 5)
    keep = _best_per_image_and_class(pairs[:, 0], pairs[:, 1], values[:, 4], MAX_DETS) if len(pairs) else []
    annotations = [{"id": int(i) + 1, "image_id": int(pairs[i, 0]), "category_id": int(pairs[i, 1]),
                    "bbox": values[i, :4].tolist(), "area": float(values[i, 2] * values[i, 3]),
                    "score": float(values[i, 4]), "iscrowd": 0} for i in keep]
    for ann in annotations:
        if (kps := keypoints.get(ann["id"] - 1)) is not None:
            ann["keypoints"] = kps
    if masks:
        from pycocotools import mask as mask_utils

        for ann in annotations:
            if (rle := masks.get(ann["id"] - 1)) is not None:
                ann.update(segmentation=rle, area=float(mask_utils.area(rle)))
    return coco_index({"images": list(gt.dataset["images"]),
                            "categories": list(gt.dataset["categories"]),
                            "annotations": annotations})


def _cocoeval_class(backend: Backend) -> Any:
    if backend not in ("auto", "pycocotools", "faster"):
        raise KpnetError("--backend", f"unknown COCO eval backend {backend!r} (auto, pycocotools, faster)")
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
    return any("segmentation" in a for a in dt.dataset["annotations"])


def has_keypoints(dt: COCO) -> bool:
    """Whether loaded results carry keypoints (so `keypoints` can be scored)."""
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
    cocoeval_class = _cocoeval_class(backend)
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
