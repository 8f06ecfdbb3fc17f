"""Training and evaluation over torch.distributed: one process per GPU (or per CPU share), started by
`torchrun` (or `kpnet train --nproc-per-node N`, which runs torchrun's launcher in-process).

A process learns its place from the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK); with
WORLD_SIZE above 1 it joins the group over NCCL (CUDA) or gloo (CPU). The global batch
`train.batch_size` is split over the ranks and over `train.accumulate` steps into equal micro-batches
(`split_batch`); each iteration's global batch is the one a single process draws, so the sample
stream stays a function of (seed, epoch, image) whatever the number of ranks.

Between ranks only tensors travel: the checkpoint a resume starts from is broadcast as the bytes
`torch.save` writes and read back with `weights_only=True`; evaluation results travel as JSON text.
A collective that fails because another process is gone raises `PeerLost` (exit 4).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import signal
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from kpnet.config import TrainConfig
from kpnet.errors import KpnetError

LAUNCH_COMMAND_ENV = "KPNET_LAUNCH_COMMAND"  # the user's `kpnet train --nproc-per-node` line, for the resume hint


class PeerLost(KpnetError):
    """Another process of the run ended (killed, crashed, its machine gone): this one stops too, exit 4."""

    exit_code = 4


@dataclass(frozen=True)
class World:
    """This process's place in the run: global rank, number of processes, rank on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, draws and writes checkpoints and results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The World torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK); a plain process is rank 0 of 1."""
    env = os.environ
    return World(int(env.get("RANK") or 0), int(env.get("WORLD_SIZE") or 1), int(env.get("LOCAL_RANK") or 0))


@contextlib.contextmanager
def process_group(device: str) -> Iterator[World]:
    """Join the run's process group (NCCL on CUDA, gloo on CPU) for the duration; a no-op for one process."""
    world = world_from_env()
    if not world.distributed:
        yield world
        return
    if device == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise KpnetError("--nproc-per-node", f"local rank {world.local_rank} has no GPU: this machine has "
                                                 f"{torch.cuda.device_count()}; start one process per GPU")
        torch.cuda.set_device(world.local_rank)
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.size)
    try:
        yield world
    finally:
        dist.destroy_process_group()


# What the transports say when the other end of a collective is gone (gloo's TCP pairs, NCCL, the c10d store).
_PEER_GONE = re.compile(r"connection (closed|reset)|broken pipe|timed out|timeout|nccl|gloo|c10d|socket", re.I)


@contextlib.contextmanager
def peers_alive(what: str) -> Iterator[None]:
    """Turn a collective's failure because a peer is gone into `PeerLost` naming `what` was going on (in a
    process group only: one process has no peers to lose)."""
    try:
        yield
    except PeerLost:
        raise
    except (RuntimeError, dist.DistError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not dist.is_initialized() or (not isinstance(e, dist.DistError) and not _PEER_GONE.search(text)):
            raise
        text = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0]  # gloo's source location and advice go
        raise PeerLost(None, f"another process of the run is gone ({what}): {text[:160]}") from None


@dataclass(frozen=True)
class BatchSplit:
    """How a global batch is split: `ranks` × `accumulate` micro-batches of `micro` images each."""

    batch: int
    ranks: int
    accumulate: int

    @property
    def micro(self) -> int:
        return self.batch // (self.ranks * self.accumulate)

    @property
    def per_rank(self) -> int:
        return self.batch // self.ranks

    def describe(self) -> str:
        return (f"global batch {self.batch} = {self.ranks} rank{'s' if self.ranks > 1 else ''} × {self.accumulate} "
                f"accumulation step{'s' if self.accumulate > 1 else ''} × {self.micro} images")

    def to_dict(self) -> dict[str, int]:
        return {"global": self.batch, "ranks": self.ranks, "accumulate": self.accumulate, "micro_batch": self.micro}


def split_batch(batch: int, ranks: int, accumulate: int, source: str | None = None) -> BatchSplit:
    """Split `train.batch_size` over ranks and accumulation steps, or exit 2 naming the choices that divide."""
    if accumulate < 1:
        raise KpnetError(source, f"train.accumulate must be at least 1, got {accumulate}")
    if batch < 1:
        raise KpnetError(source, f"train.batch_size must be at least 1, got {batch}")
    parts = ranks * accumulate
    if batch % parts:
        batches = ", ".join(str(parts * k) for k in range(1, 6))
        steps = ", ".join(str(a) for a in range(1, batch + 1) if batch % (ranks * a) == 0) or "none"
        raise KpnetError(source, f"train.batch_size={batch} does not split into {ranks} rank(s) × train.accumulate="
                                 f"{accumulate} equal micro-batches; valid train.batch_size: multiples of {parts} "
                                 f"({batches}, ...); valid train.accumulate on {ranks} rank(s): {steps}")
    return BatchSplit(batch, ranks, accumulate)


def plan(train: TrainConfig, ranks: int, device: str, source: str | None = None) -> BatchSplit:
    """The batch split of a run on `ranks` processes, after checking that `train.sync_bn` can run there."""
    if train.sync_bn and ranks > 1 and device != "cuda":
        raise KpnetError(source, "train.sync_bn: SyncBatchNorm runs on GPUs only; on CPU each rank keeps its own "
                                 "batch norm: set train.sync_bn=false")
    return split_batch(train.batch_size, ranks, train.accumulate, source)


