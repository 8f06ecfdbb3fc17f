"""Per-image latency of the paper networks through kpnet's inference engine against a plain eager path, in one run.

    python benchmarks/inference.py [--networks points_res18,cornernet_hg104] [--repeats 3] [--batch 8]
                                   [--precision auto] [--compile auto] [--threads 2]

Both paths run the recipe's own test settings (its flip test, K, padding) on the same 511×511 image, which the
recipes pad to the papers' inputs (512² for objects as points, 511² for the corner families); weights are
untrained (speed does not depend on them) but for random heatmap output layers, so an image gives spread peaks
and a full NMS load (the untrained bias makes every heatmap nearly constant). Per image, in milliseconds (medians over the repeats, the two
paths interleaved so a busy machine slows both alike):

- pre: resize, pad, normalise (`test_input`) and the flip batch;
- network: eager = `network(batch)` in fp32 under `no_grad`; engine = `kpnet.engine.accelerate`
  (BN folded, channels-last, inference mode, `test.precision` / `test.compile` as resolved here);
- decode: the family's `decode` and the mapping to image pixels; eager = the PyTorch reference ops
  (KPNET_KERNELS=torch: the K×K pair tensors), engine = the backend `kpnet.cuda.dispatch` picks by default;
- post: `postprocess_image` (the family's postprocess, NMS, top max_per_image), same backends.

Then images/s with the network on batches of `--batch` images (each image's decode and post-processing
after it). The engine's one-time preparation (the BN-folding probe) is printed apart and not in the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from kpnet.api import build_detector, load_recipe
from kpnet.config import SHIPPED_RECIPES
from kpnet.cuda import dispatch
from kpnet.data.transforms import test_input
from kpnet.engine.accelerate import inference_network, native_bf16_cpu
from kpnet.engine.inference import postprocess_image

NETWORKS = {
    "points_res18": "centernet_points_res18",
    "points_dla34": "centernet_points_dla34",
    "points_hg104": "centernet_points_hg104",
    "cornernet_hg104": "cornernet_hg104",
    "triplet_hg52": "centernet_triplet_hg52",
    "triplet_hg104": "centernet_triplet_hg104",
    "centripetalnet_hg104": "centripetalnet_hg104",
}
PHASES = ("pre", "network", "decode", "post")
IMAGE_SIDE = 511


@contextlib.contextmanager
def kernels(mode: str | None) -> Iterator[None]:
    """KPNET_KERNELS set to `mode` (None: the default choice) for the block."""
    old = os.environ.pop(dispatch.KERNELS_ENV, None)
    if mode is not None:
        os.environ[dispatch.KERNELS_ENV] = mode
    try:
        yield
    finally:
        os.environ.pop(dispatch.KERNELS_ENV, None)
        if old is not None:
            os.environ[dispatch.KERNELS_ENV] = old


def one_image(detector, forward: Callable, image: np.ndarray, times: dict[str, list[float]]) -> int:
    """One image through the test pipeline (single scale), each phase timed into `times`; its number of detections."""
    test = detector.test
    t0 = time.perf_counter()
    inp, meta = test_input(image, 1.0, test.pad, test.pad_add)
    batch = torch.from_numpy(inp)[None]
    if test.flip:
        batch = torch.cat([batch, batch.flip(-1)])
    t1 = time.perf_counter()
    outputs = forward(batch)
    t2 = time.perf_counter()
    scale = decode(detector, outputs, inp.shape, meta)
    t3 = time.perf_counter()
    dets = postprocess_image(detector, [scale], test)
    t4 = time.perf_counter()
    for phase, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
        times[phase].append(dt * 1000)
    return len(dets)


def decode(detector, outputs: dict, inp_shape: tuple, meta: dict):
    out_h, out_w = next(iter(outputs.values())).shape[-2:]
    return detector.decode(outputs, detector.test.flip).to_image(meta, inp_shape[-1] / out_w, inp_shape[-2] / out_h)


def batch_rate(detector, forward: Callable, image: np.ndarray, size: int) -> float:
    """Images per second: `size` images as one network batch, then each image's decode and post-processing."""
    test = detector.test
    start = time.perf_counter()
    inputs = [test_input(image, 1.0, test.pad, test.pad_add) for _ in range(size)]
    batch = torch.from_numpy(np.stack([inp for inp, _ in inputs]))
    if test.flip:
        batch = torch.cat([batch, batch.flip(-1)])
    outputs = forward(batch)
    for i, (inp, meta) in enumerate(inputs):
        rows = [i, size + i] if test.flip else [i]
        scale = decode(detector, {k: v[rows] for k, v in outputs.items()}, inp.shape, meta)
        postprocess_image(detector, [scale], test)
    return size / (time.perf_counter() - start)


