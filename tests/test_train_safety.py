"""Training you can trust with a week of GPU time: SIGTERM/SIGINT stop after the current step with
last.pt written and the command that resumes, a second signal exits at once, non-finite loss terms
stop (or skip) without writing over the last good checkpoint, one run per folder, and --resume
refuses a recipe that differs from the checkpoint's."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import REPO, TINY_QUICKSTART, parse_json_stdout, run_cli
from kpnet.cli import app
from kpnet.config import load_recipe
from kpnet.engine import train as engine
from kpnet.engine.checkpoint import read_checkpoint
from kpnet.errors import KpnetError
from kpnet.io import LOCK_NAME, run_lock

QUICKSTART = REPO / "recipes" / "quickstart.yaml"
TINY = [*TINY_QUICKSTART, "train.batch_size=8",
        "data.num_workers=0", "train.log_every=1", "train.warmup_iters=0", "train.epochs=100"]
ENV = {"OMP_NUM_THREADS": "1"}


def train_args(shapes: Path, out: Path, *sets: str, resume: bool = False) -> list[str]:
    args = ["train", str(QUICKSTART), "--out", str(out), "--json"]
    for s in [f"data.root={shapes}", *TINY, *sets]:
        args += ["--set", s]
    return args + (["--resume"] if resume else [])


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def start_training(args: list[str], **kwargs) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    """`kpnet train` as a child of this process (not of a shell, which would ignore SIGINT for it)."""
    return subprocess.Popen([sys.executable, "-m", "kpnet.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env={**os.environ, **ENV}, **kwargs)


def wait_for_rows(proc: subprocess.Popen, run_dir: Path, rows: int) -> None:
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").exists() or len(read_metrics(run_dir)) < rows:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.01)


@pytest.fixture(scope="module")
def full_run(shapes_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 40-iteration run to compare interrupted-and-resumed runs with."""
    out = tmp_path_factory.mktemp("full") / "run"
    proc = run_cli(*train_args(shapes_small, out, "train.max_iterations=40"), env=ENV)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("signum,workers", [(signal.SIGTERM, 0), (signal.SIGINT, 1)])
def test_signal_stops_after_the_step_and_resume_follows_the_trajectory(
    shapes_small: Path, tmp_path: Path, full_run: Path, signum: int, workers: int
) -> None:
    out = tmp_path / "run"
    args = train_args(shapes_small, out, "train.max_iterations=40", "train.checkpoint_every=1000",
                      f"data.num_workers={workers}")
    # SIGINT goes to the whole process group, as Ctrl-C in a terminal does (DataLoader workers too).
    proc = start_training(args, start_new_session=True)
    wait_for_rows(proc, out, 6)
    os.killpg(proc.pid, signum)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, stderr
    last = stderr.strip().splitlines()[-1]
    stopped_at = read_checkpoint(out / "last.pt")["iteration"]
    assert 6 <= stopped_at < 40
    assert last.startswith(f"stopped at iteration {stopped_at}; resume with: kpnet train "), last
    command = last.split("resume with: ", 1)[1]
    assert shlex.split(command) == ["kpnet", *args, "--resume"]
    doc = json.loads(stdout)
    assert doc == {"stopped": True, "iteration": stopped_at, "checkpoint": str(out / "last.pt"),
                   "resume": command, "exit_code": 128 + signum}
    assert [r["iteration"] for r in read_metrics(out)] == list(range(1, stopped_at + 1))
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "metrics.jsonl"]  # no lock, no temporary

    resumed = run_cli(*shlex.split(command)[1:], env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert parse_json_stdout(resumed)["start_iteration"] == stopped_at
    a, b = read_metrics(full_run), read_metrics(out)
    assert [r["iteration"] for r in b] == list(range(1, 41))
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "hm_loss", "wh_loss", "off_loss", "lr"):
            assert abs(ra[key] - rb[key]) <= 1e-6, (ra["iteration"], key, ra[key], rb[key])


def test_second_signal_exits_at_once_leaving_the_checkpoint(shapes_small: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    slow = "train.batch_size=32"  # steps long enough for both signals to land in one
    first = run_cli(*train_args(shapes_small, out, slow, "train.max_iterations=3"), env=ENV)
    assert first.returncode == 0, first.stderr
    before = (out / "last.pt").read_bytes()
    proc = start_training(train_args(shapes_small, out, slow, "train.max_iterations=400", "train.checkpoint_every=1000",
                                     resume=True))
    wait_for_rows(proc, out, 5)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)  # a signal sent while the first is pending is merged into it
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "error: SIGTERM again: exiting at once, the last checkpoint is left as it was"
    assert (out / "last.pt").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def _tiny_recipe(shapes: Path, *sets: str):  # type: ignore[no-untyped-def]
    return load_recipe(QUICKSTART, [f"data.root={shapes}", *TINY, *sets])


def _poison(monkeypatch: pytest.MonkeyPatch, bad_calls: set[int], term: str = "hm_loss") -> None:
    """Make `term` (and the total) NaN on the given loss calls (1-based: call k is iteration k of a fresh run)."""
    calls = {"n": 0}
    real = engine.chunked_loss

    def poisoned(*args, **kwargs):  # type: ignore[no-untyped-def]
        losses = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in bad_calls:
            losses = {**losses, term: losses[term] * float("nan"), "loss": losses["loss"] * float("nan")}
        return losses

    monkeypatch.setattr(engine, "chunked_loss", poisoned)


