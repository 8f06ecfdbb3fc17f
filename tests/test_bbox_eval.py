"""kpnet.bbox_eval.BoxCOCOeval reproduces pycocotools' COCOeval bit for bit (precision, recall and scores arrays, the
12 stats) on generated cases built to hit every matching rule — crowd regions, area ranges with a ground-truth area
unlike its box's, ground-truth id 0, tied scores and tied IoUs on a coarse grid, empty boxes, more results than
maxDets — and on the third-party COCO data; and results files read in large batches load exactly as read one by one."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import shared_data_dir
from kpnet import evaluation
from kpnet.bbox_eval import BoxCOCOeval, BoxResults
from kpnet.data.validate import load_gt
from kpnet.errors import KpnetError

VAL = shared_data_dir() / "val2014_100"


def generated_case(rng: np.random.Generator, results: int) -> tuple[dict, list[dict]]:
    """Ground truth on an 8-pixel grid (so IoUs tie), some crowd regions, some areas unlike the box's, ids from 0 or 1,
    and results near it (same or another class) or anywhere, scores drawn from a few values (so scores tie)."""
    images = [{"id": i, "width": 100, "height": 100} for i in range(1, 7)]
    annotations: list[dict] = []
    next_id = int(rng.integers(0, 2))
    for image in images:
        for _ in range(int(rng.integers(0, 9))):
            x, y = rng.integers(0, 10, 2) * 8
            w, h = rng.integers(0, 8, 2) * 8 + rng.choice([0, 0.5])
            area = float(w * h) if rng.random() < 0.7 else float(rng.uniform(0, 12000))
            annotations.append({"id": next_id, "image_id": image["id"], "category_id": int(rng.integers(1, 5)),
                                "bbox": [float(x), float(y), float(w), float(h)], "area": area,
                                "iscrowd": int(rng.random() < 0.15)})
            next_id += 1
    dets = []
    for _ in range(results):
        if annotations and rng.random() < 0.7:
            near = annotations[int(rng.integers(len(annotations)))]
            image, box = near["image_id"], np.array(near["bbox"]) + rng.integers(-1, 2, 4) * 4
            category = near["category_id"] if rng.random() < 0.8 else int(rng.integers(1, 5))
        else:
            image, category = int(rng.integers(1, 7)), int(rng.integers(1, 5))
            box = np.r_[rng.integers(0, 10, 2) * 8, rng.integers(0, 8, 2) * 8].astype(float)
        box[2:] = np.abs(box[2:])
        score = float(rng.choice([0.1, 0.5, 0.5, 0.9, 1.0])) if rng.random() < 0.5 else round(float(rng.random()), 2)
        dets.append({"image_id": image, "category_id": category, "bbox": box.tolist(), "score": score})
    categories = [{"id": c, "name": str(c)} for c in range(1, 5)]
    return {"images": images, "annotations": annotations, "categories": categories}, dets


def both(gt: COCO, dt: COCO, **params) -> tuple[COCOeval, BoxCOCOeval]:
    """pycocotools' COCOeval and BoxCOCOeval over the same loaded results, evaluated and accumulated."""
    pair = (COCOeval(gt, dt, "bbox"), BoxCOCOeval(gt, dt, BoxResults.from_annotations(dt.dataset["annotations"])))
    with contextlib.redirect_stdout(io.StringIO()):
        for ev in pair:
            for key, value in params.items():
                setattr(ev.params, key, value)
            ev.evaluate()
            ev.accumulate()
            if not params:
                ev.summarize()
    return pair


def assert_identical(ref: COCOeval, ours: BoxCOCOeval) -> None:
    for key in ("precision", "recall", "scores"):
        assert ours.eval[key].shape == ref.eval[key].shape, key
        differ = np.argwhere(ours.eval[key] != ref.eval[key])
        assert not len(differ), f"{key} differs at {differ[:5].tolist()}"
    assert list(ours.stats) == list(ref.stats)


PARAMS = {
    "standard": {},
    "fd_rates": {"iouThrs": np.linspace(0.05, 0.5, 10), "maxDets": [100]},  # the triplet paper's FD (Tables 1, 3)
    "few_max_dets": {"maxDets": [1, 3, 7]},  # more results per image and class than maxDets
    "edges": {"iouThrs": np.array([0.0, 0.3, 0.5, 1.0]), "areaRng": [[0, 1e10], [0, 500], [500, 3000]]},
}


@pytest.mark.parametrize("params", list(PARAMS))
def test_identical_to_pycocotools_on_generated_cases(params: str) -> None:
    rng = np.random.default_rng(list(PARAMS).index(params))
    exercised = {"crowd_match": 0, "id_zero_match": 0, "defined": 0}
    for case in range(60):
        doc, dets = generated_case(rng, int(rng.integers(100, 400)) if case % 3 == 0 else int(rng.integers(1, 250)))
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = copy.deepcopy(doc)
            gt.createIndex()
            dt = gt.loadRes(copy.deepcopy(dets))
        ref, ours = both(gt, dt, **PARAMS[params])
        assert_identical(ref, ours)
        exercised["defined"] += int((ref.eval["precision"] > 0).any())
        for e in filter(None, ref.evalImgs):  # the rules the case reached, seen through pycocotools' own matches
            crowd_ids = {a["id"] for a in doc["annotations"] if a["iscrowd"]}
            exercised["crowd_match"] += int(np.isin(e["dtMatches"], list(crowd_ids)).any())
            exercised["id_zero_match"] += int(0 in e["gtIds"] and (e["gtMatches"][:, e["gtIds"].index(0)] > 0).any())
    assert all(count > 0 for count in exercised.values()), exercised


