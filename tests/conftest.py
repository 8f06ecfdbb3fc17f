"""Shared fixtures: the real third-party data folder and small generated `shapes` sets.

The third-party data (`../shared/data` beside the repository, or `$KPNET_TEST_DATA`) is not part of
the repository: tests that read it (the `data_dir` fixture, or the `shared_data` mark) skip, naming the
folder, when it is absent — except under CI (`CI` set), where its absence fails them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
# Narrow networks for tests that need a model, not a trained one (recipe overrides; the recipe schema rejects a key
# the backbone does not read, so each list fits its recipes).
TINY_QUICKSTART = ["model.hg_dims=[16,16,16,16,16]", "model.hg_stem=8", "model.hg_cnv=16", "model.head_conv=16"]
TINY_RESNET = ["model.width=8", "model.up_channels=[16,16,16]", "model.head_conv=16"]  # custom_small, points ResNets
TINY_HOURGLASS = ["model.backbone=hourglass_small", "model.stacks=1", "model.hg_dims=[8,8,8,8,8]",  # any recipe
                  "model.hg_modules=[1,1,1,1,1]", "model.hg_stem=8", "model.hg_cnv=8"]


def shared_data_dir() -> Path:
    """Where the third-party test data is expected (it may be absent)."""
    return Path(os.environ.get("KPNET_TEST_DATA", REPO / ".." / "shared" / "data")).resolve()


def require_shared_data() -> Path:
    """The third-party data folder; skip the test when it is absent, or fail under CI."""
    path = shared_data_dir()
    if not path.is_dir():
        message = f"third-party test data not found at {path}: put shared/ beside the repo or set KPNET_TEST_DATA"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "shared_data: reads the third-party data in ../shared/data ($KPNET_TEST_DATA)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("shared_data") is not None:
        require_shared_data()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return require_shared_data()


@pytest.fixture(scope="session")
def shapes_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small shapes set (64 train / 24 val images) shared by the tests of one session."""
    from kpnet.data.shapes import make_shapes

    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, num_train=64, num_val=24, image_size=128, seed=3)
    return root


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m kpnet.cli ARGS` in a subprocess, as a shell pipeline would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "kpnet.cli", *args], capture_output=True, text=True, cwd=cwd or REPO, env=full_env, timeout=timeout
    )


def parse_json_stdout(proc: subprocess.CompletedProcess) -> Any:
    """The single JSON document a `--json` command printed on stdout."""
    return json.loads(proc.stdout)
