"""COCOeval's bbox `evaluate` and `accumulate` (pycocotools' cocoeval.py) vectorised over every image and class.

The same greedy matching as `COCOeval.evaluateImg` — detections in score order (ties to the earlier result), each
taking the unmatched ground truth of highest IoU >= t (ties to the later one), regular boxes before ignored ones (crowd
regions, boxes outside the area range), crowd regions matchable again with IoU = intersection / detection area — and
the same precision/recall arrays as `COCOeval.accumulate`, bit for bit, so the inherited `summarize` gives the same 12
stats.
The work is one step per detection rank (at most maxDets) over arrays of every (detection, ground truth) pair that can
match, instead of a Python loop per image, class and threshold; tests/test_bbox_eval.py holds it to pycocotools.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools.cocoeval import COCOeval


@dataclass(frozen=True)
class BoxResults:
    """Detections as arrays: image and category ids, boxes [x, y, w, h], scores, areas (what COCOeval's area ranges
    read: the box's, or an instance mask's) and their order in the results file (the tie-break of COCOeval's stable
    sorts)."""

    image_id: np.ndarray  # (N,) int64
    category_id: np.ndarray  # (N,) int64
    bbox: np.ndarray  # (N, 4) float64
    score: np.ndarray  # (N,) float64
    area: np.ndarray  # (N,) float64
    order: np.ndarray  # (N,) int64, ascending = earlier in the file

    @staticmethod
    def from_annotations(annotations: list[dict[str, Any]]) -> BoxResults:
        """The arrays of a COCO results list already loaded as annotations (in their order)."""
        n = len(annotations)
        return BoxResults(
            np.fromiter((a["image_id"] for a in annotations), np.int64, n),
            np.fromiter((a["category_id"] for a in annotations), np.int64, n),
            np.array([a["bbox"] for a in annotations], np.float64).reshape(n, 4),
            np.fromiter((a["score"] for a in annotations), np.float64, n),
            np.fromiter((a["area"] for a in annotations), np.float64, n),
            np.arange(n, dtype=np.int64))


def box_iou(d: np.ndarray, g: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """maskApi's bbIou for row pairs of [x, y, w, h]: intersection / union, or / detection area for a crowd region."""
    w = np.minimum(d[:, 2] + d[:, 0], g[:, 2] + g[:, 0]) - np.maximum(d[:, 0], g[:, 0])
    h = np.minimum(d[:, 3] + d[:, 1], g[:, 3] + g[:, 1]) - np.maximum(d[:, 1], g[:, 1])
    inter = w * h
    da = d[:, 2] * d[:, 3]
    union = np.where(crowd, da, da + g[:, 2] * g[:, 3] - inter)
    overlap = (w > 0) & (h > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(overlap, inter / np.where(overlap, union, 1.0), 0.0)


def ranks_in_runs(group: np.ndarray) -> np.ndarray:
    """Each element's position within its run of equal `group` values (the array is sorted by group)."""
    n = len(group)
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]]) if n else np.zeros(0, np.int64)
    return np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))


