"""Results files are read as a stream and only what COCOeval can count is kept: 1,000,000 detections
load in bounded memory, and keeping the best 100 per image and class leaves every score unchanged."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from conftest import REPO
from kpnet import evaluation
from kpnet.data.validate import load_gt

SHAPES_VAL = "annotations/instances_val.json"


def write_results(path: Path, gt: dict, n: int, seed: int) -> None:
    """`n` random results over `gt`'s images and categories, written line by line (never held in memory)."""
    rng = random.Random(seed)
    images = [i["id"] for i in gt["images"]]
    cats = [c["id"] for c in gt["categories"]]
    with open(path, "w") as f:
        f.write("[")
        for i in range(n):
            x, y, w, h = rng.randrange(100), rng.randrange(100), rng.randrange(1, 60), rng.randrange(1, 60)
            f.write(f'{"," if i else ""}{{"image_id": {rng.choice(images)}, "category_id": {rng.choice(cats)}, '
                    f'"bbox": [{x}, {y}, {w}, {h}], "score": {rng.randrange(1000) / 1000}}}\n')
        f.write("]")


MEASURE = """
import resource, sys
from kpnet import evaluation
from kpnet.data.validate import load_gt
gt = load_gt(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
dt = evaluation.load_dets(sys.argv[2], gt)
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(len(dt.dataset["annotations"]), grew // 1024)
"""


def test_a_million_detections_stream_in_bounded_memory(shapes_small: Path, tmp_path: Path) -> None:
    gt_path = shapes_small / SHAPES_VAL
    dets = tmp_path / "million.json"
    write_results(dets, json.loads(gt_path.read_text()), 1_000_000, seed=1)
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(gt_path), str(dets)], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    kept, grew_mib = map(int, proc.stdout.split())
    assert kept == 24 * 6 * 100  # the best 100 of each of 24 images x 6 classes
    # json.load of this 90 MB file alone takes about 800 MiB; the stream keeps 7 numbers a detection.
    assert grew_mib < 200, f"loading grew the process by {grew_mib} MiB"


def test_keeping_the_best_100_per_image_and_class_changes_no_score(shapes_small: Path, tmp_path: Path) -> None:
    gt_path = shapes_small / SHAPES_VAL
    gt_doc = json.loads(gt_path.read_text())
    gt_doc["images"] = gt_doc["images"][:4]
    gt_doc["annotations"] = [a for a in gt_doc["annotations"] if a["image_id"] in {i["id"] for i in gt_doc["images"]}]
    small = tmp_path / "gt.json"
    small.write_text(json.dumps(gt_doc))
    dets = tmp_path / "dets.json"
    write_results(dets, gt_doc, 6000, seed=2)  # ~250 a class and image, many tied scores
    gt = load_gt(small)
    pruned = evaluation.load_dets(dets, gt)
    assert len(pruned.dataset["annotations"]) < 6000
    entries = json.loads(dets.read_text())
    everything = COCO()
    everything.dataset = {"images": gt_doc["images"], "categories": gt_doc["categories"],
                          "annotations": [{**d, "id": i + 1, "area": d["bbox"][2] * d["bbox"][3], "iscrowd": 0}
                                          for i, d in enumerate(entries)]}
    everything.createIndex()
    for backend in ("kpnet", "pycocotools", "faster"):
        assert evaluation.bbox_stats(gt, pruned, backend) == evaluation.bbox_stats(gt, everything, backend)
        assert evaluation.fd_rates(gt, pruned, backend) == evaluation.fd_rates(gt, everything, backend)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_stream_parses_as_json_does_whatever_the_chunking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         chunk: int) -> None:
    monkeypatch.setattr(evaluation, "_CHUNK", chunk)
    path = tmp_path / "r.json"
    path.write_text(' [ {"a": [1, 2.5, "x,]"]},\n {"b": {"c": null}} , 12345 ]\n')
    assert list(evaluation.iter_json_list(path)) == json.loads(path.read_text())
    path.write_text("[]")
    assert list(evaluation.iter_json_list(path)) == []
    for text, message in [('[{"a": 1},\n {"b": 2 ', "line 2 column 10: Expecting ',' delimiter"),
                          ("[1] x", "line 1 column 5: Extra data"), ("[1 2]", "line 1 column 4: Expecting ','"),
                          ("[1,]", "line 1 column 4: Expecting value")]:
        path.write_text(text)
        with pytest.raises(evaluation.KpnetError, match=message):
            list(evaluation.iter_json_list(path))
