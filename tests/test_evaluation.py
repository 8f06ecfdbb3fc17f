"""kpnet.evaluation: the 12 COCO stats and FD rates on the classic val2014_100 check, every backend,
and the input errors that name the file and the culprit."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import shared_data_dir
from kpnet import evaluation
from kpnet.data.validate import load_gt
from kpnet.errors import KpnetError, KpnetWarning

DATA = shared_data_dir()
VAL = DATA / "val2014_100"
GT = VAL / "instances_val2014_100.json"
DETS = VAL / "instances_val2014_fakebbox100_results.json"
BACKENDS = ("kpnet", "pycocotools", "faster")  # kpnet: boxes only (kpnet.bbox_eval)
MASK_BACKENDS = ("pycocotools", "faster")
FD_EXPECTED = {"FD": 0.300244, "FD5": 0.299638, "FD25": 0.299638, "FD50": 0.303027,
               "FD_S": 0.197098, "FD_M": 0.267941, "FD_L": 0.316504}


@pytest.fixture(scope="module")
def coco():
    gt = load_gt(GT)
    return gt, evaluation.load_dets(DETS, gt)


def published_bbox_stats() -> list[float]:
    """The 12 bbox figures of the COCO API's published output (3 decimals)."""
    text = (VAL / "published_eval_results.txt").read_text()
    block = text.split("type=bbox")[1].split("type=keypoints")[0]
    return [float(v) for v in re.findall(r"\] = ([0-9.]+)", block)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.shared_data
def test_bbox_stats_match_published(coco, backend):
    stats = evaluation.bbox_stats(*coco, backend=backend)
    assert list(stats) == list(evaluation.BBOX_KEYS)
    assert stats["AP"] == 0.5045806987249628
    published = published_bbox_stats()
    assert len(published) == 12
    for key, want in zip(evaluation.BBOX_KEYS, published, strict=True):
        assert abs(stats[key] - want) <= 0.0005 + 1e-12, (key, stats[key], want)


@pytest.mark.shared_data
def test_backends_agree(coco):
    a = evaluation.bbox_stats(*coco, backend="pycocotools")
    b = evaluation.bbox_stats(*coco, backend="faster")
    # The two accumulate precision in different code (numpy vs C++): equal to the last few ulps.
    assert a == pytest.approx(b, rel=0, abs=1e-12)
    assert a["AP"] == b["AP"]
    assert evaluation.bbox_stats(*coco, backend="kpnet") == a  # the same numpy arithmetic, vectorised: bit for bit


@pytest.mark.shared_data
def test_summarize_prints_nothing(coco, capsys):
    evaluation.bbox_stats(*coco, backend="pycocotools")
    evaluation.fd_rates(*coco, backend="pycocotools")
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.shared_data
def test_fd_rates_acceptance(coco, backend):
    fd = evaluation.fd_rates(*coco, backend=backend)
    assert list(fd) == list(evaluation.FD_KEYS)
    for key, want in FD_EXPECTED.items():
        assert abs(fd[key] - want) < 1e-6, (key, fd[key], want)


@pytest.mark.shared_data
def test_fd50_is_one_minus_ap50(coco):
    """IoU 0.5 at maxDets 100 is shared by both evaluations: FD50 = 1 - AP50 of the standard run."""
    stats = evaluation.bbox_stats(*coco, backend="pycocotools")
    fd = evaluation.fd_rates(*coco, backend="pycocotools")
    assert fd["FD50"] == pytest.approx(1.0 - stats["AP50"], abs=1e-15)
    assert fd["FD"] < 1.0 - stats["AP"]  # looser thresholds can only help


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.shared_data
def test_empty_results_score_zero(coco, backend):
    gt, _ = coco
    empty = evaluation.load_dets([], gt)
    assert evaluation.bbox_stats(gt, empty, backend=backend) == {k: 0.0 for k in evaluation.BBOX_KEYS}
    assert evaluation.fd_rates(gt, empty, backend=backend) == {k: 1.0 for k in evaluation.FD_KEYS}


@pytest.mark.shared_data
def test_ground_truth_as_results_scores_one(coco):
    gt, _ = coco
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt.dataset["annotations"] if not a["iscrowd"]]
    stats = evaluation.bbox_stats(gt, evaluation.load_dets(perfect, gt))
    assert stats["AP"] == pytest.approx(1.0) and stats["AR100"] == pytest.approx(1.0)
    assert evaluation.fd_rates(gt, evaluation.load_dets(perfect, gt))["FD"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.shared_data
def test_plot_pr_curves(coco, tmp_path):
    cocoeval = evaluation.evaluate(*coco)
    assert evaluation.stats_dict(cocoeval)["AP"] == 0.5045806987249628
    paths = evaluation.plot_pr_curves(cocoeval, tmp_path / "plots")
    assert [p.name for p in paths] == ["pr_by_iou.png", "pr_by_size.png"]
    for p in paths:
        img = cv2.imread(str(p))
        assert img is not None and img.shape == (500, 600, 3)
        assert (img < 128).any() and (img > 250).mean() > 0.5  # drawn curves on a white page
    assert not list((tmp_path / "plots").glob(".*.tmp"))


def _gt_dict() -> dict:
    return json.loads(GT.read_text())


def _write(tmp_path: Path, name: str, obj) -> Path:
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def _error(fn, *args) -> str:
    with pytest.raises(KpnetError) as e:
        fn(*args)
    return e.value.line()


@pytest.mark.shared_data
def test_load_gt_errors(tmp_path):
    line = _error(load_gt, _write(tmp_path, "bad.json", '{"images": ['))
    assert line.startswith(str(tmp_path / "bad.json")) and "malformed JSON" in line
    assert "no such annotation file" in _error(load_gt, tmp_path / "missing.json")
    d = _gt_dict()
    del d["categories"]
    assert "'categories'" in _error(load_gt, _write(tmp_path, "nocat.json", d))
    d = _gt_dict()
    del d["annotations"][3]["bbox"]
    assert f"annotation id {d['annotations'][3]['id']} has no 'bbox'" in _error(
        load_gt, _write(tmp_path, "nobox.json", d))
    d = _gt_dict()
    d["annotations"][5]["id"] = d["annotations"][4]["id"]
    assert f"annotation id {d['annotations'][4]['id']} appears more than once" in _error(
        load_gt, _write(tmp_path, "dup.json", d))


@pytest.mark.shared_data
def test_load_gt_fills_the_iscrowd_default(tmp_path):
    """COCO's iscrowd defaults to 0; COCOeval reads it, so a file without it still scores."""
    d = _gt_dict()
    for ann in d["annotations"]:
        ann.pop("iscrowd", None)
    gt = load_gt(_write(tmp_path, "nocrowd.json", d))
    stats = evaluation.bbox_stats(gt, evaluation.load_dets(DETS, gt))
    assert 0 < stats["AP"] < 1


@pytest.mark.shared_data
def test_load_gt_renumbers_id_zero():
    """bccd (a Roboflow export) starts its annotation ids at 0, which COCOeval can never match: load_gt gives that
    annotation a new id in memory, with a warning naming the file (issue 18)."""
    path = DATA / "bccd" / "train" / "_annotations.coco.json"
    with pytest.warns(KpnetWarning, match=f"^{path}: annotation id 0 .* renumbered to 4947 in memory"):
        gt = load_gt(path)
    assert 0 not in gt.anns and 4947 in gt.anns and 0 in gt.imgs


@pytest.mark.shared_data
def test_load_dets_errors(coco, tmp_path):
    gt, _ = coco
    good = json.loads(DETS.read_text())
    cases = {
        "notlist.json": ({"a": 1}, "expected a COCO results list"),
        "noscore.json": ([{k: v for k, v in good[0].items() if k != "score"}], "result [0]: missing finite"),
        "badbox.json": ([dict(good[0], bbox=[1, 2, 3])], "result [0]: 'bbox' must be"),
        "negbox.json": ([good[0], dict(good[0], bbox=[1, 2, -3, 4])], "result [1]: 'bbox'"),
        "image.json": ([dict(good[0], image_id=999999999)], "image_id 999999999 is not in the ground truth"),
        "cat.json": ([dict(good[0], category_id=1000)], "category_id 1000 is not a ground-truth category"),
    }
    for name, (content, expected) in cases.items():
        path = _write(tmp_path, name, content)
        line = _error(evaluation.load_dets, path, gt)
        assert line.startswith(str(path)) and expected in line, line
    with pytest.raises(KpnetError, match="no such file"):
        evaluation.load_dets(tmp_path / "nothing.json", gt)


@pytest.mark.shared_data
def test_load_dets_accepts_numpy_scalars(coco):
    gt, _ = coco
    d = json.loads(DETS.read_text())[0]
    entry = {"image_id": np.int64(d["image_id"]), "category_id": np.int64(d["category_id"]),
             "bbox": np.asarray(d["bbox"], dtype=np.float32).tolist(), "score": np.float32(d["score"])}
    dt = evaluation.load_dets([entry], gt)
    assert len(dt.dataset["annotations"]) == 1 and dt.dataset["annotations"][0]["id"] == 1


SEGM = VAL / "instances_val2014_fakesegm100_results.json"
SEGM_PUBLISHED = {"AP": 0.320, "AP50": 0.562, "AP75": 0.299, "APs": 0.387, "APm": 0.310, "APl": 0.327,
                  "AR1": 0.268, "AR10": 0.415, "AR100": 0.417, "ARs": 0.469, "ARm": 0.377, "ARl": 0.381}


@pytest.mark.shared_data
@pytest.mark.parametrize("backend", MASK_BACKENDS)
def test_segm_stats_match_published(backend):
    """The COCO API's fakesegm100 check: segm AP 0.3195452758576433 (published_eval_results.txt), both backends."""
    gt = load_gt(GT)
    dt = evaluation.load_dets(SEGM, gt)
    assert evaluation.has_masks(dt)
    stats = evaluation.stats_dict(evaluation.evaluate(gt, dt, backend, iou_type="segm"))
    assert stats["AP"] == pytest.approx(0.3195452758576433, abs=1e-12)
    assert {k: round(v, 3) for k, v in stats.items()} == SEGM_PUBLISHED


@pytest.mark.shared_data
def test_eval_cli_detects_masks_and_refuses_segm_without_them(tmp_path):
    from conftest import parse_json_stdout, run_cli

    proc = run_cli("eval", "--gt", str(GT), "--dets", str(SEGM), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = parse_json_stdout(proc)
    assert doc["segm"]["AP"] == pytest.approx(0.3195452758576433, abs=1e-12) and set(doc["bbox"]) == set(doc["segm"])
    assert "segm" not in parse_json_stdout(run_cli("eval", "--gt", str(GT), "--dets", str(DETS), "--json"))
    proc = run_cli("eval", "--gt", str(GT), "--dets", str(DETS), "--iou-type", "segm", "--json")
    assert proc.returncode == 2 and "segm needs results with 'segmentation' masks" in proc.stderr
    bad = json.loads(SEGM.read_text())[:3]
    bad[1]["segmentation"] = {"size": [1, 1], "counts": "x"}
    path = _write(tmp_path, "badmask.json", bad)
    proc = run_cli("eval", "--gt", str(GT), "--dets", str(path), "--json")
    assert proc.returncode == 2 and f"{path}: result [1]: 'segmentation' must be a COCO RLE" in proc.stderr
