"""Disk trouble while writing checkpoints and results (ENOSPC, EIO, EFBIG from RLIMIT_FSIZE): one line
naming the path and the errno, exit 2, the previous file byte-identical; checkpoints are read back
before they replace the old one; a signal during a write leaves no partial file."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from conftest import REPO, TINY_QUICKSTART
from kpnet.cli.common import run
from kpnet.config import load_recipe
from kpnet.engine.checkpoint import read_checkpoint, save_checkpoint
from kpnet.errors import KpnetError
from kpnet.io import _CountingFile, atomic_write, atomic_write_json
from kpnet.models import build_model

QUICKSTART = REPO / "recipes" / "quickstart.yaml"
TINY = [*TINY_QUICKSTART, "train.batch_size=8",
        "data.num_workers=0", "train.warmup_iters=0"]


def limited_cli(limit: int, *args: str) -> subprocess.CompletedProcess:
    """`kpnet ARGS` unable to write files past `limit` bytes: writes fail with EFBIG, as a full disk fails them."""

    def cap() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "kpnet.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=cap, timeout=600)


def sets(*values: str) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def test_enospc_names_path_and_errno_and_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    atomic_write_json(target, [{"v": 1}])
    before = target.read_bytes()

    def full(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write('[{"v": ')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(KpnetError) as e:
        atomic_write(target, full)
    assert e.value.line() == f"{target}: cannot write: No space left on device (ENOSPC); the previous file is unchanged"
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]

    with pytest.raises(KpnetError, match=r"new.json: cannot write: Input/output error \(EIO\); nothing was written$"):
        atomic_write(tmp_path / "new.json", lambda tmp: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_read_only_folder_is_erofs_like(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("kpnet.io.tempfile.mkstemp", read_only)
    with pytest.raises(KpnetError, match=r"a.json: cannot write: Read-only file system \(EROFS\); nothing was written"):
        atomic_write_json(tmp_path / "a.json", {})


@pytest.fixture()
def checkpoint(tmp_path: Path) -> tuple[Path, bytes]:
    recipe = load_recipe(QUICKSTART, TINY)
    path = save_checkpoint(tmp_path / "last.pt", build_model(recipe), recipe, iteration=1)
    return path, path.read_bytes()


def test_checkpoint_enospc_mid_torch_save_keeps_the_old_checkpoint(
    checkpoint: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, before = checkpoint
    real = _CountingFile.write

    class FullDisk:
        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fill_up(self: _CountingFile, data: bytes) -> int:
        if self.written > 20_000:
            self.f = FullDisk()
        return real(self, data)

    monkeypatch.setattr(_CountingFile, "write", fill_up)
    recipe = load_recipe(QUICKSTART, TINY)
    with pytest.raises(KpnetError) as e:
        save_checkpoint(path, build_model(recipe), recipe, iteration=2)
    assert e.value.line() == f"{path}: cannot write: No space left on device (ENOSPC); the previous file is unchanged"
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_checkpoint_that_does_not_read_back_is_not_installed(
    checkpoint: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that silently loses bytes (a failing disk) is caught by the size check after writing."""
    path, before = checkpoint
    real = _CountingFile.write

    def lossy(self: _CountingFile, data: bytes) -> int:
        real(self, data[: len(data) // 2])
        self.written += len(data) - len(data) // 2
        return len(data)

    monkeypatch.setattr(_CountingFile, "write", lossy)
    recipe = load_recipe(QUICKSTART, TINY)
    with pytest.raises(KpnetError, match=r"last.pt: the checkpoint did not write back whole \(\d+ of \d+ bytes"):
        save_checkpoint(path, build_model(recipe), recipe, iteration=2)
    assert path.read_bytes() == before
    assert read_checkpoint(path)["iteration"] == 1


def test_training_checkpoint_on_a_full_disk_exits_2_with_the_old_checkpoint(shapes_small: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", str(QUICKSTART), "--out", str(out), "--json",
            *sets(f"data.root={shapes_small}", *TINY, "train.max_iterations=2")]
    assert limited_cli(2**30, *args).returncode == 0
    before = (out / "last.pt").read_bytes()
    args[args.index("train.max_iterations=2")] = "train.max_iterations=4"
    proc = limited_cli(len(before) // 2, *args, "--resume")
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("train quickstart it ")]
    assert errors == [f"error: {out / 'last.pt'}: cannot write: File too large (EFBIG); the previous file is unchanged"]
    assert json.loads(proc.stdout)["exit_code"] == 2
    assert (out / "last.pt").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_results_file_on_a_full_disk_exits_2_with_the_old_results(shapes_small: Path, tmp_path: Path) -> None:
    recipe = load_recipe(QUICKSTART, TINY)
    ckpt = save_checkpoint(tmp_path / "last.pt", build_model(recipe), recipe, iteration=0)
    results = tmp_path / "results.json"
    args = ["eval", str(QUICKSTART), "--checkpoint", str(ckpt), "--out", str(results), "--json",
            *sets(f"data.root={shapes_small}", *TINY)]
    assert limited_cli(2**30, *args).returncode == 0
    before = results.read_bytes()
    proc = limited_cli(len(before) // 2, *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {results}: cannot write: File too large (EFBIG); the previous file is unchanged"]
    assert results.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "results.json", "results.metrics.json"]


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_a_results_write_leaves_no_partial_file(tmp_path: Path, signum: int, code: int) -> None:
    target = tmp_path / "results.json"

    def interrupted(tmp: Path) -> None:
        tmp.write_text('[{"image_id": 1, ')
        os.kill(os.getpid(), signum)

    # A process started in the background of a non-interactive shell inherits SIGINT ignored; the command
    # under test is a normally started one, whose SIGINT raises KeyboardInterrupt.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(typer.Exit) as e:
            run(False, False, lambda out: atomic_write(target, interrupted))
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert e.value.exit_code == code
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
