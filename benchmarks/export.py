"""Per-image latency of PyTorch eager (inference mode) vs onnxruntime CPU on the same exported detector.

    python benchmarks/export.py [--out runs/bench_export] [--repeats 10] [--threads N]

For the quickstart model (128x128 shapes images, padded to 128x128) and for HG-52 CornerNet at 511x511 (both
untrained: latency does not depend on the weights), exports the detections graph with `kpnet.export.graph`,
then times the network plus its graph decode in PyTorch (`torch.inference_mode`) and the ONNX model in
onnxruntime (CPU provider, default threads) on one image (flip in the graph where the recipe tests with flip: a batch of
2 through the network, as HG-52 CornerNet does), and prints the median ms per image after 3 warm-up calls and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from kpnet.config import load_recipe
from kpnet.export.graph import ExportGraph, export_onnx
from kpnet.models import build_detector

REPO = Path(__file__).resolve().parents[1]
CASES = (("quickstart", 128), ("cornernet_hg52", 511))


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):  # oneDNN and onnxruntime pick their kernels in the first calls
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_export"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="threads for both runtimes (0: their defaults)")
    args = parser.parse_args()
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if args.threads:
        torch.set_num_threads(args.threads)
        options.intra_op_num_threads = args.threads
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}")
    print(f"{'model':<16}{'input':>10}{'eager ms':>11}{'ort ms':>9}{'eager/ort':>11}")
    for name, side in CASES:
        torch.manual_seed(0)
        detector = build_detector(load_recipe(REPO / "recipes" / f"{name}.yaml")).eval()
        path = args.out / f"{name}.onnx"
        export_onnx(detector, path)
        graph = ExportGraph(detector, heads_only=False, flip=detector.test.flip)
        image = torch.randn(1, 3, side, side)
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def eager() -> None:
            with torch.inference_mode():
                graph(image)

        eager_ms = median_ms(eager, args.repeats)
        ort_ms = median_ms(lambda: session.run(None, {"images": image.numpy()}), args.repeats)
        print(f"{name:<16}{f'{side}x{side}':>10}{eager_ms:>11.1f}{ort_ms:>9.1f}{eager_ms / ort_ms:>11.2f}", flush=True)


if __name__ == "__main__":
    main()
