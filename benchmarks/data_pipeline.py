"""Data loader throughput vs the training step rate of `quickstart` (issue: the loader must keep up).

Prints images/s of the augmentation + target pipeline with 0, 1 and 2 DataLoader workers, the
images/s one quickstart training step consumes, and their ratio (> 1 means the loader keeps up).
Run: `python benchmarks/data_pipeline.py [--images N] [--data DIR]`.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from pathlib import Path

import torch

from kpnet.config import load_recipe
from kpnet.data.dataset import EpochBatchSampler, TrainDataset, collate, load_split
from kpnet.data.shapes import make_shapes
from kpnet.engine.train import chunked_loss, encode_input_boxes, mixed_precision
from kpnet.models import build_detector
from kpnet.targets import output_size

REPO = Path(__file__).resolve().parents[1]


def loader_rate(dataset: TrainDataset, batch: int, workers: int, batches: int) -> float:
    sampler = EpochBatchSampler(len(dataset), batch, seed=0, start=0, total=batches)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    tic = time.perf_counter()
    n = sum(1 for _ in it)
    return n * batch / (time.perf_counter() - tic)


def step_rate(recipe, batches: list[dict[str, torch.Tensor]]) -> float:  # type: ignore[no-untyped-def]
    """Images/s of the training step as `kpnet train` runs it: the recipe's channels-last layout and autocast."""
    torch.manual_seed(0)
    detector = build_detector(recipe)
    memory_format = torch.channels_last if recipe.train.channels_last else torch.contiguous_format
    model = detector.network.to(memory_format=memory_format).train()
    use_amp, amp_dtype = mixed_precision(recipe.train.amp, "cpu")
    opt = torch.optim.Adam(model.parameters(), lr=recipe.train.lr)
    times = []
    for batch in batches:
        batch = dict(batch)
        images = batch.pop("image").contiguous(memory_format=memory_format)
        tic = time.perf_counter()
        with torch.autocast(device_type="cpu", dtype=amp_dtype, enabled=use_amp):
            outputs = model(images)
        loss = chunked_loss(detector.loss, outputs, batch, recipe.loss.chunk_size)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - tic)
    times = sorted(times[2:])
    return recipe.train.batch_size / times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="a shapes set (made in a temp folder when omitted)")
    ap.add_argument("--batches", type=int, default=12)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or Path(tmp) / "shapes"
        if args.data is None:
            make_shapes(root, num_train=args.batches * 32 + 64, num_val=0)
        recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [f"data.root={root}"])
        tr = recipe.train
        index = load_split(recipe, "train")
        out = output_size(tr.input_size)
        encode = functools.partial(encode_input_boxes, build_detector(recipe).target_renderer(), out / tr.input_size,
                                   (out, out))
        a = recipe.augment
        dataset = TrainDataset(index, encode, tr.input_size, a.scales, a.flip, a.color_jitter, a.lighting, tr.seed)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
              f"quickstart batch {tr.batch_size}, input {tr.input_size}")
        rates = {w: loader_rate(dataset, tr.batch_size, w, args.batches) for w in (0, 1, 2)}
        sampler = EpochBatchSampler(len(dataset), tr.batch_size, seed=1, start=0, total=args.batches)
        batches = [collate([dataset[k] for k in b]) for b in sampler]
        steps = step_rate(recipe, batches)
        for w, r in rates.items():
            print(f"loader, {w} workers: {r:8.1f} images/s")
        print(f"training step (quickstart): {steps:8.1f} images/s")
        for w, r in rates.items():
            print(f"ratio loader({w} workers) / training step: {r / steps:5.2f}")


if __name__ == "__main__":
    main()
