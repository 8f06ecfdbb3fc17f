"""The wheel carries every kernel source and header: built from a copy of the tree (`pip wheel`), installed
non-editable into a fresh venv (which borrows this environment's dependencies through a path entry, not its
editable kpnet), it runs `kpnet info`, an emulated corner pool built from its own files and a detection with the
demo-sized model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from kpnet.cuda import dispatch
from kpnet.cuda.emulator import SOURCE_DIR

REPO = Path(__file__).resolve().parents[1]
_EMULATOR = dispatch.emulator_status()

_SCRIPT = """
import json, os, sys
import numpy as np
import torch
import kpnet
from kpnet.ops import corner_pool

site = sys.argv[1]
assert kpnet.__file__.startswith(site), f"kpnet imported from {kpnet.__file__}, not the wheel in {site}"
x = torch.randn(2, 3, 9, 7)
y = corner_pool(x, "top")  # KPNET_KERNELS=emulate: compiled from the installed sources into an empty cache
assert torch.equal(y, torch.cummax(x.flip(2), 2).values.flip(2))
assert any(p.name.startswith("kpnet_emulator_") for p in os.scandir(os.environ["KPNET_CACHE_DIR"]))
model = kpnet.build_detector(kpnet.load_recipe(sys.argv[2]))
image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
(dets,) = kpnet.detect(model, [image])
print(json.dumps({"kpnet": kpnet.__file__, "detections": [len(dets), *dets.boxes.shape[1:]]}))
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "*.egg-info",
                                                             "__pycache__", ".pytest_cache"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
          str(tmp / "dist"), str(src)], cwd=tmp)
    (path,) = (tmp / "dist").glob("kpnet-*.whl")
    return path


def test_wheel_carries_every_kernel_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    kernel_files = [p.name for p in SOURCE_DIR.iterdir() if p.suffix in (".cu", ".cuh", ".h")]
    assert "kpnet_types.cuh" in kernel_files
    assert {f"kpnet/cuda/{name}" for name in kernel_files} <= names


@pytest.mark.skipif(not _EMULATOR[0], reason=f"the emulator cannot be built here: {_EMULATOR[1]}")
def test_installed_wheel_runs(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path)
    site_dir = Path(site.stdout.strip())
    # This environment's dependencies as a plain path entry: its .pth files (the editable kpnet) are not processed.
    (site_dir / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
          "--ignore-installed", "-q", str(wheel)], cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(KPNET_KERNELS="emulate", KPNET_CACHE_DIR=str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    info = _run([str(venv / "bin" / "kpnet"), "info"], cwd=tmp_path, env=env)
    assert "corner_pool" in info.stdout and "emulate" in info.stdout
    out = _run([str(python), "-c", _SCRIPT, str(site_dir), str(REPO / "recipes" / "quickstart.yaml")], cwd=tmp_path,
               env=env)
    count, width = json.loads(out.stdout)["detections"]
    assert 0 < count <= 100 and width == 4  # K = 100 peaks, those scoring above 0 kept