class MicroBatchSampler(Sampler):
    """This rank's micro-batches: each global batch of `batches` cut into ranks × accumulate equal parts;
    rank r takes parts r·A … r·A + A − 1 (contiguous), so R ranks × A steps see the micro-batches that
    one process with R·A accumulation steps sees."""

    def __init__(self, batches: Sampler, split: BatchSplit, rank: int) -> None:
        self.batches, self.split, self.rank = batches, split, rank

    def __len__(self) -> int:
        return len(self.batches) * self.split.accumulate  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[Any]]:
        s = self.split
        for batch in self.batches:
            mine = batch[self.rank * s.per_rank:(self.rank + 1) * s.per_rank]
            for a in range(s.accumulate):
                yield mine[a * s.micro:(a + 1) * s.micro]


def all_reduce_sum(values: torch.Tensor, world: World, what: str) -> torch.Tensor:
    """Sum a small tensor over the ranks (in place); one process returns it as it is."""
    if world.distributed:
        with peers_alive(what):
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def _broadcast_bytes(data: bytes | None, world: World, device: torch.device) -> bytes:
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if data is not None and world.is_main
           else torch.empty(int(size.item()), dtype=torch.uint8, device=device))
    dist.broadcast(buf, src=0)
    return buf.cpu().numpy().tobytes()


def broadcast_state(doc: dict[str, Any] | None, world: World, device: torch.device) -> dict[str, Any]:
    """Rank 0's checkpoint dict on every rank (resume on machines that do not share rank 0's disk).

    It travels as the bytes `torch.save` writes and is read back with `weights_only=True`.
    """
    if not world.distributed:
        assert doc is not None
        return doc
    data = None
    if world.is_main:
        buffer = io.BytesIO()
        torch.save(doc, buffer)
        data = buffer.getvalue()
    with peers_alive("sharing the checkpoint to resume from"):
        data = _broadcast_bytes(data, world, device)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def shard(count: int, world: World) -> range:
    """The contiguous share of `count` items this rank takes: in rank order the shards cover 0..count-1."""
    lo = count * world.rank // world.size
    return range(lo, count * (world.rank + 1) // world.size)


def gather_json(items: list[Any], world: World, device: torch.device) -> list[Any] | None:
    """Every rank's `items` (JSON values) concatenated in rank order on rank 0; None on the other ranks."""
    if not world.distributed:
        return items
    data = json.dumps(items).encode()
    with peers_alive("gathering the results"):
        size = torch.tensor([len(data)], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(size) for _ in range(world.size)]
        dist.all_gather(sizes, size)
        longest = max(int(s.item()) for s in sizes)
        buf = torch.zeros(longest, dtype=torch.uint8, device=device)
        buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
        parts = [torch.empty_like(buf) for _ in range(world.size)] if world.is_main else None
        dist.gather(buf, parts, dst=0)
    if parts is None:
        return None
    out: list[Any] = []
    for part, n in zip(parts, sizes, strict=True):
        out += json.loads(part[:int(n.item())].cpu().numpy().tobytes())
    return out


def resume_hint(argv: Sequence[str]) -> str:
    """The line that resumes this run: the user's own `kpnet train --nproc-per-node` line, or under torchrun
    the same torchrun options before `kpnet train … --resume`."""
    import shlex

    line = os.environ.get(LAUNCH_COMMAND_ENV)
    if line:
        return line if "--resume" in shlex.split(line) else f"{line} --resume"
    args = list(argv) if "--resume" in argv else [*argv, "--resume"]
    if world_from_env().distributed:
        return f"torchrun <the same options> -m kpnet {shlex.join(args)}"
    return "kpnet " + shlex.join(args)


def launch(nproc: int, argv: Sequence[str], command: str, device: str) -> int:
    """Run `python -m kpnet ARGV` in `nproc` processes on this machine through torchrun's own launcher.

    The workers print their own output (rank 0 logs); a signal to this process reaches them once
    (they stop after the current step, rank 0 writing last.pt). Returns the exit code: the workers'
    when they agree, else the first failed one's (128 + signal for a killed process).
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise KpnetError("--nproc-per-node", f"expected at least 1, got {nproc}")
    if device == "cuda" and nproc > torch.cuda.device_count():
        raise KpnetError("--nproc-per-node", f"{nproc} processes but {torch.cuda.device_count()} GPU(s): one process per GPU")
    for name in list(logging.root.manager.loggerDict):  # the launcher's own log lines; kpnet says what happened
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: one thread per process unless the user says
    os.environ[LAUNCH_COMMAND_ENV] = command
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
        rdzv_endpoint="localhost:0", max_restarts=0, logs_specs=DefaultLogsSpecs(log_dir=os.devnull),
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "kpnet", *argv)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode < 0:
            name = signal.Signals(-failure.exitcode).name
            sys.stderr.write(f"error: rank {rank} (pid {failure.pid}) was killed by {name}; the other ranks were "
                             f"stopped (rank 0 keeps last.pt); resume with: {resume_hint(argv)}\n")
            return 128 - failure.exitcode
        return failure.exitcode
    finally:
        os.environ.pop(LAUNCH_COMMAND_ENV, None)
    return 0
