"""Bad recipes and checkpoints: exit 2, one stderr line naming the file and the culprit, no
traceback, JSON on stdout under --json — for `kpnet train` and `kpnet eval`."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_QUICKSTART, run_cli
from kpnet.config import load_recipe
from kpnet.engine.checkpoint import save_checkpoint
from kpnet.models import build_model

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


class Payload:
    """Any non-tensor class: unpickling it would run arbitrary code paths."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("this must never run",))


def assert_one_line_error(proc, culprit: str, path: Path | str) -> None:  # type: ignore[no-untyped-def]
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {path}") and culprit in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["exit_code"] == 2 and culprit in doc["error"]


@pytest.mark.parametrize(
    "name,culprit",
    [
        ("recipe_unknown_key.yaml", "unknown key train.learning_rate"),
        ("recipe_bad_value.yaml", "train.batch_size: expected an integer, got 'thirty-two'"),
        ("recipe_not_yaml.yaml", "invalid YAML"),
    ],
)
def test_bad_recipes(name: str, culprit: str) -> None:
    for command in (["train"], ["eval", "--checkpoint", "x.pt"]):
        proc = run_cli(command[0], str(CORPUS / name), *command[1:], "--json")
        assert_one_line_error(proc, culprit, CORPUS / name)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpt")
    recipe = load_recipe(QUICKSTART, TINY_QUICKSTART)
    other = load_recipe(QUICKSTART, ["model.hg_dims=[16,16,24,24,32]", "model.head_conv=16"])
    save_checkpoint(d / "other_arch.pt", build_model(other), other)
    save_checkpoint(d / "good.pt", build_model(recipe), recipe)
    torch.save({"format": "kpnet-checkpoint-1", "model": {}, "evil": Payload()}, d / "pickled.pt")
    with open(d / "pickled_raw.pt", "wb") as f:
        pickle.dump({"format": "kpnet-checkpoint-1", "evil": Payload()}, f)
    data = (d / "good.pt").read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"weights": torch.zeros(3)}, d / "foreign.pt")
    return {p.stem: p for p in d.iterdir()}


@pytest.mark.parametrize(
    "name,culprit",
    [
        ("other_arch", "checkpoint does not match the recipe's architecture"),
        ("pickled", "refusing to load: the checkpoint holds pickled objects other than tensors (print)"),
        ("pickled_raw", "refusing to load"),
        ("truncated", "not a readable PyTorch checkpoint"),
        ("foreign", "not a kpnet checkpoint"),
        ("missing", "checkpoint not found"),
    ],
)
def test_bad_checkpoints(checkpoints: dict[str, Path], shapes_small: Path, name: str, culprit: str, capfd) -> None:  # type: ignore[no-untyped-def]
    path = checkpoints.get(name, checkpoints["good"].parent / "missing.pt")
    args = ["eval", str(QUICKSTART), "--checkpoint", str(path), "--json", "--set", f"data.root={shapes_small}"]
    for s in TINY_QUICKSTART:
        args += ["--set", s]
    proc = run_cli(*args)
    assert_one_line_error(proc, culprit, path)
    assert "this must never run" not in proc.stdout + proc.stderr
