"""Shared fixtures: the real third-party data folder and small generated `shapes` sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("KPNET_TEST_DATA", REPO / ".." / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.fail(f"test data not found at {path}: put shared/ beside the repo or set KPNET_TEST_DATA")
    return path


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
