"""Training engine: the loss falls, checkpoints are atomic, and a run killed with SIGKILL resumes
onto exactly the trajectory of an uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_QUICKSTART, parse_json_stdout, run_cli
from kpnet.config import load_recipe
from kpnet.engine.checkpoint import read_checkpoint
from kpnet.engine.train import lr_factor, train

QUICKSTART = REPO / "recipes" / "quickstart.yaml"
TINY = [*TINY_QUICKSTART, "train.batch_size=8",
        "data.num_workers=0", "train.log_every=1", "train.warmup_iters=0"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_quickstart_loss_is_finite_and_falls(shapes_small: Path, tmp_path: Path) -> None:
    recipe = load_recipe(QUICKSTART, [f"data.root={shapes_small}", "data.num_workers=0", "train.log_every=1",
                                      "train.max_iterations=50", "train.checkpoint_every=1000"])
    summary = train(recipe, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    losses = [r["loss"] for r in rows]
    assert len(losses) == 50 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10
    assert summary["iterations"] == 50
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = read_checkpoint(tmp_path / "run" / "last.pt")
    assert doc["iteration"] == 50 and doc["recipe"]["name"] == "quickstart"


def test_lr_schedule_warmup_and_steps() -> None:
    assert lr_factor(0, 30, [100]) == pytest.approx(1 / 3)
    assert lr_factor(15, 30, [100]) == pytest.approx(2 / 3)
    assert lr_factor(30, 30, [100, 200]) == 1.0
    assert lr_factor(150, 30, [100, 200]) == pytest.approx(0.1)
    assert lr_factor(250, 30, [100, 200]) == pytest.approx(0.01)


def _train_args(shapes: Path, out: Path, resume: bool = False) -> list[str]:
    sets = [f"data.root={shapes}", *TINY, "train.max_iterations=40", "train.checkpoint_every=5", "train.epochs=100"]
    args = ["train", str(QUICKSTART), "--out", str(out), "--json"]
    for s in sets:
        args += ["--set", s]
    return args + (["--resume"] if resume else [])


def test_sigkill_and_resume_reproduce_the_trajectory(shapes_small: Path, tmp_path: Path) -> None:
    env = {"OMP_NUM_THREADS": "1"}
    full = run_cli(*_train_args(shapes_small, tmp_path / "full"), env=env)
    assert full.returncode == 0, full.stderr
    assert parse_json_stdout(full)["iterations"] == 40
    progress = [line for line in full.stderr.splitlines() if line.startswith("train quickstart it ")]
    assert [line.split()[3] for line in progress] == [f"{i}/40" for i in (1, *range(3, 41, 2), 40)]

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "kpnet.cli", *_train_args(shapes_small, killed_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO, env={**os.environ, **env})
    deadline = time.time() + 300
    while not (killed_dir / "last.pt").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stopped_at = read_checkpoint(killed_dir / "last.pt")["iteration"]  # loads: never half-written
    assert 5 <= stopped_at < 40 and stopped_at % 5 == 0

    resumed = run_cli(*_train_args(shapes_small, killed_dir, resume=True), env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert parse_json_stdout(resumed)["start_iteration"] == stopped_at
    a, b = read_metrics(tmp_path / "full"), read_metrics(killed_dir)
    assert [r["iteration"] for r in b] == list(range(1, 41))
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "hm_loss", "wh_loss", "off_loss", "lr"):
            assert abs(ra[key] - rb[key]) <= 1e-6, (ra["iteration"], key, ra[key], rb[key])


def test_resume_without_checkpoint_is_a_clear_error(shapes_small: Path, tmp_path: Path) -> None:
    proc = run_cli(*_train_args(shapes_small, tmp_path / "none", resume=True))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'none' / 'last.pt'}: checkpoint not found"]
    assert json.loads(proc.stdout)["exit_code"] == 2
