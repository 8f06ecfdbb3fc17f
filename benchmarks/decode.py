"""The whole decode of one image, peaks to final boxes, for CornerNet (K=100) and the triplet family (K=70) at
80 classes on a 128×128 output grid (the papers' 511 input, flip test), per backend, in one run.

    python benchmarks/decode.py [--repeats 20] [--threads 1]

Per image: the family's `decode` on the flip pair of heads (sigmoid, heatmap peaks, offsets, corner grouping of
the K×K pairs, the flip concatenation; the triplet centre keypoints), the mapping to image pixels, then
`postprocess_image` (the triplet central-region check, scores > 0, the recipe's per-class soft-NMS, top 100).
The straightforward decode is that pipeline on the PyTorch reference ops (KPNET_KERNELS=torch: max-pool peaks
and a top-k over the full heatmap, the K×K pair tensors, soft-NMS as a per-class loop); kpnet's CPU default is
whatever `kpnet.cuda.dispatch` picks here (printed), and the emulator-compiled kernels are timed explicitly too.
Heads are random (sigmoided values mostly low, as trained heatmaps are); both backends return the same boxes
(checked). Times: wall-clock medians in milliseconds; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from kpnet.api import build_detector, load_recipe
from kpnet.config import SHIPPED_RECIPES
from kpnet.cuda import dispatch
from kpnet.engine.inference import postprocess_image

FAMILIES = {"cornernet": "cornernet_hg104", "triplet": "centernet_triplet_hg104"}
SIDE = 128  # the output grid of a 511 input
SMALL_NET = {"model.backbone": "hourglass_small", "model.stacks": 1}  # decode settings of the paper recipe, a small net


def random_heads(detector, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Heads shaped as the network's for a flip pair at 511², with random values (heat logits of rand⁴)."""
    with torch.no_grad():
        shapes = {k: v.shape for k, v in detector.network(torch.zeros(2, 3, 4 * SIDE, 4 * SIDE))[-1].items()}
    heads = {}
    for name, shape in shapes.items():
        value = torch.rand(shape, generator=generator)
        heads[name] = torch.logit(value**4, eps=1e-6) if name.endswith("heat") else value
    return heads


def decode_image(detector, heads: dict[str, torch.Tensor]):
    meta = {"border_x": 0.0, "border_y": 0.0, "scale": 1.0, "width": 511.0, "height": 511.0}
    scale = detector.decode(heads, True).to_image(meta, 511 / SIDE, 511 / SIDE)
    return postprocess_image(detector, [scale], detector.test)


def timed(fn, mode: str | None, repeats: int) -> tuple[float, object]:
    if mode is None:
        os.environ.pop(dispatch.KERNELS_ENV, None)
    else:
        os.environ[dispatch.KERNELS_ENV] = mode
    try:
        result = fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    finally:
        os.environ.pop(dispatch.KERNELS_ENV, None)
    return statistics.median(times) * 1000, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.pop(dispatch.KERNELS_ENV, None)
    default = dispatch.choose(torch.device("cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); kpnet's CPU default: {default.backend} "
          f"({default.reason}); load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for family, recipe in FAMILIES.items():
        detector = build_detector(load_recipe(SHIPPED_RECIPES / f"{recipe}.yaml", {**SMALL_NET, "model.num_classes": 80}))
        detector.eval()
        heads = random_heads(detector, torch.Generator().manual_seed(0))
        rows = {}
        for label, mode in (("straightforward (reference ops)", "torch"), ("emulator kernels", "emulate"),
                            (f"kpnet default ({default.backend})", None)):
            rows[label] = timed(lambda: decode_image(detector, heads), mode, args.repeats)
        base_ms, base = rows["straightforward (reference ops)"]
        print(f"\n{family} (K={detector.test.k}, {detector.test.nms} NMS, flip, 80 classes, {SIDE}×{SIDE}; "
              f"load average {os.getloadavg()[0]:.2f}), ms per image:")
        for label, (ms, dets) in rows.items():
            same = torch.equal(dets.boxes, base.boxes) and torch.equal(dets.scores, base.scores)
            print(f"  {label:34s} {ms:8.2f}  {base_ms / ms:5.1f}× the straightforward decode; "
                  f"{len(dets)} boxes{'' if same else ' (DIFFERENT from the reference)'}")


if __name__ == "__main__":
    main()
