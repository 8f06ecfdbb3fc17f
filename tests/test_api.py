"""The library API the CLI stands on: load_recipe, build_detector, load_checkpoint, detect."""

from __future__ import annotations

from pathlib import Path

import cv2
import torch

import kpnet
from conftest import REPO, TINY_QUICKSTART, run_cli
from kpnet.engine.checkpoint import save_checkpoint



def test_detect_returns_image_pixel_boxes(shapes_small: Path, tmp_path: Path) -> None:
    recipe = kpnet.load_recipe(REPO / "recipes" / "quickstart.yaml", TINY_QUICKSTART + ["test.k=7"])
    torch.manual_seed(0)
    detector = kpnet.build_detector(recipe)
    assert detector.recipe is recipe and isinstance(detector, kpnet.Detector)
    save_checkpoint(tmp_path / "m.pt", detector.network, recipe, class_names=["a"] * 6)
    loaded = kpnet.load_checkpoint(tmp_path / "m.pt")
    assert loaded.recipe == recipe and not loaded.network.training and loaded.class_names == ["a"] * 6
    for a, b in zip(detector.network.state_dict().values(), loaded.network.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    path = shapes_small / "val" / "000000.jpg"
    image = cv2.imread(str(path))
    wide = cv2.resize(image, (200, 90))
    by_path, by_array, by_wide = kpnet.detect(loaded, [path, image, wide])
    assert torch.equal(by_path.boxes, by_array.boxes) and torch.equal(by_path.scores, by_array.scores)
    for dets, (h, w) in [(by_path, image.shape[:2]), (by_wide, (90, 200))]:
        assert isinstance(dets, kpnet.Detections) and len(dets) == 7 and dets.boxes.shape == (7, 4)
        assert (dets.boxes[:, [0, 2]] >= 0).all() and (dets.boxes[:, [0, 2]] <= w).all()
        assert (dets.boxes[:, [1, 3]] >= 0).all() and (dets.boxes[:, [1, 3]] <= h).all()
        assert (dets.scores[:-1] >= dets.scores[1:]).all()
        assert dets.classes.dtype == torch.int64 and set(dets.classes.tolist()) <= set(range(6))


def test_version_and_help() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"kpnet {kpnet.__version__}"
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("prepare-data", "train", "eval", "fd-analysis", "collision-stats", "error-analysis", "visualize", "info"):
        assert command in proc.stdout
    assert run_cli("no-such-command").returncode == 2
