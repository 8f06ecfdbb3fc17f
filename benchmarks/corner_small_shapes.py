"""Train the small corner-family recipes on `shapes` and print AP, AP50 and FD rates side by side.

    python benchmarks/corner_small_shapes.py [--out runs/bench_corner] [--max-iterations N] [--recipes a,b]

Generates shapes (2000 train / 200 val, seed 0) under OUT, trains recipes/cornernet_small_shapes.yaml,
recipes/centernet_triplet_small_shapes.yaml and recipes/centripetalnet_small_shapes.yaml (or the
--recipes chosen) with the same data, schedule and seed, evaluates each on val, and prints wall time,
bbox AP / AP50, the FD rates (IoU 0.05:0.05:0.5, triplet paper Table 3) and segm AP for a recipe with the
mask head (e.g. centripetalnet_small_shapes_mask), then each family's FD and AP
against CornerNet's (the triplet paper's Table 3 and CentripetalNet's Table 4 directions). A run already
trained under OUT is evaluated again, not retrained.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kpnet import evaluation
from kpnet.api import load_checkpoint
from kpnet.config import load_recipe
from kpnet.data.dataset import load_index
from kpnet.data.shapes import make_shapes
from kpnet.engine.inference import predict_dataset
from kpnet.engine.train import train

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("cornernet_small_shapes", "centernet_triplet_small_shapes", "centripetalnet_small_shapes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_corner"))
    parser.add_argument("--max-iterations", type=int, default=0, help="stop each run early (0 = the recipe's schedule)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names (CornerNet's first)")
    args = parser.parse_args()
    data = args.out / "shapes"
    if not (data / "annotations" / "instances_val.json").exists():
        make_shapes(data, num_train=2000, num_val=200, image_size=128, seed=0)
    index = load_index(data / "annotations" / "instances_val.json", data / "val")
    rows = []
    for name in args.recipes.split(","):
        sets = [f"data.root={data}", f"train.max_iterations={args.max_iterations}"]
        recipe = load_recipe(REPO / "recipes" / f"{name}.yaml", sets)
        tic = time.perf_counter()
        summary = train(recipe, args.out / recipe.name, resume=(args.out / recipe.name / "last.pt").exists())
        train_s = time.perf_counter() - tic
        model = load_checkpoint(summary["checkpoint"])
        results = predict_dataset(model, index)
        dets = evaluation.load_dets(results, index.coco, source=recipe.name)
        stats = evaluation.bbox_stats(index.coco, dets)
        fd = evaluation.fd_rates(index.coco, dets)
        segm = (evaluation.stats_dict(evaluation.evaluate(index.coco, dets, iou_type="segm"))["AP"]
                if evaluation.has_masks(dets) else None)
        rows.append((recipe.name, summary["iterations"], train_s, stats, fd, segm))
    print(f"{'recipe':34s} {'iters':>6s} {'train_s':>8s} {'AP':>6s} {'AP50':>6s} {'FD':>6s} {'FD5':>6s} {'FD25':>6s} "
          f"{'FD50':>6s} {'segmAP':>6s}")
    for name, iters, secs, stats, fd, segm in rows:
        print(f"{name:34s} {iters:6d} {secs:8.1f} {stats['AP']:6.3f} {stats['AP50']:6.3f} "
              f"{fd['FD']:6.3f} {fd['FD5']:6.3f} {fd['FD25']:6.3f} {fd['FD50']:6.3f} "
              f"{'-' if segm is None else f'{segm:.3f}':>6s}")
    base = rows[0]
    for name, _, _, stats, fd, _ in rows[1:]:
        print(f"{name}: FD / {base[0]} FD = {fd['FD'] / base[4]['FD']:.3f}, AP - {base[0]} AP = "
              f"{stats['AP'] - base[3]['AP']:+.3f}")


if __name__ == "__main__":
    main()
