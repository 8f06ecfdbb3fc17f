"""COCO bbox scoring, the one place it lives: loading results with errors that name the culprit (ground
truth comes through `kpnet.data.validate.load_gt`), the 12 COCO stats (pycocotools or faster-coco-eval, identical numbers), the
triplet paper's false-discovery rates (Tables 1 and 3) and precision-recall plots.

Both backends' COCOeval is used as is: its matching (crowd regions, area ranges, ignored
detections, ties) has subtleties a hand-written matcher gets wrong.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pycocotools.coco import COCO

from kpnet.data.validate import coco_index, is_int, is_number
from kpnet.errors import KpnetError

Backend = Literal["auto", "pycocotools", "faster"]
IouType = Literal["bbox", "segm"]
IOU_TYPES: tuple[str, ...] = ("bbox", "segm")

BBOX_KEYS: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)
FD_KEYS: tuple[str, ...] = ("FD", "FD5", "FD25", "FD50", "FD_S", "FD_M", "FD_L")
# Triplet paper (CenterNet: Keypoint Triplets) Tables 1/3: IoU 0.05:0.05:0.50, maxDets 100.
FD_IOU_THRESHOLDS = np.linspace(0.05, 0.5, 10)
AREA_LABELS: tuple[str, ...] = ("all", "small", "medium", "large")  # COCOeval's areaRng order


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


def _mask_rle(source: str | Path, where: str, seg: Any, image: dict[str, Any]) -> dict[str, Any]:
    """A result's `segmentation` as a compressed COCO RLE of its image's size (what COCOeval's segm reads)."""
    from pycocotools import mask as mask_utils

    size = [image.get("height"), image.get("width")]
    if not (isinstance(seg, dict) and isinstance(seg.get("counts"), (str, list)) and seg.get("size") == size):
        raise KpnetError(source, f"{where}: 'segmentation' must be a COCO RLE {{size: {size}, counts}} of image "
                                 f"{image['id']}")
    return mask_utils.frPyObjects(seg, *size) if isinstance(seg["counts"], list) else seg


def load_dets(dets: str | Path | Sequence[dict[str, Any]], gt: COCO, source: str | None = None) -> COCO:
    """COCO results (a JSON file or a list of dicts) as a COCO object over `gt`'s images; [] is valid.

    A result with a `segmentation` (COCO RLE) is an instance mask: its area is the mask's, and its box, when
    absent, the mask's bounding box, as pycocotools' `loadRes` does.
    """
    if isinstance(dets, (str, Path)):
        source = source or str(dets)
        entries = read_json(dets)
    else:
        source = source or "detections"
        entries = dets
    if not isinstance(entries, list):
        raise KpnetError(source, f"expected a COCO results list [{{image_id, category_id, bbox, score}}, ...], "
                                 f"got {type(entries).__name__}")
    image_ids = set(gt.getImgIds())
    cat_ids = set(gt.getCatIds())
    annotations = []
    for i, d in enumerate(entries):
        where = f"result [{i}]"
        if not isinstance(d, dict):
            raise KpnetError(source, f"{where}: expected an object, got {type(d).__name__}")
        for key in ("image_id", "category_id"):
            if not is_int(d.get(key)):
                raise KpnetError(source, f"{where}: missing integer '{key}'")
        if not is_number(d.get("score")):
            raise KpnetError(source, f"{where}: missing finite numeric 'score'")
        if d["image_id"] not in image_ids:
            raise KpnetError(source, f"{where}: image_id {d['image_id']} is not in the ground truth")
        if d["category_id"] not in cat_ids:
            raise KpnetError(source, f"{where}: category_id {d['category_id']} is not a ground-truth category")
        entry = {"id": i + 1, "image_id": int(d["image_id"]), "category_id": int(d["category_id"]),
                 "score": float(d["score"]), "iscrowd": 0}
        if "segmentation" in d:
            from pycocotools import mask as mask_utils

            rle = _mask_rle(source, where, d["segmentation"], gt.imgs[d["image_id"]])
            box = d.get("bbox") if "bbox" in d else mask_utils.toBbox(rle).tolist()
            entry.update(segmentation=rle, area=float(mask_utils.area(rle)))
        else:
            box = d.get("bbox")
        _check_box(source, where, box)
        x, y, w, h = box
        entry["bbox"] = [float(x), float(y), float(w), float(h)]
        entry.setdefault("area", float(w * h))
        annotations.append(entry)
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


def has_masks(dt: COCO) -> bool:
    """Whether loaded results carry instance masks (so `segm` can be scored)."""
    return any("segmentation" in a for a in dt.dataset["annotations"])


def _check_gt_masks(gt: COCO) -> None:
    missing = next((a for a in gt.dataset["annotations"] if "segmentation" not in a), None)
    if missing is not None:
        raise KpnetError("--iou-type", f"segm needs ground-truth masks; annotation id {missing.get('id')} has no "
                                       "'segmentation'")


def run_cocoeval(gt: COCO, dt: COCO, backend: Backend = "auto",
                 iou_thresholds: Sequence[float] | None = None,
                 max_dets: Sequence[int] | None = None, iou_type: IouType = "bbox") -> Any:
    """Run COCOeval (bbox or segm) evaluate + accumulate quietly; the object holds `eval['precision']` [T,R,K,A,M]."""
    if iou_type not in IOU_TYPES:
        raise KpnetError("--iou-type", f"unknown IoU type {iou_type!r}; valid: {', '.join(IOU_TYPES)}")
    if iou_type == "segm":
        _check_gt_masks(gt)
        if not has_masks(dt):
            raise KpnetError("--iou-type", "segm needs results with 'segmentation' masks")
    cocoeval = _cocoeval_class(backend)(gt, dt, iou_type)
    if iou_thresholds is not None:
        cocoeval.params.iouThrs = np.asarray(iou_thresholds, dtype=np.float64)
    if max_dets is not None:
        cocoeval.params.maxDets = list(max_dets)
    _quiet(cocoeval.evaluate)
    _quiet(cocoeval.accumulate)
    return cocoeval


def evaluate(gt: COCO, dt: COCO, backend: Backend = "auto", iou_type: IouType = "bbox") -> Any:
    """The standard COCO evaluation (bbox, or segm for masks), summarised: `.stats` holds the 12 stats."""
    cocoeval = run_cocoeval(gt, dt, backend, iou_type=iou_type)
    _quiet(cocoeval.summarize)
    return cocoeval


def stats_dict(cocoeval: Any) -> dict[str, float]:
    """The 12 COCO stats of a summarised COCOeval under kpnet's stable keys (-1 where undefined)."""
    return {key: float(v) for key, v in zip(BBOX_KEYS, cocoeval.stats[:12], strict=True)}


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
