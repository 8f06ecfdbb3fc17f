"""The bad-input corpus (tests/bad_inputs/coco_*.json + images/): every file makes
`kpnet prepare-data coco` exit 2 with one first stderr line naming the file and the culprit,
no traceback, and a parseable `--json` report; `load_coco_checked` rejects exactly the
structural ones; `--fix` repairs every file that parses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kpnet.cli import app
from kpnet.data.validate import FATAL_KINDS, load_coco_checked, validate_coco
from kpnet.errors import KpnetError

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
IMAGES = CORPUS / "images"

# file stem -> (first problem kind, text the first error line must contain)
EXPECTED = {
    "coco_absolute_path": ("path_escape", "'/etc/hostname' escapes the image folder"),
    "coco_bad_bbox_value": ("bad_value", "annotation id 1 (image 1) has bbox [8, 5, 'wide', 15]"),
    "coco_corrupt_jpeg": ("unreadable_image", "'truncated.jpg' cannot be decoded"),
    "coco_duplicate_annotation_id": ("duplicate_annotation_id", "annotation id 1 appears more than once"),
    "coco_duplicate_category_id": ("duplicate_category_id", "category id 1 appears more than once"),
    "coco_duplicate_image_id": ("duplicate_image_id", "image id 1 appears more than once"),
    "coco_empty_file": ("malformed_json", "malformed JSON at line 1 column 1"),
    "coco_id_zero": ("annotation_id_zero", "annotation id 0 (image 1): pycocotools cannot match"),
    "coco_malformed_json": ("malformed_json", "malformed JSON at line 26"),
    "coco_missing_bbox": ("missing_key", "annotation id 1 has no 'bbox'"),
    "coco_missing_categories": ("missing_key", "missing required top-level key 'categories'"),
    "coco_missing_image": ("missing_image", "'nope.jpg' not found"),
    "coco_negative_box": ("degenerate_box", "annotation id 1 (image 1) has an empty box [8, 5, -6, 15]"),
    "coco_negative_coords": ("out_of_image_box", "box [-4, 5, 22, 15] outside the 40x30 image"),
    "coco_not_an_image": ("unreadable_image", "'not_an_image.jpg' cannot be decoded"),
    "coco_not_utf8": ("malformed_json", "not UTF-8 text"),
    "coco_out_of_image_box": ("out_of_image_box", "box [30, 5, 22, 15] outside the 40x30 image"),
    "coco_path_escape": ("path_escape", "'../../../etc/passwd' escapes the image folder"),
    "coco_top_level_list": ("malformed_json", "top level is a JSON list, not an object"),
    "coco_unknown_category": ("unknown_category_id", "refers to unknown category id 7"),
    "coco_unknown_image": ("unknown_image_id", "refers to unknown image id 99"),
    "coco_wrong_image_size": ("size_mismatch", "'ok.jpg' is 40x30, the file says 400x300"),
    "coco_zero_size_box": ("degenerate_box", "has an empty box [8, 5, 0, 15]"),
}
UNPARSEABLE = {"coco_empty_file", "coco_malformed_json", "coco_not_utf8", "coco_top_level_list",
               "coco_missing_categories"}
CASES = sorted(p.stem for p in CORPUS.glob("coco_*.json"))


def _invoke(*args: str):
    return CliRunner().invoke(app, ["prepare-data", "coco", *args])


def test_corpus_and_expectations_match() -> None:
    assert len(CASES) >= 10
    assert set(CASES) == set(EXPECTED), "every corpus file needs an expectation, and vice versa"


@pytest.mark.parametrize("case", CASES)
def test_prepare_data_coco_rejects(case: str) -> None:
    kind, culprit = EXPECTED[case]
    path = CORPUS / f"{case}.json"
    res = _invoke("--ann", str(path), "--images", str(IMAGES))
    assert res.exit_code == 2, res.output
    first = res.stderr.splitlines()[0]
    assert first.startswith(f"error: {path}: "), first
    assert culprit in first, first
    assert "Traceback" not in res.stdout + res.stderr
    assert "problems:" in res.stdout  # the full report is still printed

    res = _invoke("--ann", str(path), "--images", str(IMAGES), "--json")
    assert res.exit_code == 2
    doc = json.loads(res.stdout)
    assert doc["ok"] is False and doc["exit_code"] == 2
    assert doc["problems"][0]["kind"] == kind
    assert set(doc["problems"][0]) == {"kind", "id", "image_id", "detail"}
    assert set(doc["counts"]) == {"images", "boxes", "classes", "classes_with_boxes", "crowd", "images_without_boxes"}
    assert res.stderr.splitlines()[0] == f"error: {doc['error']}"
    assert "Traceback" not in res.stdout + res.stderr


def test_clean_control_passes() -> None:
    res = _invoke("--ann", str(CORPUS / "clean_coco.json"), "--images", str(IMAGES), "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["ok"] and doc["problems"] == [] and doc["counts"]["boxes"] == 1


@pytest.mark.parametrize("case", CASES)
def test_load_coco_checked_rejects_only_structural_problems(case: str) -> None:
    kind, culprit = EXPECTED[case]
    path = CORPUS / f"{case}.json"
    if kind in FATAL_KINDS:
        with pytest.raises(KpnetError) as e:
            load_coco_checked(path, IMAGES)
        assert e.value.source == str(path) and culprit in e.value.message
    else:  # degenerate / out-of-image boxes and image contents are the dataset's to handle
        doc = load_coco_checked(path, IMAGES)
        assert len(doc["annotations"]) == 1


@pytest.mark.parametrize("case", CASES)
def test_fix_repairs_what_parses(case: str, tmp_path: Path) -> None:
    out = tmp_path / "fixed.json"
    res = _invoke("--ann", str(CORPUS / f"{case}.json"), "--images", str(IMAGES), "--fix", str(out), "--json")
    doc = json.loads(res.stdout)
    if case in UNPARSEABLE:
        assert res.exit_code == 2 and not out.exists()
        assert "--fix cannot repair" in res.stderr.splitlines()[0]
        return
    assert res.exit_code == 0, res.output
    assert doc["fix"]["after"]["ok"] and doc["fix"]["changes"], doc["fix"]
    assert validate_coco(out, IMAGES).ok
    load_coco_checked(out, IMAGES)


def test_fix_changes_are_specific(tmp_path: Path) -> None:
    """Clipping, dropping and renumbering are each listed with the record they touched."""
    out = tmp_path / "fixed.json"
    res = _invoke("--ann", str(CORPUS / "coco_negative_coords.json"), "--images", str(IMAGES), "--fix", str(out),
                  "--json")
    change = json.loads(res.stdout)["fix"]["changes"][0]
    assert change["kind"] == "clipped_box" and change["id"] == 1
    assert json.loads(out.read_text())["annotations"][0]["bbox"] == [0.0, 5.0, 18.0, 15.0]

    res = _invoke("--ann", str(CORPUS / "coco_zero_size_box.json"), "--images", str(IMAGES), "--fix", str(out),
                  "--json")
    assert [c["kind"] for c in json.loads(res.stdout)["fix"]["changes"]] == ["dropped_degenerate_box"]
    assert json.loads(out.read_text())["annotations"] == []

    res = _invoke("--ann", str(CORPUS / "coco_id_zero.json"), "--images", str(IMAGES), "--fix", str(out), "--json")
    assert [c["kind"] for c in json.loads(res.stdout)["fix"]["changes"]] == ["renumbered_annotations"]
    assert json.loads(out.read_text())["annotations"][0]["id"] == 1


def test_missing_files_are_usage_errors(tmp_path: Path) -> None:
    res = _invoke("--ann", str(tmp_path / "nope.json"), "--images", str(IMAGES))
    assert res.exit_code == 2 and res.stderr.startswith(f"error: {tmp_path / 'nope.json'}: no such annotation file")
    res = _invoke("--ann", str(CORPUS / "clean_coco.json"), "--images", str(tmp_path / "none"), "--json")
    assert res.exit_code == 2 and "no such image folder" in json.loads(res.stdout)["error"]