class BoxCOCOeval(COCOeval):
    """pycocotools' COCOeval for iouType bbox with `evaluate` and `accumulate` over arrays (see the module docstring);
    `params` (iouThrs, maxDets, areaRng, ...) are honoured as COCOeval honours them, `summarize` is COCOeval's own."""

    def __init__(self, gt: Any, dt: Any, results: BoxResults) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            super().__init__(gt, dt, "bbox")
        self.results = results

    def _ground_truth(self, img_ids: np.ndarray, cat_ids: np.ndarray) -> dict[str, np.ndarray]:
        """The ground truth of the evaluated images and classes in COCOeval's order (image, then file order)."""
        anns = [a for i in img_ids.tolist() for a in self.cocoGt.imgToAnns.get(i, ())]
        n = len(anns)
        gt = {
            "image": np.fromiter((a["image_id"] for a in anns), np.int64, n),
            "category": np.fromiter((a["category_id"] for a in anns), np.int64, n),
            "id": np.fromiter((a["id"] for a in anns), np.int64, n),
            "bbox": np.array([a["bbox"] for a in anns], np.float64).reshape(n, 4),
            "area": np.fromiter((a["area"] for a in anns), np.float64, n),
            "crowd": np.fromiter((bool(a.get("iscrowd", 0)) for a in anns), bool, n),
        }
        keep = np.isin(gt["category"], cat_ids)
        return {k: v[keep] for k, v in gt.items()}

    def evaluate(self) -> None:
        """evaluateImg for every image, class and area range at maxDets[-1], as per-detection match arrays."""
        p = self.params
        p.imgIds = list(np.unique(p.imgIds))
        p.catIds = list(np.unique(p.catIds))
        p.maxDets = sorted(p.maxDets)
        if not p.useCats:
            raise ValueError("BoxCOCOeval scores per class (params.useCats = 1)")
        img_ids, cat_ids = np.asarray(p.imgIds, np.int64), np.asarray(p.catIds, np.int64)
        n_cats = len(cat_ids)
        area_rng = np.asarray(p.areaRng, np.float64)
        t_eff = np.minimum(np.asarray(p.iouThrs, np.float64), 1 - 1e-10)
        n_area, n_thr = len(area_rng), len(t_eff)

        r = self.results
        known = np.flatnonzero(np.isin(r.image_id, img_ids) & np.isin(r.category_id, cat_ids))
        img_idx = np.searchsorted(img_ids, r.image_id[known])
        cat_idx = np.searchsorted(cat_ids, r.category_id[known])
        # Detections in accumulate's order: class, then score descending, image, results-file order. Within one image
        # and class that is evaluateImg's order (score, ties to the earlier result): its rank there decides maxDets.
        acc = np.lexsort((r.order[known], img_idx, -r.score[known], cat_idx))
        src, img_idx, cat_idx = known[acc], img_idx[acc], cat_idx[acc]
        group = img_idx * n_cats + cat_idx
        by_group = np.argsort(group, kind="stable")
        rank = np.empty_like(by_group)
        rank[by_group] = ranks_in_runs(group[by_group])
        counted = rank < p.maxDets[-1]
        src, group, rank, cat_idx = src[counted], group[counted], rank[counted], cat_idx[counted]
        bbox, area = r.bbox[src], r.area[src]

        g = self._ground_truth(img_ids, cat_ids)
        g_group = np.searchsorted(img_ids, g["image"]) * n_cats + np.searchsorted(cat_ids, g["category"])
        g_sort = np.argsort(g_group, kind="stable")  # group, then COCOeval's order within it
        g = {k: v[g_sort] for k, v in g.items()}
        g_group = g_group[g_sort]
        g_ignore = g["crowd"][None, :] | (g["area"][None, :] < area_rng[:, :1]) | (g["area"][None, :] > area_rng[:, 1:])
        g_id_zero = g["id"] == 0  # COCOeval's dtMatches hold the matched gt's id: an id of 0 reads as no match

        # Every (detection, ground truth) pair of one image and class whose IoU can reach the lowest threshold, by
        # detection rank, and each detection's ground truths in COCOeval's order.
        first = np.searchsorted(g_group, group, "left")
        count = np.searchsorted(g_group, group, "right") - first
        pair_det = np.repeat(np.arange(len(group)), count)
        pair_gt = np.repeat(first, count) + ranks_in_runs(pair_det)
        iou = box_iou(bbox[pair_det], g["bbox"][pair_gt], g["crowd"][pair_gt])
        close = iou >= t_eff.min()
        by_rank = np.argsort(rank[pair_det[close]], kind="stable")
        pair_det, pair_gt, iou = pair_det[close][by_rank], pair_gt[close][by_rank], iou[close][by_rank]

        # True and false positives per area range, threshold and detection; an unmatched detection outside the area
        # range is ignored (neither), as is one matched to an ignored ground truth.
        outside = (area[None, :] < area_rng[:, :1]) | (area[None, :] > area_rng[:, 1:])
        tp = np.zeros((n_area, n_thr, len(group)), bool)
        fp = np.repeat(~outside[:, None, :], n_thr, axis=1)
        taken = np.zeros((n_area, n_thr, len(g_group)), bool)

        def record(owner: np.ndarray, hit: np.ndarray, chosen: np.ndarray) -> None:
            """Detections `owner` took ground truths `chosen` where `hit` ([A, T, len(owner)])."""
            areas = np.arange(n_area)[:, None, None]
            regular = ~g_ignore[areas, chosen] if chosen.ndim == 3 else ~g_ignore[:, None, chosen]
            zero = g_id_zero[chosen]
            tp[:, :, owner] = hit & regular & ~zero
            fp[:, :, owner] = ~outside[:, None, owner] & (~hit | (regular & zero))

        # A detection with one candidate needs no choice; one with several takes the best free one (see the docstring).
        several = np.bincount(pair_det, minlength=len(group))[pair_det] > 1
        one_det, one_gt, one_iou = pair_det[~several], pair_gt[~several], iou[~several]
        many_det, many_gt, many_iou = pair_det[several], pair_gt[several], iou[several]
        ranks = np.arange(p.maxDets[-1] + 1)
        one_bounds, many_bounds = np.searchsorted(rank[one_det], ranks), np.searchsorted(rank[many_det], ranks)
        for step in range(p.maxDets[-1]):
            lo, hi = one_bounds[step], one_bounds[step + 1]
            if lo < hi:
                gts, owner = one_gt[lo:hi], one_det[lo:hi]
                hit = (one_iou[None, None, lo:hi] >= t_eff[None, :, None]) & (~taken[:, :, gts] | g["crowd"][gts])
                taken[:, :, gts] |= hit  # a ground truth has one candidate detection per step (one per image and class)
                record(owner, hit, gts)
            lo, hi = many_bounds[step], many_bounds[step + 1]
            if lo < hi:
                gts, ious, owner = many_gt[lo:hi], many_iou[lo:hi], many_det[lo:hi]
                new_det = np.r_[True, owner[1:] != owner[:-1]]
                seg, seg_of_pair = np.flatnonzero(new_det), np.cumsum(new_det) - 1
                free = (ious[None, None, :] >= t_eff[None, :, None]) & (~taken[:, :, gts] | g["crowd"][gts])
                ignored = g_ignore[:, None, gts]
                regular = np.where(free & ~ignored, ious, -np.inf)
                fallback = np.where(free & ignored, ious, -np.inf)
                best_regular = np.maximum.reduceat(regular, seg, axis=2)
                use_regular = (best_regular > -np.inf)[:, :, seg_of_pair]
                key = np.where(use_regular, regular, fallback)
                best = np.maximum.reduceat(key, seg, axis=2)[:, :, seg_of_pair]
                pick = np.where((key == best) & (best > -np.inf), np.arange(hi - lo), -1)
                last = np.maximum.reduceat(pick, seg, axis=2)  # ties go to the later ground truth
                hit = last >= 0
                chosen = gts[np.where(hit, last, 0)]
                a, t, s = np.nonzero(hit)
                taken[a, t, chosen[a, t, s]] = True
                record(owner[seg], hit, chosen)
        self._box = {"rank": rank, "score": r.score[src], "tp": tp, "fp": fp,
                     "class_bounds": np.searchsorted(cat_idx, np.arange(n_cats + 1)),
                     "npig": np.stack([np.bincount(np.searchsorted(cat_ids, g["category"][~ig]), minlength=n_cats)
                                       for ig in g_ignore], 1)}  # [K, A] regular ground truths
        self._paramsEval = p

    def accumulate(self, p: Any = None) -> None:
        """COCOeval.accumulate: precision [T, R, K, A, M], recall [T, K, A, M] and scores, -1 where undefined."""
        p = self._paramsEval
        box = self._box
        npig = box["npig"]
        n_thr, n_rec, n_cats, n_area, n_max = (len(p.iouThrs), len(p.recThrs), len(p.catIds), len(p.areaRng),
                                                len(p.maxDets))
        precision = -np.ones((n_thr, n_rec, n_cats, n_area, n_max))
        recall = -np.ones((n_thr, n_cats, n_area, n_max))
        scores = -np.ones((n_thr, n_rec, n_cats, n_area, n_max))
        bounds, rank, rec_thrs = box["class_bounds"], box["rank"], np.asarray(p.recThrs)
        for k in range(n_cats):
            valid = np.flatnonzero(npig[k] > 0)  # area ranges with a regular ground truth of this class
            if not len(valid):
                continue
            in_class = slice(bounds[k], bounds[k + 1])
            rows = slice(None) if len(valid) == n_area else valid
            for m, max_det in enumerate(p.maxDets):
                tp, fp = box["tp"][rows, :, in_class], box["fp"][rows, :, in_class]
                sorted_scores = box["score"][in_class]
                if (rank[in_class] >= max_det).any():
                    sel = rank[in_class] < max_det
                    tp, fp, sorted_scores = tp[..., sel], fp[..., sel], sorted_scores[sel]
                nd = len(sorted_scores)
                # Counted in int32 over the bools' bytes, then widened: 15x faster than a float64 cumsum of bools.
                tp_sum = np.cumsum(tp.view(np.uint8), axis=2, dtype=np.int32).astype(np.float64)
                fp_sum = np.cumsum(fp.view(np.uint8), axis=2, dtype=np.int32).astype(np.float64)
                rc = tp_sum / npig[k, valid][:, None, None]
                pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
                recall[:, k, valid, m] = (rc[..., -1] if nd else np.zeros(rc.shape[:2])).T
                envelope = np.ascontiguousarray(pr[..., ::-1])  # precision made monotone from the right
                pr = np.maximum.accumulate(envelope, axis=2, out=envelope)[..., ::-1]
                for i, a in enumerate(valid.tolist()):
                    for t in range(n_thr):
                        inds = np.searchsorted(rc[i, t], rec_thrs, side="left")
                        ok = inds < nd
                        q, ss = np.zeros(n_rec), np.zeros(n_rec)
                        q[ok], ss[ok] = pr[i, t, inds[ok]], sorted_scores[inds[ok]]
                        precision[t, :, k, a, m], scores[t, :, k, a, m] = q, ss
        self.eval = {"params": p, "counts": [n_thr, n_rec, n_cats, n_area, n_max],
                     "precision": precision, "recall": recall, "scores": scores}
