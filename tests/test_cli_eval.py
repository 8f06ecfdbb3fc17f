"""`kpnet eval` from a shell pipeline: the COCO API's published figures through the CLI, and a
model-backed evaluation with its results file, metrics file and `--min-ap` exit codes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import REPO, TINY_QUICKSTART, parse_json_stdout, run_cli
from kpnet.config import load_recipe
from kpnet.engine.checkpoint import save_checkpoint
from kpnet.models import build_model

KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def published_bbox(path: Path) -> list[float]:
    text = path.read_text().split("type=bbox", 1)[1]
    return [float(v) for v in re.findall(r"\] = ([0-9.]+)", text)][:12]


def test_eval_results_file_matches_published(data_dir: Path) -> None:
    d = data_dir / "val2014_100"
    proc = run_cli("eval", "--gt", str(d / "instances_val2014_100.json"),
                   "--dets", str(d / "instances_val2014_fakebbox100_results.json"), "--fd-rates", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = parse_json_stdout(proc)
    assert doc["bbox"]["AP"] == 0.5045806987249628
    assert list(doc["bbox"]) == KEYS
    for key, value in zip(KEYS, published_bbox(d / "published_eval_results.txt"), strict=True):
        assert round(doc["bbox"][key], 3) == value, key
    assert doc["fd"]["FD"] == pytest.approx(0.300244, abs=1e-6)


def test_eval_gt_dets_usage_errors(data_dir: Path) -> None:
    d = data_dir / "val2014_100"
    proc = run_cli("eval", "--gt", str(d / "instances_val2014_100.json"), "--json")
    assert proc.returncode == 2 and "--dets" in json.loads(proc.stdout)["error"]
    proc = run_cli("eval", "--json")
    assert proc.returncode == 2 and "RECIPE and --checkpoint" in json.loads(proc.stdout)["error"]


def test_eval_checkpoint_writes_results_and_checks_min_ap(shapes_small: Path, tmp_path: Path) -> None:
    sets = [f"data.root={shapes_small}", *TINY_QUICKSTART,
            "data.num_workers=0"]
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", sets)
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, build_model(recipe), recipe)
    args = ["eval", str(REPO / "recipes" / "quickstart.yaml"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "r.json"), "--json"]
    for s in sets:
        args += ["--set", s]
    ok = run_cli(*args, "--min-ap", "0")
    assert ok.returncode == 0, ok.stderr
    doc = parse_json_stdout(ok)
    assert doc["checks_failed"] == [] and doc["images"] == 24
    results = json.loads((tmp_path / "r.json").read_text())
    assert len(results) == doc["detections"] and all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in results)
    metrics = json.loads((tmp_path / "r.metrics.json").read_text())
    assert metrics["bbox"] == doc["bbox"]
    failed = run_cli(*args, "--min-ap", "0.99")
    assert failed.returncode == 1
    doc = parse_json_stdout(failed)
    assert doc["bbox"]["AP"] < 0.99 and doc["checks_failed"] and "--min-ap" in doc["checks_failed"][0]
    assert "check failed" in failed.stderr