def test_nan_loss_term_stops_at_its_iteration_keeping_the_last_good_checkpoint(
    shapes_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _poison(monkeypatch, {5}, "wh_loss")
    recipe = _tiny_recipe(shapes_small, "train.max_iterations=10", "train.checkpoint_every=2")
    with pytest.raises(KpnetError) as e:
        engine.train(recipe, tmp_path / "run")
    assert e.value.source == str(QUICKSTART)
    assert e.value.message.startswith(
        f"loss term wh_loss became nan at iteration 5; {tmp_path / 'run' / 'last.pt'} (iteration 4) is kept as the "
        "last good checkpoint")
    doc = read_checkpoint(tmp_path / "run" / "last.pt")
    assert doc["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in doc["model"].values() if v.is_floating_point())
    assert [r["iteration"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]


def test_skip_drops_the_step_and_stops_after_the_limit_in_a_row(
    shapes_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _poison(monkeypatch, {3, 6, 7})
    recipe = _tiny_recipe(shapes_small, "train.max_iterations=10", "train.on_nonfinite=skip", "train.nonfinite_limit=3")
    summary = engine.train(recipe, tmp_path / "skip")
    assert summary["iterations"] == 10 and summary["nonfinite_skipped"] == 3
    rows = read_metrics(tmp_path / "skip")
    assert [r["iteration"] for r in rows] == [1, 2, 4, 5, 8, 9, 10]
    assert rows[-1]["nonfinite_skipped"] == 3 and "nonfinite_skipped" not in rows[0]

    _poison(monkeypatch, set(range(4, 100)))
    with pytest.raises(KpnetError, match=r"loss term hm_loss became nan at iteration 6 \(3 steps in a row\); "
                                         r"no checkpoint was written"):
        engine.train(recipe, tmp_path / "limit")


def test_on_nonfinite_must_be_stop_or_skip(shapes_small: Path, tmp_path: Path) -> None:
    proc = run_cli(*train_args(shapes_small, tmp_path / "run", "train.on_nonfinite=ignore"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {QUICKSTART}: train.on_nonfinite: unknown value 'ignore'; "
                                                 "valid values: stop, skip"]
    assert not (tmp_path / "run").exists()


def test_second_training_into_a_folder_is_refused_until_the_first_dies(shapes_small: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = start_training(train_args(shapes_small, out, "train.max_iterations=4000"))
    try:
        wait_for_rows(first, out, 1)
        second = run_cli(*train_args(shapes_small, out, "train.max_iterations=2"), env=ENV)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"error: {out}: another `kpnet train` is running in this folder (pid {first.pid} on "), lines
        assert json.loads(second.stdout)["exit_code"] == 2
    finally:
        first.kill()  # SIGKILL: the lock file stays behind, the kernel's lock does not
        first.communicate()
    assert (out / LOCK_NAME).read_text().startswith(f"pid {first.pid} on ")
    third = run_cli(*train_args(shapes_small, out, "train.max_iterations=2"), env=ENV)
    assert third.returncode == 0, third.stderr
    assert not (out / LOCK_NAME).exists()


def test_run_lock_is_exclusive_within_a_process_too(tmp_path: Path) -> None:
    with run_lock(tmp_path):
        with pytest.raises(KpnetError, match=rf"another `kpnet train` is running in this folder \(pid {os.getpid()} on "):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):
        assert (tmp_path / LOCK_NAME).exists()
    assert list(tmp_path.iterdir()) == []


def test_resume_with_a_different_recipe_names_the_keys_and_needs_force(shapes_small: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    engine.train(_tiny_recipe(shapes_small, "train.max_iterations=2"), out)
    before = (out / "last.pt").read_bytes()
    changed = _tiny_recipe(shapes_small, "train.max_iterations=3", "train.lr=1e-3", "model.head_conv=16", "augment.flip=0")
    with pytest.raises(KpnetError) as e:
        engine.train(changed, out, resume=True)
    assert e.value.line() == (
        f"{out / 'last.pt'}: --resume with a recipe that differs from the checkpoint's: augment.flip: 0.5 -> 0.0; "
        "train.lr: 0.002 -> 0.001; resume with the same recipe, or add --force")
    assert (out / "last.pt").read_bytes() == before
    # max_iterations, log_every, checkpoint_every, num_workers and test.* may change on resume
    same = _tiny_recipe(shapes_small, "train.max_iterations=3", "train.checkpoint_every=7", "test.k=5")
    assert engine.train(same, out, resume=True)["start_iteration"] == 2
    changed = _tiny_recipe(shapes_small, "train.max_iterations=4", "train.lr=1e-3", "augment.flip=0")
    assert engine.train(changed, out, resume=True, force=True)["start_iteration"] == 3
    assert read_checkpoint(out / "last.pt")["recipe"]["train"]["lr"] == 1e-3


def test_resume_force_is_a_cli_option(shapes_small: Path, tmp_path: Path) -> None:
    proc = run_cli(*train_args(shapes_small, tmp_path / "none", "train.lr=1e-3", resume=True), "--force")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'none' / 'last.pt'}: checkpoint not found"]
    assert not (tmp_path / "none").exists()


def test_learning_rate_written_1e_minus_3_trains(shapes_small: Path, tmp_path: Path) -> None:
    proc = run_cli(*train_args(shapes_small, tmp_path / "run", "train.max_iterations=1", "train.lr=1e-3"), env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert read_checkpoint(tmp_path / "run" / "last.pt")["recipe"]["train"]["lr"] == 1e-3
    res = CliRunner().invoke(app, train_args(shapes_small, tmp_path / "bad", "train.lr=abc"))
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [f"error: {QUICKSTART}: train.lr: expected a number, got 'abc'"]
    assert not (tmp_path / "bad").exists()