def spread_heads(network: torch.nn.Module, num_classes: int) -> None:
    """Random weights (std 0.1) for the convolutions that output class heatmaps: an untrained network's heatmaps
    are nearly constant (the focal-loss bias), so its peaks, pairs and NMS load would not be an image's."""
    generator = torch.Generator().manual_seed(0)
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d) and module.out_channels == num_classes:
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.1)


def bench(name: str, args: argparse.Namespace, image: np.ndarray) -> tuple[float, float | None]:
    overrides = {"test.precision": args.precision, "test.compile": args.compile}
    detector = build_detector(load_recipe(SHIPPED_RECIPES / f"{NETWORKS[name]}.yaml", overrides)).eval()
    network = detector.network
    spread_heads(network, detector.recipe.model.num_classes)

    def eager(batch: torch.Tensor) -> dict:
        with torch.no_grad():
            return network(batch)[-1]

    start = time.perf_counter()
    engine_net = inference_network(network, detector.recipe)
    prepare_s = time.perf_counter() - start

    def engine(batch: torch.Tensor) -> dict:
        return inference_network(network, detector.recipe)(batch)[-1]

    paths = {"eager": (eager, "torch"), "engine": (engine, None)}
    times = {p: {phase: [] for phase in PHASES} for p in paths}
    counts = {}
    for _ in range(args.repeats + 1):  # the first round warms both paths up and is dropped
        for p, (forward, mode) in paths.items():
            with kernels(mode):
                counts[p] = one_image(detector, forward, image, times[p])
    med = {p: {ph: statistics.median(v[1:]) for ph, v in t.items()} for p, t in times.items()}
    total = {p: sum(m.values()) for p, m in med.items()}
    ratio = total["eager"] / total["engine"]
    side = test_input(image, 1.0, detector.test.pad, detector.test.pad_add)[0].shape[-1]
    print(f"\n{name} ({NETWORKS[name]}.yaml, input {side}², flip {detector.test.flip}, K {detector.test.k}); "
          f"engine: {engine_net.plan.reason}, {engine_net.folded} BN folded, prepared in {prepare_s:.1f} s; "
          f"decode backend {dispatch.choose(torch.device('cpu')).backend}; load average {os.getloadavg()[0]:.2f}")
    for p in paths:
        cells = "  ".join(f"{ph} {med[p][ph]:8.1f}" for ph in PHASES)
        print(f"  {p:6s} ms/image: {cells}  total {total[p]:8.1f}")
    print(f"  detections per image: eager {counts['eager']}, engine {counts['engine']}")
    print(f"  ratio eager/engine: " + "  ".join(f"{ph} {med['eager'][ph] / med['engine'][ph]:.2f}×" for ph in PHASES)
          + f"  total {ratio:.2f}×")
    batch_ratio = None
    if args.batch > 1:
        rates = {}
        for p, (forward, mode) in paths.items():
            with kernels(mode):
                rates[p] = batch_rate(detector, forward, image, args.batch)
        batch_ratio = rates["engine"] / rates["eager"]
        print(f"  batch {args.batch}: eager {rates['eager']:.2f} images/s, engine {rates['engine']:.2f} images/s "
              f"({batch_ratio:.2f}×; load average {os.getloadavg()[0]:.2f})")
    return ratio, batch_ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", default=",".join(NETWORKS), help=f"comma-separated subset of {', '.join(NETWORKS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="images per batch for images/s (1: skip)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    names = [n.strip() for n in args.networks.split(",") if n.strip()]
    unknown = [n for n in names if n not in NETWORKS]
    if unknown:
        parser.error(f"unknown network(s) {', '.join(unknown)}; choose from {', '.join(NETWORKS)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    image = np.random.default_rng(0).integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 {native_bf16_cpu()}; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    results = {name: bench(name, args, image) for name in names}
    print("\nsummary (eager / engine per image; engine / eager images/s at batch "
          f"{args.batch}; load average {os.getloadavg()[0]:.2f}):")
    for name, (ratio, batch_ratio) in results.items():
        extra = f", batch {args.batch} {batch_ratio:.2f}×" if batch_ratio is not None else ""
        print(f"  {name:22s} {ratio:5.2f}×{extra}{'' if ratio >= 1.5 else '  (below the 1.5× target)'}")


if __name__ == "__main__":
    main()
