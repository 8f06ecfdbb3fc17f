"""Slow: pose on the whole synthetic people val set (all-ground-truth decoding, snapping), and the small CPU pose
recipe trained end to end through the CLI (`prepare-data poses`, `train`, `eval`) to the keypoint AP the README
reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, parse_json_stdout, run_cli
from kpnet.analysis.error_analysis import predict_with_replacement
from kpnet.data.dataset import load_index
from kpnet.data.poses import make_poses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def people_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic people val set as `prepare-data poses` writes it (200 images, seed 0)."""
    root = tmp_path_factory.mktemp("poses")
    make_poses(root, num_train=0, num_val=200, image_size=128, seed=0)
    return root


def test_all_ground_truth_on_the_whole_val_set(people_val: Path) -> None:
    from test_pose import detector_for, keypoint_ap

    index = load_index(people_val / "annotations" / "person_keypoints_val.json", people_val / "val")
    detector = detector_for(people_val)
    assert keypoint_ap(index, predict_with_replacement(detector, index, set(detector.heads))) >= 0.99


@pytest.mark.training
def test_small_pose_recipe_trains_to_keypoint_ap(tmp_path: Path) -> None:
    """README "Pose": the CPU recipe trains in <= 15 min on 2 cores (measured 601 s under load) to keypoint AP 0.556
    and bbox AP 0.632 on synthetic val (the issue's goal: keypoint AP >= 0.5); the bounds leave room for CPU
    differences and run-to-run spread (the same network at 22 epochs: 0.541)."""
    data, run = tmp_path / "poses", tmp_path / "run"
    proc = run_cli("prepare-data", "poses", "--out", str(data), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    recipe = str(REPO / "recipes" / "centernet_pose_small_people.yaml")
    proc = run_cli("train", recipe, "--set", f"data.root={data}", "--out", str(run), "--json", timeout=3600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert parse_json_stdout(proc)["seconds"] <= 15 * 60
    proc = run_cli("eval", recipe, "--checkpoint", str(run / "last.pt"), "--set", f"data.root={data}", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = parse_json_stdout(proc)
    assert doc["keypoints"]["AP"] >= 0.45, json.dumps(doc["keypoints"])
    assert doc["bbox"]["AP"] >= 0.55, json.dumps(doc["bbox"])
