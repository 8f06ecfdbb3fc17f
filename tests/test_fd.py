"""`kpnet fd-analysis`: the triplet paper's Table 3 for several results files, deltas, bar chart, errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
from typer.testing import CliRunner

from conftest import shared_data_dir
from kpnet.analysis.fd import fd_deltas
from kpnet.cli import app
from kpnet.data.validate import load_gt
from kpnet.evaluation import FD_KEYS, fd_rates, load_dets

DATA = shared_data_dir()
GT = DATA / "val2014_100" / "instances_val2014_100.json"
DETS = DATA / "val2014_100" / "instances_val2014_fakebbox100_results.json"
FD_EXPECTED = {"FD": 0.300244, "FD5": 0.299638, "FD25": 0.299638, "FD50": 0.303027,
               "FD_S": 0.197098, "FD_M": 0.267941, "FD_L": 0.316504}


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 keeps stderr apart already
        return CliRunner()


@pytest.fixture
def worse_results(tmp_path) -> Path:
    """The fake results with every box shifted by a quarter of its width: more false discoveries."""
    dets = json.loads(DETS.read_text())
    for d in dets:
        d["bbox"][0] += d["bbox"][2] / 4
    path = tmp_path / "shifted.json"
    path.write_text(json.dumps(dets))
    return path


def test_fd_deltas_against_first():
    a = dict.fromkeys(FD_KEYS, 0.25) | {"FD_S": None}
    b = dict.fromkeys(FD_KEYS, 0.5)
    deltas = fd_deltas([a, b])
    assert deltas[0] == dict.fromkeys(FD_KEYS, 0.0) | {"FD_S": None}
    assert deltas[1] == dict.fromkeys(FD_KEYS, 0.25) | {"FD_S": None}


@pytest.mark.shared_data
def test_fd_analysis_json_and_chart(tmp_path, worse_results):
    chart = tmp_path / "fd.png"
    result = _runner().invoke(app, ["fd-analysis", "--gt", str(GT), str(DETS), str(worse_results),
                                    "--names", "fake,shifted", "--plot", str(chart), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["gt"] == str(GT) and doc["plot"] == str(chart)
    first, second = doc["results"]
    assert (first["name"], second["name"]) == ("fake", "shifted")
    assert first["file"] == str(DETS)
    for key, want in FD_EXPECTED.items():
        assert abs(first["fd"][key] - want) < 1e-6
    assert first["delta"] == dict.fromkeys(FD_KEYS, 0.0)
    gt = load_gt(GT)
    shifted = fd_rates(gt, load_dets(worse_results, gt))
    assert second["fd"] == pytest.approx(shifted, abs=1e-15)
    for key in FD_KEYS:
        assert second["delta"][key] == pytest.approx(second["fd"][key] - first["fd"][key], abs=1e-15)
    assert second["delta"]["FD50"] > 0.05  # a quarter-width shift costs at IoU 0.5 ...
    assert abs(second["delta"]["FD5"]) < second["delta"]["FD50"]  # ... far less at IoU 0.05
    img = cv2.imread(str(chart))
    assert img is not None and img.shape[0] >= 400 and img.shape[1] >= 600


@pytest.mark.shared_data
def test_fd_analysis_human_table(worse_results):
    result = _runner().invoke(app, ["fd-analysis", "--gt", str(GT), str(DETS), str(worse_results)])
    assert result.exit_code == 0, result.output
    assert "FD_S" in result.stdout and "30.0" in result.stdout and "Δ vs" in result.stdout


@pytest.mark.parametrize("case", ["names", "missing", "image", "malformed"])
@pytest.mark.shared_data
def test_fd_analysis_bad_input_exits_2(tmp_path, case):
    args = ["fd-analysis", "--gt", str(GT), str(DETS)]
    if case == "names":
        args += ["--names", "a,b"]
        culprit = "--names"
    elif case == "missing":
        args += [str(tmp_path / "nope.json")]
        culprit = str(tmp_path / "nope.json")
    else:
        dets = json.loads(DETS.read_text())
        if case == "image":
            dets[7]["image_id"] = 123456789
        path = tmp_path / f"{case}.json"
        path.write_text(json.dumps(dets) if case == "image" else json.dumps(dets)[:-10])
        args += [str(path)]
        culprit = str(path)
    result = _runner().invoke(app, args + ["--json"])
    assert result.exit_code == 2
    doc = json.loads(result.stdout)
    assert doc["exit_code"] == 2 and doc["error"].startswith(culprit)
    if case == "image":
        assert "result [7]: image_id 123456789" in doc["error"]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ")
