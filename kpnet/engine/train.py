"""The training loop: Adam with warmup and step decay, per-chunk losses, AMP on CUDA, gradient
clipping, atomic checkpoints every N iterations and at the end, exact `--resume`, metrics.jsonl
and a loss-curve PNG.

Resume is exact because nothing random lives outside the checkpoint: the sample order and
every augmentation draw are functions of (seed, epoch, index), and model, optimizer and
scheduler state are saved with the iteration number.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kpnet.config import Recipe
from kpnet.data.dataset import EpochBatchSampler, TrainDataset, collate, load_split
from kpnet.engine.checkpoint import load_weights, read_checkpoint, save_checkpoint
from kpnet.engine.host_memory import reuse_freed_memory
from kpnet.errors import KpnetError
from kpnet.io import atomic_savefig, atomic_write_text
from kpnet.detectors.base import TargetRenderer
from kpnet.models import build_detector
from kpnet.targets import output_size


@dataclass
class Progress:
    """Callbacks the caller (the CLI's rich progress bar) receives; all optional."""

    start: Callable[[int, int], None] = lambda start, total: None
    step: Callable[[int, dict[str, float], float], None] = lambda it, losses, its_per_s: None


def lr_factor(it: int, warmup: int, steps: list[int]) -> float:
    """Linear warmup from 1/3 over `warmup` iterations, then ×0.1 at each step iteration."""
    warm = 1.0 if warmup <= 0 or it >= warmup else 1 / 3 + (2 / 3) * it / warmup
    return warm * (0.1 ** sum(it >= s for s in steps))


def mixed_precision(amp: bool, device: str) -> tuple[bool, torch.dtype]:
    """Whether to autocast and to which dtype: float16 on CUDA, bfloat16 on CPUs that run it natively."""
    if device == "cuda":
        return amp, torch.float16
    native_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return amp and native_bf16, torch.bfloat16


def chunked_loss(
    loss_fn: Callable[..., dict[str, Tensor]], outputs: list[dict[str, Tensor]], targets: dict[str, Tensor], chunk: int
) -> dict[str, Tensor]:
    """The family loss evaluated per chunk of images and averaged, as the per-GPU reference (REFERENCE §3.5)."""
    batch = targets["hm"].shape[0] if "hm" in targets else next(iter(targets.values())).shape[0]
    if chunk <= 0 or chunk >= batch:
        return loss_fn(outputs, targets)
    parts = []
    for lo in range(0, batch, chunk):
        sl = slice(lo, lo + chunk)
        parts.append(loss_fn([{k: v[sl] for k, v in o.items()} for o in outputs], {k: v[sl] for k, v in targets.items()}))
    return {k: torch.stack([p[k] for p in parts]).mean() for k in parts[0]}


def train(
    recipe: Recipe,
    out_dir: str | Path,
    device: str = "cpu",
    resume: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train `recipe`, writing out_dir/{last.pt, metrics.jsonl, loss.png}; returns a summary."""
    progress = progress or Progress()
    out_dir = Path(out_dir)
    tr = recipe.train
    if device == "cuda" and not torch.cuda.is_available():
        raise KpnetError("--device", "cuda requested but no CUDA device is available")
    index = load_split(recipe, "train")

    torch.manual_seed(tr.seed)
    memory_format = torch.channels_last if tr.channels_last else torch.contiguous_format
    detector = build_detector(recipe)
    model = detector.network.to(device, memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=tr.lr)
    per_epoch = len(index.image_ids) // tr.batch_size
    if per_epoch == 0:
        raise KpnetError(index.ann_file, f"{len(index.image_ids)} images are fewer than train.batch_size={tr.batch_size}")
    total = tr.epochs * per_epoch
    steps = [s * per_epoch for s in tr.lr_steps]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, warmup=tr.warmup_iters, steps=steps))
    start = 0
    ckpt_path = out_dir / "last.pt"
    if resume:
        doc = read_checkpoint(ckpt_path)
        load_weights(model, doc, ckpt_path)
        optimizer.load_state_dict(doc["optimizer"])
        scheduler.load_state_dict(doc["scheduler"])
        start = int(doc["iteration"])
    end = min(total, tr.max_iterations) if tr.max_iterations > 0 else total

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    history = _read_history(metrics_path, start) if resume else []
    atomic_write_text(metrics_path, "".join(json.dumps(h) + "\n" for h in history))

    out_h = out_w = output_size(tr.input_size)
    encode = functools.partial(encode_input_boxes, detector.target_renderer(), out_h / tr.input_size, (out_h, out_w))
    a = recipe.augment
    dataset = TrainDataset(
        index, encode, tr.input_size, a.scales, a.flip, a.color_jitter, a.lighting, tr.seed, a.border, a.crop
    )
    sampler = EpochBatchSampler(len(dataset), tr.batch_size, tr.seed, start, end)
    workers = recipe.data.num_workers
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate, persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    use_amp, amp_dtype = mixed_precision(tr.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    loss_fn = detector.loss

    def state(iteration: int) -> dict[str, Any]:
        return {
            "iteration": iteration, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "class_names": index.class_names, "cat_ids": index.cat_ids,
        }

    if device == "cpu":
        reuse_freed_memory()
    if device == "cpu" and workers > 0 and "OMP_NUM_THREADS" not in os.environ:
        # Leave the DataLoader workers their cores: oversubscribed OpenMP threads spin against them
        # (measured 10x slower steps on 2 cores with 2 threads + 1 worker).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - workers))
    model.train()
    progress.start(start, end)
    it = start
    tic = time.perf_counter()
    last: dict[str, float] = {}
    with open(metrics_path, "a", encoding="utf-8") as log:
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            images = batch.pop("image").contiguous(memory_format=memory_format)
            with torch.autocast(device_type=device, dtype=amp_dtype, enabled=use_amp):
                outputs = model(images)
            losses = chunked_loss(loss_fn, outputs, batch, recipe.loss.chunk_size)
            if not torch.isfinite(losses["loss"]):
                raise KpnetError(recipe.source or None, f"loss became {losses['loss'].item()} at iteration {it + 1}; lower train.lr or set train.grad_clip")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            if tr.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            it += 1
            last = {k: float(v.detach()) for k, v in losses.items()}
            elapsed = time.perf_counter() - tic
            rate = (it - start) / elapsed if elapsed > 0 else 0.0
            if it % tr.log_every == 0 or it == end:
                log.write(json.dumps({"iteration": it, "lr": scheduler.get_last_lr()[0], **last}) + "\n")
                log.flush()
            progress.step(it, last, rate)
            if it % tr.checkpoint_every == 0 or it == end:
                save_checkpoint(ckpt_path, model, recipe, **state(it))
    if it == start and not ckpt_path.exists():
        save_checkpoint(ckpt_path, model, recipe, **state(it))
    plot = plot_losses(metrics_path, out_dir / "loss.png")
    return {
        "run_dir": str(out_dir),
        "checkpoint": str(ckpt_path),
        "metrics": str(metrics_path),
        "loss_plot": str(plot) if plot else None,
        "iterations": it,
        "total_iterations": total,
        "start_iteration": start,
        "seconds": round(time.perf_counter() - tic, 3),
        "final_losses": last,
        "train_images": len(index.image_ids),
        "dropped_boxes": index.dropped_boxes,
    }


def encode_input_boxes(render: TargetRenderer, ratio: float, out_hw: tuple[int, int], boxes: Any, classes: Any) -> dict[str, Any]:
    """Map augmented input-pixel boxes onto the output grid (× out/inp) and render the family's targets."""
    return render(boxes * ratio, classes, out_hw=out_hw)


def _read_history(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r.get("iteration", math.inf) <= upto]


def plot_losses(metrics_path: Path, png: Path) -> Path | None:
    """Loss curves (total and each term) from metrics.jsonl, as a PNG."""
    rows = _read_history(metrics_path, math.inf)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    its = [r["iteration"] for r in rows]
    for key in [k for k in rows[-1] if k.endswith("loss")]:
        ax.plot(its, [r.get(key, float("nan")) for r in rows], label=key, linewidth=1.2 if key == "loss" else 0.8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_savefig(png, fig, dpi=100)
    plt.close(fig)
    return png