@pytest.mark.shared_data
@pytest.mark.parametrize("params", ["standard", "fd_rates"])
def test_identical_to_pycocotools_on_coco_val2014(params: str) -> None:
    """The COCO API's own fakebbox100 results on its val2014 100-image subset (crowd regions included)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(VAL / "instances_val2014_100.json"))
        dt = gt.loadRes(str(VAL / "instances_val2014_fakebbox100_results.json"))
    assert any(a["iscrowd"] for a in gt.dataset["annotations"])
    ref, ours = both(gt, dt, **PARAMS[params])
    assert_identical(ref, ours)


def test_auto_backend_scores_boxes_with_box_cocoeval_and_masks_elsewhere() -> None:
    assert evaluation._cocoeval_class("auto") is BoxCOCOeval
    assert evaluation._cocoeval_class("auto", "segm") is not BoxCOCOeval
    with pytest.raises(KpnetError, match="scores boxes only"):
        evaluation._cocoeval_class("kpnet", "keypoints")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def loaded_arrays(dt: evaluation.LoadedResults) -> list[np.ndarray]:
    b = dt.boxes
    return [b.image_id, b.category_id, b.bbox, b.score, b.area, b.order]


def one_by_one(path: Path, gt: COCO) -> evaluation.LoadedResults:
    """load_dets' result by result reading (what a batch with anything unusual falls back to)."""
    items = evaluation.iter_json_list(path, "results")
    return evaluation._load_batches(evaluation._batched(items), gt, str(path))


@pytest.fixture()
def small_gt(tmp_path: Path) -> COCO:
    doc = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 64} for i in (1, 2, 3)],
           "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 30, 40], "area": 1200,
                            "iscrowd": 0}]}
    return load_gt(write(tmp_path / "gt.json", json.dumps(doc)))


def test_batched_reading_equals_reading_one_by_one(small_gt: COCO, tmp_path: Path, monkeypatch) -> None:
    """Cuts fall after an item's closing brace only where what precedes is whole items: braces inside strings and
    nested objects, odd whitespace, and items split across reads all load exactly as read one by one."""
    monkeypatch.setattr(evaluation, "_CHUNK", 64)  # reads of 256 characters: dozens of cuts
    rng = np.random.default_rng(3)
    parts = []
    for i in range(300):
        item = {"image_id": int(rng.integers(1, 4)), "category_id": int(rng.integers(1, 3)),
                "bbox": [round(float(v), 3) for v in rng.uniform(0, 50, 4)], "score": round(float(rng.random()), 4)}
        if i % 7 == 0:
            item["note"] = "}, {\"image_id\": 1}"  # a cut candidate inside a string
        if i % 11 == 0:
            item["extra"] = {"nested": {"deep": [1, 2]}}  # closing braces that are not an item's
        parts.append(json.dumps(item, indent=None if i % 2 else 1))
    path = write(tmp_path / "dets.json", "\n [ " + " ,\n".join(parts) + "\n ]\n\n")
    batched = evaluation.load_dets(path, small_gt)
    assert len(batched.boxes.order) == 300
    for a, b in zip(loaded_arrays(batched), loaded_arrays(one_by_one(path, small_gt)), strict=True):
        np.testing.assert_array_equal(a, b)
    ann = batched.dataset["annotations"][5]  # the COCO index, built on first use
    assert ann["id"] == 6 and ann["iscrowd"] == 0 and ann["area"] == ann["bbox"][2] * ann["bbox"][3]


@pytest.mark.parametrize("text, message", [
    ('[{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}] x', "line 1 column 73: Extra data"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5} {"a": 1}]',
     "line 1 column 72: Expecting ',' delimiter"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5},', "line 1 column 72: Expecting value"),
])
def test_malformed_files_are_reported_where_they_break(small_gt: COCO, tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "bad.json", text)
    with pytest.raises(KpnetError) as e:
        evaluation.load_dets(path, small_gt)
    assert str(path) in e.value.line() and message in e.value.line(), e.value.line()


@pytest.mark.parametrize("bad, message", [
    ({"image_id": True}, "result [250]: missing integer 'image_id'"),
    ({"score": "0.5"}, "result [250]: missing finite numeric 'score'"),
    ({"score": 1.5}, "result [250]: score 1.5 is outside [0, 1]"),
    ({"bbox": [1, 2, 3, "4"]}, "result [250]: 'bbox' must be [x, y, w, h]"),
    ({"bbox": [1, 2, -3, 4]}, "result [250]: 'bbox' [1, 2, -3, 4] has a negative width"),
    ({"bbox": [1e12, 2, 3, 4]}, "reaches beyond 1e+07 pixels"),
    ({"image_id": 99}, "result [250]: image_id 99 is not in the ground truth"),
    ({"category_id": 2 ** 70}, "result [250]: category_id 1180591620717411303424 is not a ground-truth category"),
])
def test_a_bad_result_in_a_later_batch_is_named_by_its_index(small_gt: COCO, tmp_path: Path, monkeypatch,
                                                             bad: dict, message: str) -> None:
    monkeypatch.setattr(evaluation, "_CHUNK", 256)
    good = {"image_id": 2, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}
    items = [good] * 400
    items[250] = {**good, **bad}
    path = write(tmp_path / "dets.json", json.dumps(items))
    with pytest.raises(KpnetError) as e:
        evaluation.load_dets(path, small_gt)
    assert e.value.line().startswith(str(path)) and message in e.value.line(), e.value.line()
