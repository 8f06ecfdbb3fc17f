"""Distributed training and evaluation on torch.distributed (torchrun, DDP) proven on CPU with gloo:
2 ranks × 4 images equal 1 process × `accumulate: 2` (losses and weights), a rank that dies or a
SIGTERM ends the run with last.pt kept and `--resume` continues the trajectory (also on another number
of ranks), two "machines" on one host, and `kpnet eval` over 2 ranks writes the 1-rank results JSON.

The tests that start processes take 30-90 s each on a 2-core machine (mostly start-up), so they are `slow`:
`.ci/run` runs them; the default suite keeps the split, sampler and shard rules and the launcher's exit 2."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import REPO, parse_json_stdout, run_cli
from kpnet.engine.checkpoint import read_checkpoint
from kpnet.config import load_recipe
from kpnet.engine.distributed import BatchSplit, MicroBatchSampler, World, plan, shard, split_batch
from kpnet.errors import KpnetError

CORNER = REPO / "recipes" / "cornernet_small_shapes.yaml"
ENV = {"OMP_NUM_THREADS": "1"}  # one thread per rank
# The small CornerNet recipe as it is (bfloat16 autocast where the CPU runs it natively, channels-last),
# a global batch of 8, 20 iterations.
SETS = ["data.num_workers=0", "train.batch_size=8", "train.log_every=1", "train.warmup_iters=0",
        "train.max_iterations=20", "train.checkpoint_every=10"]
TERMS = ("loss", "focal_loss", "pull_loss", "push_loss", "off_loss", "lr")


def train_args(shapes: Path, out: Path, *sets: str, resume: bool = False) -> list[str]:
    args = ["train", str(CORNER), "--out", str(out), "--json"]
    for s in [f"data.root={shapes}", *SETS, *sets]:
        args += ["--set", s]
    return args + (["--resume"] if resume else [])


def torchrun(*args: str, nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m kpnet ARGS`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "--log-dir=/dev/null",
           "-m", "kpnet", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **ENV}, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_same_losses(a: list[dict], b: list[dict], tol: float = 1e-5) -> None:
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in TERMS:
            assert abs(ra[key] - rb[key]) <= tol, (ra["iteration"], key, ra[key], rb[key])


def assert_same_weights(a: Path, b: Path, tol: float = 1e-5) -> None:
    """Parameters equal to `tol`; batch-norm running statistics excepted (each rank keeps its own)."""
    sa, sb = read_checkpoint(a)["model"], read_checkpoint(b)["model"]
    assert sa.keys() == sb.keys() and not any(k.startswith("module.") for k in sb)
    for k in sa:
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        assert torch.allclose(sa[k].float(), sb[k].float(), rtol=0, atol=tol), (k, (sa[k] - sb[k]).abs().max())


@pytest.fixture(scope="module")
def one_process(shapes_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 process, batch 8 as 2 accumulation steps of 4 images."""
    out = tmp_path_factory.mktemp("one") / "run"
    proc = run_cli(*train_args(shapes_small, out, "train.accumulate=2"), env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "global batch 8 = 1 rank × 2 accumulation steps × 4 images" in proc.stderr
    return out


@pytest.fixture(scope="module")
def two_ranks(shapes_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`torchrun --nproc-per-node 2`, gloo, global batch 8 (4 per rank)."""
    out = tmp_path_factory.mktemp("two") / "run"
    proc = torchrun(*train_args(shapes_small, out))
    assert proc.returncode == 0, proc.stderr
    assert "global batch 8 = 2 ranks × 1 accumulation step × 4 images" in proc.stderr
    doc = parse_json_stdout(proc)  # one document: rank 0's
    assert doc["iterations"] == 20 and doc["batch_split"] == {"global": 8, "ranks": 2, "accumulate": 1, "micro_batch": 4}
    return out


@pytest.mark.slow
def test_two_ranks_equal_one_process_accumulating_the_same_micro_batches(one_process: Path, two_ranks: Path) -> None:
    assert_same_losses(read_metrics(one_process), read_metrics(two_ranks))
    assert [r["iteration"] for r in read_metrics(two_ranks)] == list(range(1, 21))
    assert_same_weights(one_process / "last.pt", two_ranks / "last.pt")
    assert sorted(p.name for p in two_ranks.iterdir()) == ["last.pt", "loss.png", "metrics.jsonl"]
    assert read_checkpoint(two_ranks / "last.pt").keys() == read_checkpoint(one_process / "last.pt").keys()


@pytest.mark.slow
def test_eval_on_two_ranks_writes_the_one_rank_results(shapes_small: Path, two_ranks: Path, tmp_path: Path) -> None:
    args = ["eval", str(CORNER), "--checkpoint", str(two_ranks / "last.pt"), "--set", f"data.root={shapes_small}",
            "--set", "data.num_workers=0", "--json"]
    one = run_cli(*args, "--out", str(tmp_path / "one.json"), env=ENV)
    assert one.returncode == 0, one.stderr
    two = torchrun(*args, "--out", str(tmp_path / "two.json"))
    assert two.returncode == 0, two.stderr
    assert (tmp_path / "two.json").read_bytes() == (tmp_path / "one.json").read_bytes()
    assert json.loads((tmp_path / "one.json").read_text())  # detections, not an empty list
    assert parse_json_stdout(two)["bbox"] == parse_json_stdout(one)["bbox"]


def test_micro_batches_of_ranks_and_accumulation_steps_coincide() -> None:
    batches = [list(range(i * 8, i * 8 + 8)) for i in range(3)]
    one = list(MicroBatchSampler(batches, BatchSplit(8, 1, 2), rank=0))  # type: ignore[arg-type]
    r0 = list(MicroBatchSampler(batches, BatchSplit(8, 2, 1), rank=0))  # type: ignore[arg-type]
    r1 = list(MicroBatchSampler(batches, BatchSplit(8, 2, 1), rank=1))  # type: ignore[arg-type]
    assert one == [m for pair in zip(r0, r1, strict=True) for m in pair]
    assert one[:2] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    four = [list(MicroBatchSampler(batches, BatchSplit(8, 2, 2), rank=r)) for r in range(2)]  # type: ignore[arg-type]
    assert four[0][:2] == [[0, 1], [2, 3]] and four[1][:2] == [[4, 5], [6, 7]]


def test_batch_that_does_not_divide_names_the_valid_choices() -> None:
    assert split_batch(96, 8, 1).micro == 12 and split_batch(96, 1, 8).micro == 12
    with pytest.raises(KpnetError) as e:
        split_batch(10, 2, 3, "r.yaml")
    assert e.value.exit_code == 2
    assert e.value.line() == ("r.yaml: train.batch_size=10 does not split into 2 rank(s) × train.accumulate=3 equal "
                              "micro-batches; valid train.batch_size: multiples of 6 (6, 12, 18, 24, 30, ...); "
                              "valid train.accumulate on 2 rank(s): 1, 5")


def test_sync_bn_over_cpu_ranks_is_exit_2_and_one_process_has_nothing_to_sync() -> None:
    train = load_recipe(CORNER, ["train.sync_bn=true", "train.batch_size=8"]).train
    with pytest.raises(KpnetError, match="train.sync_bn: SyncBatchNorm runs on GPUs only"):
        plan(train, 2, "cpu")
    assert plan(train, 1, "cpu").micro == 8 and plan(train, 2, "cuda").micro == 4


def test_nproc_per_node_with_a_batch_that_does_not_divide_is_exit_2(shapes_small: Path, tmp_path: Path) -> None:
    proc = run_cli(*train_args(shapes_small, tmp_path / "run", "train.batch_size=9"), "--nproc-per-node", "2")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {CORNER}: train.batch_size=9 does not split into 2 rank(s) × train.accumulate=1 equal micro-batches; "
        "valid train.batch_size: multiples of 2 (2, 4, 6, 8, 10, ...); valid train.accumulate on 2 rank(s): none"]
    assert json.loads(proc.stdout)["exit_code"] == 2
    assert not (tmp_path / "run").exists()


def test_shards_cover_the_images_in_order() -> None:
    for n in (0, 1, 5, 24):
        for size in (1, 2, 3):
            parts = [shard(n, World(r, size)) for r in range(size)]
            assert [i for p in parts for i in p] == list(range(n))


def launch(args: list[str]) -> subprocess.Popen:
    """`kpnet train --nproc-per-node 2` as a child of this process."""
    return subprocess.Popen([sys.executable, "-m", "kpnet", *args, "--nproc-per-node", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, **ENV})


def rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the worker of local rank `rank` under the launcher `parent`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if f"LOCAL_RANK={rank}".encode() in environ and int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            return int(entry.name)
    return None


def wait_until(proc: subprocess.Popen, ready: Callable[[], bool], seconds: float = 300) -> None:
    """Poll until `ready()` while the launch is alive, for at most `seconds`."""
    deadline = time.time() + seconds
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.01)


@pytest.mark.slow
def test_killed_rank_ends_the_run_and_resume_follows_the_trajectory(shapes_small: Path, two_ranks: Path,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = train_args(shapes_small, out, "train.checkpoint_every=5")
    proc = launch(args)
    wait_until(proc, lambda: (out / "last.pt").exists())
    victim = rank_pid(proc.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGKILL, stderr
    stopped_at = read_checkpoint(out / "last.pt")["iteration"]  # loads: never half-written
    assert 5 <= stopped_at < 20
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: rank 1 (pid {victim}) was killed by SIGKILL; the other ranks were stopped"), lines
    assert lines[-1].endswith("--nproc-per-node 2 --resume"), lines[-1]
    assert f"stopped at iteration {stopped_at}: {out / 'last.pt'} holds iteration {stopped_at}" in lines[-2]
    assert json.loads(stdout)["exit_code"] == 4  # rank 0's document
    assert [r["iteration"] for r in read_metrics(out)] == list(range(1, stopped_at + 1))

    resumed = launch(train_args(shapes_small, out, "train.checkpoint_every=5", resume=True))
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert json.loads(stdout)["start_iteration"] == stopped_at
    assert_same_losses(read_metrics(two_ranks), read_metrics(out))
    assert_same_weights(two_ranks / "last.pt", out / "last.pt")


@pytest.mark.slow
def test_sigterm_stops_every_rank_and_one_process_resumes_exactly(shapes_small: Path, two_ranks: Path,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = train_args(shapes_small, out, "train.checkpoint_every=1000")
    proc = launch(args)
    wait_until(proc, lambda: (out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 4)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr
    stopped_at = read_checkpoint(out / "last.pt")["iteration"]
    assert 4 <= stopped_at < 20
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"stopped at iteration {stopped_at}; resume with: kpnet train "), last
    assert last.endswith(" --nproc-per-node 2 --resume"), last
    assert json.loads(stdout)["stopped"] is True
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "metrics.jsonl"]  # no lock, no temporary

    # One process with 2 accumulation steps runs the 2 ranks' micro-batches: the resumed run is exact.
    resumed = run_cli(*train_args(shapes_small, out, "train.checkpoint_every=1000", "train.accumulate=2", resume=True),
                      env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert parse_json_stdout(resumed)["start_iteration"] == stopped_at
    assert_same_losses(read_metrics(two_ranks), read_metrics(out))
    assert_same_weights(two_ranks / "last.pt", out / "last.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_machines_on_one_host_equal_one_process(shapes_small: Path, one_process: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    port = free_port()
    nodes = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1",
               f"--rdzv-endpoint=127.0.0.1:{port}", "--log-dir=/dev/null", "-m", "kpnet",
               *train_args(shapes_small, out, "train.max_iterations=10")]
        nodes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                      env={**os.environ, **ENV}))
    results = [p.communicate(timeout=600) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], results
    assert parse_json_stdout(subprocess.CompletedProcess([], 0, results[0][0], ""))["iterations"] == 10
    assert results[1][0].strip() == ""  # rank 1 prints no document
    assert_same_losses(read_metrics(one_process)[:10], read_metrics(out))
    ten = tmp_path / "one10"
    proc = run_cli(*train_args(shapes_small, ten, "train.accumulate=2", "train.max_iterations=10"), env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert_same_weights(ten / "last.pt", out / "last.pt")
