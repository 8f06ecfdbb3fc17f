"""The training loop: Adam with warmup and step decay, per-chunk losses, AMP on CUDA, gradient
clipping, atomic checkpoints every N iterations and at the end, exact `--resume`, metrics.jsonl
and a loss-curve PNG.

Resume is exact because nothing random lives outside the checkpoint: the sample order and
every augmentation draw are functions of (seed, epoch, index), and model, optimizer and
scheduler state are saved with the iteration number.

A run holds its folder's lock (`kpnet.io.run_lock`). SIGTERM or SIGINT finishes the current step,
writes last.pt and raises `Stopped`; a second one exits at once, leaving last.pt as it was. A
non-finite loss term stops the run (or, with `train.on_nonfinite: skip`, drops the step) before
anything is written over the last good checkpoint.

Under torchrun (`kpnet.engine.distributed`) every rank runs this loop on its share of each global
batch, in `train.accumulate` micro-batches, through DistributedDataParallel; rank 0 alone holds the
lock and writes metrics, plots and checkpoints (of the bare network: no `module.` prefixes). The
ranks agree after every iteration on its loss terms and on whether a signal asked them to stop, so
they stop at the same iteration; when another rank is gone, rank 0 writes the last completed
iteration (the weights are the same on every rank after each step) and the run ends with exit 4.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kpnet.config import Recipe, TrainConfig, with_num_classes
from kpnet.data.dataset import EpochBatchSampler, TrainDataset, collate, load_split
from kpnet.data.validate import require_segmentations
from kpnet.detectors.base import TargetRenderer
from kpnet.engine import accelerate, distributed
from kpnet.engine.checkpoint import checkpoint_recipe, load_weights, read_checkpoint, resume_differences, save_checkpoint
from kpnet.engine.host_memory import reuse_freed_memory
from kpnet.errors import KpnetError
from kpnet.io import PENDING, atomic_savefig, atomic_write_text, run_lock, write_error
from kpnet.models import build_detector
from kpnet.targets import output_size


@dataclass
class Progress:
    """Callbacks the caller (the CLI's rich progress bar) receives; all optional."""

    start: Callable[[int, int], None] = lambda start, total: None
    step: Callable[[int, dict[str, float], float], None] = lambda it, losses, its_per_s: None


class Stopped(Exception):
    """Training stopped on a signal after writing `checkpoint` at `iteration`; the exit code is 128 + signal."""

    def __init__(self, signum: int, iteration: int, checkpoint: Path) -> None:
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at iteration {iteration}")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """SIGTERM and SIGINT append to the yielded list (read between steps); a second one exits at once."""
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if not received:
            received.append(signum)
            return
        for tmp in list(PENDING):  # a checkpoint being written is dropped; last.pt stays as it was
            with contextlib.suppress(OSError):
                tmp.unlink()
        os.write(2, f"error: {signal.Signals(signum).name} again: exiting at once, the last checkpoint "
                    "is left as it was\n".encode())
        os._exit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _ignore_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which stops after the current step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def nonfinite_terms(losses: dict[str, Tensor]) -> list[str]:
    """Names of the non-finite loss terms, the components before the total `loss`."""
    finite = torch.stack([v.detach().float() for v in losses.values()]).isfinite().tolist()
    bad = [k for k, ok in zip(losses, finite, strict=True) if not ok]
    return sorted(bad, key=lambda k: k == "loss")


def lr_factor(it: int, warmup: int, steps: list[int]) -> float:
    """Linear warmup from 1/3 over `warmup` iterations, then ×0.1 at each step iteration."""
    warm = 1.0 if warmup <= 0 or it >= warmup else 1 / 3 + (2 / 3) * it / warmup
    return warm * (0.1 ** sum(it >= s for s in steps))


def schedule(tr: TrainConfig, per_epoch: int) -> tuple[int, list[int]]:
    """Total iterations and the lr/10 step iterations: `train.iterations` with `lr_step_fractions` of it (the same
    compute for any data-set size), or `epochs` and `lr_steps` (epochs) of `per_epoch` iterations."""
    if tr.iterations > 0:
        return tr.iterations, [round(f * tr.iterations) for f in tr.lr_step_fractions]
    return tr.epochs * per_epoch, [s * per_epoch for s in tr.lr_steps]


def mixed_precision(amp: bool, device: str) -> tuple[bool, torch.dtype]:
    """Whether to autocast and to which dtype: float16 on CUDA, bfloat16 on CPUs that run it natively (the inference
    engine's rule: AVX512-BF16 or AMX; oneDNN's own check also passes on plain AVX512, where bf16 is emulated)."""
    if device == "cuda":
        return amp, torch.float16
    return amp and torch.backends.mkldnn.is_available() and accelerate.native_bf16_cpu(), torch.bfloat16


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
    force: bool = False,
) -> dict[str, Any]:
    """Train `recipe` into out_dir/{last.pt, metrics.jsonl, loss.png} under its run lock; `Stopped` on a signal.

    Under torchrun this process is one rank of the run (see the module docstring); only rank 0 touches out_dir.
    """
    out_dir = Path(out_dir)
    if device == "cuda" and not torch.cuda.is_available():
        raise KpnetError("--device", "cuda requested but no CUDA device is available")
    with distributed.process_group(device) as world:
        if not world.is_main:
            with stop_on_signals() as received:
                return _train(recipe, out_dir, device, resume, Progress(), force, received, world)
        created = not out_dir.exists()
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(out_dir, e, False) from None
        try:
            with run_lock(out_dir), stop_on_signals() as received:
                return _train(recipe, out_dir, device, resume, progress or Progress(), force, received, world)
        finally:
            if created:  # a run that failed before writing anything leaves no empty folder behind
                with contextlib.suppress(OSError):
                    out_dir.rmdir()


def _resume_state(recipe: Recipe, ckpt_path: Path, force: bool, world: distributed.World, device: torch.device) -> dict[str, Any]:
    """The checkpoint to resume from, read and checked by rank 0 and shared with the other ranks."""
    doc: dict[str, Any] | None = None
    if world.is_main:
        try:
            doc = read_checkpoint(ckpt_path)
            differences = resume_differences(checkpoint_recipe(doc, ckpt_path), recipe)
            if differences and not force:
                more = f" (+{len(differences) - 5} more)" if len(differences) > 5 else ""
                raise KpnetError(ckpt_path, f"--resume with a recipe that differs from the checkpoint's: "
                                            f"{'; '.join(differences[:5])}{more}; resume with the same recipe, or add --force")
        except KpnetError as e:
            if not world.distributed:
                raise
            distributed.broadcast_state({"error": e.line()}, world, device)
            raise
    doc = distributed.broadcast_state(doc, world, device)
    if "error" in doc:
        raise KpnetError(None, f"rank 0 cannot resume: {doc['error']}")
    return doc


def _train(recipe: Recipe, out_dir: Path, device: str, resume: bool, progress: Progress, force: bool,
           received: list[int], world: distributed.World) -> dict[str, Any]:
    tr = recipe.train
    split = distributed.plan(tr, world.size, device, recipe.source or None)
    index = load_split(recipe, "train")
    recipe = with_num_classes(recipe, len(index.cat_ids))

    torch.manual_seed(tr.seed)
    memory_format = torch.channels_last if tr.channels_last else torch.contiguous_format
    detector = build_detector(recipe)
    model = detector.network.to(device, memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=tr.lr)
    per_epoch = len(index.image_ids) // tr.batch_size
    if per_epoch == 0:
        raise KpnetError(index.ann_file, f"{len(index.image_ids)} images are fewer than train.batch_size={tr.batch_size}")
    total, steps = schedule(tr, per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, warmup=tr.warmup_iters, steps=steps))
    start = 0
    ckpt_path = out_dir / "last.pt"
    comm_device = torch.device(device, torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    if resume:
        doc = _resume_state(recipe, ckpt_path, force, world, comm_device)
        load_weights(model, doc, ckpt_path)
        optimizer.load_state_dict(doc["optimizer"])
        scheduler.load_state_dict(doc["scheduler"])
        start = int(doc["iteration"])
    end = min(total, tr.max_iterations) if tr.max_iterations > 0 else total

    metrics_path = out_dir / "metrics.jsonl"
    history = _read_history(metrics_path, start) if resume and world.is_main else []
    net: nn.Module = model
    if world.distributed:
        if tr.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # Batch-norm running statistics stay per rank (rank 0's are checkpointed); training uses batch statistics.
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.cuda.current_device()] if device == "cuda" else None, forward_sync_buffers=False)

    out_h = out_w = output_size(tr.input_size)
    encode = functools.partial(encode_input_boxes, detector.target_renderer(), out_h / tr.input_size, (out_h, out_w))
    a = recipe.augment
    encode_masks = detector.mask_encoder(out_h / tr.input_size, (out_h, out_w))
    if encode_masks is not None:
        require_segmentations(index.coco.dataset, index.ann_file)
    dataset = TrainDataset(
        index, encode, tr.input_size, a.scales, a.flip, a.color_jitter, a.lighting, tr.seed, a.border, a.crop,
        encode_masks, flip_pairs=detector.flip_pairs,
    )
    sampler = distributed.MicroBatchSampler(EpochBatchSampler(len(dataset), tr.batch_size, tr.seed, start, end),
                                            split, world.rank)
    workers = recipe.data.num_workers
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate, persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None, worker_init_fn=_ignore_signals if workers > 0 else None,
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
    if world.is_main:
        progress.start(start, end)
    it = saved = start
    tic = time.perf_counter()
    last: dict[str, float] = {}
    counts = {"amp_skipped": 0, "nonfinite_skipped": 0}
    in_a_row = 0

    def checkpoint() -> None:
        nonlocal saved
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise KpnetError(recipe.source or None, f"the weights became non-finite by iteration {it}; "
                                                    f"{_kept(ckpt_path, saved, start)}")
        save_checkpoint(ckpt_path, model, recipe, **state(it))
        saved = it

    def micro_step(batch: dict[str, Tensor], last_micro: bool) -> dict[str, Tensor]:
        """Forward, loss and backward of one micro-batch; DDP averages the gradients over ranks on the last one."""
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        images = batch.pop("image").contiguous(memory_format=memory_format)
        sync = contextlib.nullcontext() if last_micro or not world.distributed else net.no_sync()  # type: ignore[operator]
        with sync, distributed.peers_alive(f"iteration {it + 1}"):
            with torch.autocast(device_type=device, dtype=amp_dtype, enabled=use_amp):
                outputs = net(images)
            losses = chunked_loss(loss_fn, outputs, batch, recipe.loss.chunk_size)
            total = losses["loss"] if split.accumulate == 1 else losses["loss"] / split.accumulate
            scaler.scale(total).backward()
        return losses

    try:
        with contextlib.ExitStack() as stack:
            log = None
            for group in _iterations(loader, split.accumulate):
                optimizer.zero_grad(set_to_none=True)
                sums: Tensor | None = None
                for micro, batch in enumerate(group):
                    losses = micro_step(batch, micro == split.accumulate - 1)
                    values = torch.stack([v.detach().float() for v in losses.values()])
                    sums = values if sums is None else sums + values
                assert sums is not None
                signalled = False
                if world.distributed:  # the mean loss terms of the global batch, and whether any rank was signalled
                    agreed = distributed.all_reduce_sum(torch.cat([sums, sums.new_tensor([float(bool(received))])]),
                                                        world, f"iteration {it + 1}")
                    sums, signalled = agreed[:-1], bool(agreed[-1] > 0)
                means = dict(zip(losses, sums / (split.ranks * split.accumulate), strict=True))
                bad = nonfinite_terms(means)
                if bad:
                    in_a_row += 1
                    if tr.on_nonfinite == "stop" or in_a_row >= tr.nonfinite_limit:
                        streak = f" ({in_a_row} steps in a row)" if tr.on_nonfinite == "skip" else ""
                        raise KpnetError(recipe.source or None, f"loss term {bad[0]} became {means[bad[0]].item()} at "
                                                                f"iteration {it + 1}{streak}; {_kept(ckpt_path, saved, start)}; "
                                                                "lower train.lr or set train.grad_clip")
                    counts["nonfinite_skipped"] += 1
                else:
                    in_a_row = 0
                    if tr.grad_clip > 0:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip)
                    scale = scaler.get_scale() if scaler.is_enabled() else 0.0
                    scaler.step(optimizer)
                    scaler.update()
                    counts["amp_skipped"] += scaler.is_enabled() and scaler.get_scale() < scale  # an overflow skipped the step
                    last = {k: float(v) for k, v in means.items()}
                scheduler.step()
                it += 1
                if not world.is_main:
                    if signalled and it < end:
                        raise Stopped(received[0] if received else signal.SIGTERM, it, ckpt_path)
                    continue
                if log is None:  # nothing is written before a step completes; then the rows past `start` go
                    atomic_write_text(metrics_path, "".join(json.dumps(h) + "\n" for h in history))
                    log = stack.enter_context(open(metrics_path, "a", encoding="utf-8"))
                elapsed = time.perf_counter() - tic
                rate = (it - start) / elapsed if elapsed > 0 else 0.0
                if not bad and (it % tr.log_every == 0 or it == end):
                    extra = {k: v for k, v in counts.items() if v}
                    log.write(json.dumps({"iteration": it, "lr": scheduler.get_last_lr()[0], **last, **extra}) + "\n")
                    log.flush()
                progress.step(it, last, rate)
                if it % tr.checkpoint_every == 0 or it == end:
                    checkpoint()
                if (signalled if world.distributed else received) and it < end:
                    if saved != it:
                        checkpoint()
                    raise Stopped(received[0] if received else signal.SIGTERM, it, ckpt_path)
    except distributed.PeerLost as e:
        if not world.is_main:
            raise
        if saved != it:  # the weights after the last completed step are every rank's: keep them
            checkpoint()
        raise distributed.PeerLost(None, f"{e.message}; stopped at iteration {it}: {ckpt_path} holds iteration "
                                         f"{saved}") from None
    if not world.is_main:
        return {"rank": world.rank, "iterations": it, "start_iteration": start, "final_losses": last,
                "batch_split": split.to_dict()}
    if it == start and not ckpt_path.exists():
        checkpoint()
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
        **counts,
        "train_images": len(index.image_ids),
        "dropped_boxes": index.dropped_boxes,
        "batch_split": split.to_dict(),
    }


def _iterations(loader: Iterable[dict[str, Tensor]], accumulate: int) -> Iterator[list[dict[str, Tensor]]]:
    """The loader's micro-batches grouped `accumulate` to an iteration.

    The loader's iterator lives in this generator's frame, so it (and its DataLoader workers, which ignore
    SIGTERM) is shut down as soon as the training loop is left, not at interpreter exit.
    """
    micro = iter(loader)
    while group := list(itertools.islice(micro, accumulate)):
        yield group


def _kept(ckpt_path: Path, saved: int, start: int) -> str:
    """What is left on disk when a run stops on a non-finite value."""
    if saved == start and not ckpt_path.exists():
        return "no checkpoint was written"
    return f"{ckpt_path} (iteration {saved}) is kept as the last good checkpoint"


def encode_input_boxes(render: TargetRenderer, ratio: float, out_hw: tuple[int, int], boxes: Any, classes: Any,
                       keypoints: Any = None) -> dict[str, Any]:
    """Map augmented input-pixel boxes (and a pose family's keypoints) onto the output grid (× out/inp) and
    render the family's targets."""
    if keypoints is None:
        return render(boxes * ratio, classes, out_hw=out_hw)
    keypoints = keypoints.copy()
    keypoints[..., :2] *= ratio
    return render(boxes * ratio, classes, out_hw=out_hw, keypoints=keypoints)


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
