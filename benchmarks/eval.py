"""Time kpnet's COCO scoring against plain pycocotools on a generated 5,000-image x 100-detection results
file and check that the 12 bbox stats agree.

    python benchmarks/eval.py [--images 5000] [--per-image 100] [--seed 0]

kpnet: `evaluation.load_dets` (streamed in large batches checked as arrays, the best 100 per image and class) +
`evaluation.evaluate` (kpnet.bbox_eval: COCOeval's matching and accumulation vectorised over arrays). pycocotools: `COCO.loadRes` +
`COCOeval` (evaluate, accumulate, summarize), as a user of the COCO API runs it. Both read the same files;
ground-truth loading is timed apart. Each runs in a fresh process, which also reports its peak memory growth
while loading and scoring the results (VmHWM); kpnet runs before and after pycocotools, its time is the mean.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from kpnet import evaluation
from kpnet.data.validate import load_gt


def make_files(root: Path, images: int, per_image: int, seed: int) -> tuple[Path, Path]:
    """Ground truth (about 7 objects per image, 80 classes) and results near it, with misses and false positives."""
    rng = np.random.default_rng(seed)
    gt_images, annotations, results = [], [], []
    for image_id in range(1, images + 1):
        gt_images.append({"id": image_id, "file_name": f"{image_id:06d}.jpg", "width": 640, "height": 480})
        n = int(rng.integers(1, 15))
        xy = rng.uniform(0, 400, (n, 2))
        wh = rng.uniform(8, 240, (n, 2))
        cls = rng.integers(1, 81, n)
        for box, c in zip(np.concatenate([xy, wh], 1).tolist(), cls.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": c, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})
        pick = rng.integers(0, n, per_image)
        jitter = rng.normal(0, 6, (per_image, 4))
        boxes = np.concatenate([xy[pick], wh[pick]], 1) + jitter
        boxes[:, 2:] = np.abs(boxes[:, 2:]) + 1
        labels = np.where(rng.random(per_image) < 0.8, cls[pick], rng.integers(1, 81, per_image))
        scores = rng.random(per_image)
        results += [{"image_id": image_id, "category_id": int(c), "bbox": [round(v, 2) for v in b], "score": round(s, 4)}
                    for b, c, s in zip(boxes.tolist(), labels.tolist(), scores.tolist())]
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, 81)]
    gt_path, dt_path = root / "gt.json", root / "results.json"
    gt_path.write_text(json.dumps({"images": gt_images, "annotations": annotations, "categories": categories}))
    dt_path.write_text(json.dumps(results))
    return gt_path, dt_path


def pycocotools_stats(gt_path: Path, dt_path: Path) -> tuple[list[float], float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        tic = time.perf_counter()
        ev = COCOeval(gt, gt.loadRes(str(dt_path)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats], time.perf_counter() - tic


def kpnet_stats(gt_path: Path, dt_path: Path) -> tuple[list[float], float]:
    gt = load_gt(gt_path)
    tic = time.perf_counter()
    stats = evaluation.bbox_stats(gt, evaluation.load_dets(dt_path, gt))
    return list(stats.values()), time.perf_counter() - tic


def in_child(fn, gt_path: Path, dt_path: Path) -> tuple[list[float], float, float]:
    """fn run in a fresh process: its stats, seconds, and the growth of the process's peak resident memory in MiB over
    what it held after the imports and the ground truth (VmHWM, reset there: the results' loading and scoring)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measured, (fn.__name__, gt_path, dt_path))


def _status_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(f"{field}:"))
    return int(line.split()[1])


def _measured(name: str, gt_path: Path, dt_path: Path) -> tuple[list[float], float, float]:
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        COCO(str(gt_path))  # imports and a ground truth's worth of memory, before the baseline
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident size
    stats, seconds = globals()[name](gt_path, dt_path)
    return stats, seconds, (_status_kib("VmHWM") - before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--per-image", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        gt_path, dt_path = make_files(Path(tmp), args.images, args.per_image, args.seed)
        print(f"{args.images} images, {args.images * args.per_image} detections "
              f"({dt_path.stat().st_size / 2**20:.0f} MiB of results JSON)")
        ours, t_first, mem_ours = in_child(kpnet_stats, gt_path, dt_path)  # before and after pycocotools: the
        ref, t_ref, mem_ref = in_child(pycocotools_stats, gt_path, dt_path)  # mean cancels a drift of the machine's load
        again, t_again, _ = in_child(kpnet_stats, gt_path, dt_path)
        t_ours = (t_first + t_again) / 2
    assert again == ours
    worst = max(abs(a - b) for a, b in zip(ours, ref, strict=True))
    print(f"kpnet (load_dets + BoxCOCOeval):    {t_ours:7.1f} s (runs before / after pycocotools: {t_first:.1f} / "
          f"{t_again:.1f} s), peak memory +{mem_ours:.0f} MiB")
    print(f"pycocotools (loadRes + COCOeval):      {t_ref:7.1f} s, peak memory +{mem_ref:.0f} MiB")
    print(f"speed-up: {t_ref / t_ours:.1f}x; the 12 stats differ by at most {worst:.2e} (AP {ours[0]:.4f} vs {ref[0]:.4f}); "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if worst > 1e-9:
        raise SystemExit("the 12 stats disagree")


if __name__ == "__main__":
    main()
