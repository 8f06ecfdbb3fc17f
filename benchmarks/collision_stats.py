"""Benchmark `collision-stats` on a generated annotation file the size of COCO train2017
(118,287 images, 860,001 objects): prints the time to read and analyse it and objects/s.

The target (issue 5) is under a minute on 2 CPU cores. Run: python benchmarks/collision_stats.py
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from kpnet.analysis.collisions import collision_stats, load_boxes

IMAGE_SIZES = ((640, 480), (480, 640), (640, 427), (427, 640), (500, 375), (640, 640), (612, 612))


def generate(path: Path, images: int, objects: int, seed: int = 0) -> None:
    """A COCO-like annotation file: skewed objects per image and per class, log-uniform areas
    (about 45% small, 21% medium, 34% large), ~1% crowd, and ~10% of objects placed next to an
    earlier object of the same class so that collisions and overlapping pairs occur."""
    rng = np.random.default_rng(seed)
    per_image = rng.negative_binomial(1.2, 1.2 / (1.2 + objects / images), images)
    while (diff := objects - int(per_image.sum())) != 0:  # make the total exact
        per_image[rng.integers(0, images, abs(diff))] += np.sign(diff)
        per_image = np.maximum(per_image, 0)
    image_of = np.repeat(np.arange(images), per_image)
    wh = np.array(IMAGE_SIZES)[rng.integers(0, len(IMAGE_SIZES), images)]
    w_img, h_img = wh[image_of, 0].astype(np.float64), wh[image_of, 1].astype(np.float64)
    zipf = 1.0 / np.arange(1, 81) ** 1.1
    main_class = rng.choice(80, images, p=zipf / zipf.sum())[image_of]
    category = np.where(rng.random(objects) < 0.5, main_class, rng.choice(80, objects, p=zipf / zipf.sum())) + 1
    area = np.exp(rng.uniform(np.log(10.0), np.log(3e5), objects))
    aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.0), objects))
    bw = np.minimum(np.sqrt(area * aspect), w_img)
    bh = np.minimum(np.sqrt(area / aspect), h_img)
    x = rng.uniform(0, 1, objects) * (w_img - bw)
    y = rng.uniform(0, 1, objects) * (h_img - bh)
    near = (rng.random(objects) < 0.1) & (np.arange(objects) > 0)
    near &= image_of == np.roll(image_of, 1)
    near_idx = np.flatnonzero(near)
    category[near_idx] = category[near_idx - 1]
    jitter = rng.normal(0, 2.0, (len(near_idx), 4))
    x[near_idx] = x[near_idx - 1] + jitter[:, 0]
    y[near_idx] = y[near_idx - 1] + jitter[:, 1]
    bw[near_idx] = np.maximum(bw[near_idx - 1] + jitter[:, 2], 1.0)
    bh[near_idx] = np.maximum(bh[near_idx - 1] + jitter[:, 3], 1.0)
    crowd = rng.random(objects) < 0.01
    seg_area = bw * bh * rng.uniform(0.5, 0.9, objects)  # a segmentation covers part of its box
    data = {
        "images": [{"id": i + 1, "width": int(w), "height": int(h), "file_name": f"{i + 1:012d}.jpg"}
                   for i, (w, h) in enumerate(wh)],
        "categories": [{"id": c, "name": f"class{c}"} for c in range(1, 81)],
        "annotations": [
            {"id": k + 1, "image_id": int(i) + 1, "category_id": int(c),
             "bbox": [round(a, 2), round(b, 2), round(c_, 2), round(d, 2)], "area": round(s, 2),
             "iscrowd": int(cr)}
            for k, (i, c, a, b, c_, d, s, cr) in enumerate(zip(
                image_of.tolist(), category.tolist(), x.tolist(), y.tolist(), bw.tolist(), bh.tolist(),
                seg_area.tolist(), crowd.tolist()))
        ],
    }
    path.write_text(json.dumps(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=118_287)
    parser.add_argument("--objects", type=int, default=860_001)
    parser.add_argument("--keep", type=Path, help="Write the generated file here instead of a temp dir.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "generated_train2017.json"
        t0 = time.perf_counter()
        generate(path, args.images, args.objects)
        t1 = time.perf_counter()
        print(f"generated {args.images} images / {args.objects} objects, {path.stat().st_size / 2**20:.0f} MiB "
              f"in {t1 - t0:.1f} s (not timed below)")
        t1 = time.perf_counter()
        boxes = load_boxes(path)
        t2 = time.perf_counter()
        stats = collision_stats(boxes)
        t3 = time.perf_counter()
    total = t3 - t1
    print(f"cpu cores available: {len(os.sched_getaffinity(0))}")
    print(f"read + parse: {t2 - t1:.2f} s   statistics: {t3 - t2:.2f} s   total: {total:.2f} s")
    print(f"throughput: {args.objects / total:,.0f} objects/s (statistics alone {args.objects / (t3 - t2):,.0f}/s)")
    print(f"budget 60 s: {total / 60:.2f} of it used")
    print("stats: " + json.dumps({k: v for k, v in stats.items() if k not in ("by_size", "file")}))


if __name__ == "__main__":
    main()
