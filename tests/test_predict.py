"""`kpnet predict` (issue 18): COCO results for unlabelled images, streamed, with eval's decode, so that
`kpnet eval --gt ANN --dets OUT` scores exactly what `kpnet eval RECIPE --checkpoint CKPT` scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO, TINY_RESNET
from kpnet.cli import app

CUSTOM = REPO / "recipes" / "custom_small.yaml"
SHORT = ["train.iterations=40", "train.batch_size=4", "train.warmup_iters=5", "data.num_workers=0",
         "train.checkpoint_every=1000"]


def sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, [*args, "--json"])


@pytest.fixture(scope="module")
def bccd_model(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """custom_small trained 40 iterations on bccd train (a short-trained model: the equality does not need a good one)."""
    out = tmp_path_factory.mktemp("bccd") / "run"
    res = invoke("train", str(CUSTOM), "--data", str(data_dir / "bccd"), "--out", str(out), *sets(SHORT))
    assert res.exit_code == 0, res.output
    return out / "last.pt"


@pytest.mark.shared_data
def test_predict_scores_as_eval_on_bccd_test(bccd_model: Path, data_dir: Path, tmp_path: Path) -> None:
    test = data_dir / "bccd" / "test"
    ann = test / "_annotations.coco.json"
    res = invoke("eval", str(CUSTOM), "--data", str(data_dir / "bccd"), "--split", "test", "--checkpoint", str(bccd_model),
                 "--out", str(tmp_path / "eval.json"))
    assert res.exit_code == 0, res.output
    by_eval = json.loads(res.stdout)["bbox"]
    res = invoke("predict", str(CUSTOM), "--checkpoint", str(bccd_model), str(test), "--ids-from", str(ann),
                 "--out", str(tmp_path / "pred.json"))
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["images"] == 10
    res = invoke("eval", "--gt", str(ann), "--dets", str(tmp_path / "pred.json"))
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["bbox"] == by_eval
    assert 0 < by_eval["AP"] < 1
    predicted = json.loads((tmp_path / "pred.json").read_text())
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    stripped = [{k: v for k, v in d.items() if k != "file_name"} for d in predicted]
    assert sorted(map(json.dumps, stripped)) == sorted(map(json.dumps, evaluated))  # the same decode (folder order)
    names = {im["id"]: im["file_name"] for im in json.loads(ann.read_text())["images"]}
    assert all(d["file_name"] == names[d["image_id"]] for d in predicted)


@pytest.mark.shared_data
def test_predict_from_the_checkpoint_alone_with_ids_thresholds_and_drawings(bccd_model: Path, data_dir: Path,
                                                                            tmp_path: Path) -> None:
    files = sorted((data_dir / "bccd" / "test").glob("*.jpg"))[:3]
    out = tmp_path / "pred.json"
    res = invoke("predict", str(bccd_model), *map(str, files), "--out", str(out), "--score-thresh", "0.2",
                 "--viz", str(tmp_path / "viz"))
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    results = json.loads(out.read_text())
    assert doc["images"] == 3 and doc["detections"] == len(results) and doc["input_size"] == 256
    assert {d["image_id"] for d in results} <= {1, 2, 3} and all(d["score"] >= 0.2 for d in results)
    assert {d["category_id"] for d in results} <= {0, 1, 2}  # bccd's own category ids, from the checkpoint
    assert [d["file_name"] for d in results] == sorted((d["file_name"] for d in results),
                                                       key=lambda n: [f.name for f in files].index(n))
    assert sorted(Path(p).name for p in doc["files"]) == sorted(f"{f.stem}_det.png" for f in files)
    assert all(Path(p).is_file() for p in doc["files"])
    # --set applies to the checkpoint's own recipe
    res = invoke("predict", str(bccd_model), str(files[0]), "--out", str(tmp_path / "p64.json"),
                 "--set", "test.input_size=128")
    assert res.exit_code == 0 and json.loads(res.stdout)["input_size"] == 128
    assert any("tested at 128 px" in w for w in json.loads(res.stdout)["warnings"])


@pytest.mark.parametrize("args, culprit", [
    (["recipes/custom_small.yaml", "x.jpg"], "a recipe needs --checkpoint CKPT"),
    (["CKPT", "nope.jpg"], "nope.jpg: no such image file or folder"),
    (["CKPT", "EMPTY"], "no image files in this folder"),
    (["CKPT", "IMAGE", "--score-thresh", "1.5"], "--score-thresh: must lie in [0, 1]"),
    (["CKPT", "IMAGE", "--ids-from", "ANN"], "has no image with the file name 'a.png'"),
    (["CKPT", "--checkpoint", "CKPT", "IMAGE"], "is already the checkpoint"),
])
def test_predict_usage_errors_exit_2_and_write_nothing(args: list[str], culprit: str, tmp_path: Path) -> None:
    import numpy as np
    import cv2

    from kpnet.config import load_recipe
    from kpnet.engine.checkpoint import save_checkpoint
    from kpnet.models import build_model

    recipe = load_recipe(CUSTOM, ["model.num_classes=1", *TINY_RESNET])
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model(recipe), recipe, iteration=0)
    (tmp_path / "empty").mkdir()
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((20, 30, 3), np.uint8))
    (tmp_path / "ann.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "b.png", "width": 30, "height": 20}],
                                                   "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    where = {"CKPT": str(ckpt), "EMPTY": str(tmp_path / "empty"), "IMAGE": str(tmp_path / "a.png"),
             "ANN": str(tmp_path / "ann.json"), "nope.jpg": str(tmp_path / "nope.jpg")}
    out = tmp_path / "out.json"
    res = CliRunner().invoke(app, ["predict", *[where.get(a, a) for a in args], "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: ") and culprit in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_predict_streams_unlabelled_images_with_ids_in_input_order(tmp_path: Path) -> None:
    import cv2
    import numpy as np

    from kpnet.config import load_recipe
    from kpnet.engine.checkpoint import save_checkpoint
    from kpnet.models import build_model

    recipe = load_recipe(CUSTOM, ["model.num_classes=2", *TINY_RESNET, "data.num_workers=0"])
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model(recipe), recipe, iteration=0, class_names=["a", "b"],
                           cat_ids=[3, 7])
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("b.jpg", "a.png", "notes.txt"):
        cv2.imwrite(str(folder / name), np.full((48, 64, 3), 128, np.uint8)) if name != "notes.txt" else \
            (folder / name).write_text("not an image")
    res = invoke("predict", str(ckpt), str(folder), "--out", str(tmp_path / "p.json"))
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "p.json").read_text())
    assert json.loads(res.stdout)["images"] == 2
    assert {(d["image_id"], d["file_name"]) for d in results} <= {(1, "a.png"), (2, "b.jpg")}
    assert {d["category_id"] for d in results} <= {3, 7} and 0 < len(results) <= 200  # max_per_image 100
    assert [d["image_id"] for d in results] == sorted(d["image_id"] for d in results)  # written image by image
