"""The wider bad-input corpus (tests/bad_inputs/{dets,recipe}_*, images/): every bad file makes
`kpnet eval --dets`, `kpnet train`, `kpnet eval` or `kpnet viz` exit 2 with one stderr line naming
the file and the culprit, a JSON document under --json, and nothing written. Unusual but real
images (a PNG named .jpg, 1x1, 16-bit, CMYK, an animated GIF) load and work instead."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import REPO, TINY_QUICKSTART
from kpnet.cli import app
from kpnet.config import load_recipe
from kpnet.data.dataset import read_image
from kpnet.engine.checkpoint import save_checkpoint
from kpnet.errors import KpnetError
from kpnet.models import build_model

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
IMAGES = CORPUS / "images"
GT = CORPUS / "clean_coco.json"
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
TINY = [*TINY_QUICKSTART, "model.num_classes=1",
        "data.num_workers=0", "train.batch_size=1", "train.max_iterations=1", "train.warmup_iters=0",
        "train.channels_last=false"]  # batch 1 + bf16 autocast + channels-last aborts on this CPU (reported)
BOX = "[8, 5, 22, 15]"

DETS = {  # file stem -> what the one error line must say after "error: <file>: "
    "dets_not_a_list": "expected a COCO results list [{image_id, category_id, bbox, score}, ...], got dict",
    "dets_unknown_image": "result [1]: image_id 7 is not in the ground truth",
    "dets_unknown_category": "result [1]: category_id 9 is not a ground-truth category",
    "dets_nan_box": "result [0]: 'bbox' must be [x, y, w, h] of 4 finite numbers, got [nan, 5, 22, 15]",
    "dets_inf_box": "result [0]: 'bbox' must be [x, y, w, h] of 4 finite numbers, got [8, 5, inf, 15]",
    "dets_negative_box": "result [0]: 'bbox' [8, 5, -22, 15] has a negative width or height",
    "dets_huge_box": "result [0]: 'bbox' [8, 5, 1000000000000.0, 15] reaches beyond 1e+07 pixels",
    "dets_score_above_one": "result [0]: score 1.5 is outside [0, 1]",
    "dets_score_negative": "result [0]: score -0.2 is outside [0, 1]",
    "dets_score_nan": "result [0]: missing finite numeric 'score'",
    "dets_score_string": "result [0]: missing finite numeric 'score'",
    "dets_missing_bbox": "result [0]: 'bbox' must be [x, y, w, h] of 4 finite numbers, got None",
    "dets_empty_file": "malformed JSON at line 1 column 1: Expecting value",
    "dets_truncated": "malformed JSON at line 1 column 53",
    "dets_entry_not_object": "result [0]: expected an object, got list",
    "dets_bool_image_id": "result [0]: missing integer 'image_id'",
    "dets_not_utf8": "not a UTF-8 text file",
}
RECIPES = {
    "recipe_extends_cycle_a": "recipe `extends:` cycle",
    "recipe_extends_cycle_b": "recipe `extends:` cycle",
    "recipe_extends_escape": "`extends: ../conftest.py` leaves the recipe's folder",
    "recipe_extends_absolute": "`extends: /etc/hostname` leaves the recipe's folder",
    "recipe_extends_not_a_path": "`extends:` must be a path to another recipe",
    "recipe_wrong_type_top_level": "family: expected a string, got ['centernet_points']",
    "recipe_section_not_mapping": "train: expected a mapping, got int",
    "recipe_wrong_type_data": "data.num_workers: expected an integer, got 'two'",
    "recipe_wrong_type_model": "model.deformable: expected true or false, got 'sometimes'",
    "recipe_wrong_type_targets": "targets.min_overlap: expected a number, got 'high'",
    "recipe_wrong_type_loss": "loss.hm_weight: expected a number, got {'value': 1}",
    "recipe_wrong_type_augment": "augment.scales: expected a number, got 'big'",
    "recipe_wrong_type_train": "train.lr: expected a number, got 'fast'",
    "recipe_wrong_type_test": "test.k: expected an integer, got 1.5",
}
OLDER_RECIPES = {"recipe_bad_value", "recipe_not_yaml", "recipe_unknown_key"}  # test_bad_inputs_model.py
BAD_IMAGES = {  # the files of images/ that are not images -> the culprit
    "empty.jpg": "empty file (0 bytes), not an image",
    "truncated.jpg": "cannot decode image (corrupt or not an image)",
    "not_an_image.jpg": "cannot decode image (corrupt or not an image)",
}
UNUSUAL_IMAGES = ["png_named.jpg", "one_pixel.png", "gray16.png", "cmyk.jpg", "animated.gif"]


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, [*args, "--json"])


def assert_rejected(res, path: Path | str, culprit: str) -> None:  # type: ignore[no-untyped-def]
    assert res.exit_code == 2, (res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {path}: ") and culprit in lines[0], lines[0]
    assert "Traceback" not in res.stdout + res.stderr
    doc = json.loads(res.stdout)
    assert doc["exit_code"] == 2 and culprit in doc["error"]


def sets(*values: str) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def test_every_corpus_file_has_a_case() -> None:
    listed = set(DETS) | set(RECIPES) | OLDER_RECIPES
    files = {p.stem for p in CORPUS.glob("dets_*.json")} | {p.stem for p in CORPUS.glob("recipe_*.yaml")}
    assert files == listed
    images = {p.name for p in IMAGES.iterdir()} - {"ok.jpg"}
    assert images == set(BAD_IMAGES) | set(UNUSUAL_IMAGES)
    assert len(DETS) + len(RECIPES) + len(BAD_IMAGES) - 2 + len(UNUSUAL_IMAGES) >= 25  # new in issue 20


@pytest.mark.parametrize("case", sorted(DETS))
def test_eval_rejects_bad_results_file(case: str) -> None:
    path = CORPUS / f"{case}.json"
    assert_rejected(invoke("eval", "--gt", str(GT), "--dets", str(path)), path, DETS[case])


def test_eval_scores_the_clean_results_control(tmp_path: Path) -> None:
    path = tmp_path / "dets.json"
    path.write_text(f'[{{"image_id": 1, "category_id": 1, "bbox": {BOX}, "score": 0.9}}]')
    res = invoke("eval", "--gt", str(GT), "--dets", str(path))
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["bbox"]["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_train_and_eval_reject_bad_recipe(case: str, tmp_path: Path) -> None:
    path = CORPUS / f"{case}.yaml"
    assert_rejected(invoke("train", str(path), "--out", str(tmp_path / "run")), path, RECIPES[case])
    results = tmp_path / "results.json"
    assert_rejected(invoke("eval", str(path), "--checkpoint", str(tmp_path / "x.pt"), "--out", str(results)),
                    path, RECIPES[case])
    assert list(tmp_path.iterdir()) == []


def one_image_dataset(root: Path, image: Path) -> Path:
    """A COCO train/val set of just `image` (one box of class 1), as `kpnet train` and `kpnet eval` read it."""
    size = image_size(image)
    w, h = size
    coco = {"images": [{"id": 1, "file_name": image.name, "width": w, "height": h}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, w, h], "area": w * h,
                             "iscrowd": 0}],
            "categories": [{"id": 1, "name": "block"}]}
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        (root / split / image.name).write_bytes(image.read_bytes())
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return root


def image_size(image: Path) -> tuple[int, int]:
    """(width, height) of a corpus image; the bad ones say 40x30, as ok.jpg is."""
    try:
        array = read_image(image)
    except KpnetError:
        return 40, 30
    return int(array.shape[1]), int(array.shape[0])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    recipe = load_recipe(QUICKSTART, TINY)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "last.pt", build_model(recipe), recipe, iteration=0,
                           class_names=["block"])


def run_all(image: Path, tmp_path: Path, checkpoint: Path) -> tuple[Path, dict[str, object]]:
    """`kpnet train`, `kpnet eval` and `kpnet viz` on `image`; their results and their output paths."""
    root = one_image_dataset(tmp_path / "data", image)
    recipe_sets = sets(f"data.root={root}", *TINY)
    outs = {"train": tmp_path / "run", "eval": tmp_path / "results.json", "viz": tmp_path / "viz"}
    return root, {
        "train": (invoke("train", str(QUICKSTART), "--out", str(outs["train"]), *recipe_sets), outs["train"]),
        "eval": (invoke("eval", str(QUICKSTART), "--checkpoint", str(checkpoint), "--out", str(outs["eval"]),
                        *recipe_sets), outs["eval"]),
        "viz": (invoke("viz", str(root / "val" / image.name), "--checkpoint", str(checkpoint), "--out",
                       str(outs["viz"])), outs["viz"]),
    }


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_train_eval_and_viz_reject_bad_image(name: str, tmp_path: Path, checkpoint: Path) -> None:
    root, runs = run_all(IMAGES / name, tmp_path, checkpoint)
    for command, (res, out) in runs.items():
        split = "train" if command == "train" else "val"
        assert_rejected(res, root / split / name, BAD_IMAGES[name])
        assert not out.exists(), f"{command} wrote {out}"


@pytest.mark.parametrize("name", UNUSUAL_IMAGES)
def test_train_eval_and_viz_work_on_unusual_image(name: str, tmp_path: Path, checkpoint: Path) -> None:
    _, runs = run_all(IMAGES / name, tmp_path, checkpoint)
    for command, (res, out) in runs.items():
        assert res.exit_code == 0, (command, res.output, res.exception)
        assert out.exists()


def test_unusual_images_load_with_their_real_pixels() -> None:
    ramp16 = runpy.run_path(str(CORPUS / "make_images.py"))["ramp16"]  # the script that wrote them

    png = read_image(IMAGES / "png_named.jpg")
    assert png.shape == (30, 40, 3) and (png[:, :20] == (255, 0, 0)).all() and (png[:, 20:] == 0).all()
    assert read_image(IMAGES / "one_pixel.png").tolist() == [[[128, 128, 128]]]
    grey = read_image(IMAGES / "gray16.png")
    assert grey.dtype == np.uint8 and (grey == (ramp16() >> 8)[..., None]).all()  # the top 8 of 16 bits
    red = np.array([0, 0, 255])
    assert np.abs(read_image(IMAGES / "cmyk.jpg").astype(int) - red).max() <= 2  # CMYK converted, not inverted
    assert (read_image(IMAGES / "animated.gif") == red).all()  # the first frame
