"""`kpnet export` (issue 15): exported graphs pass onnx.checker, their raw heads equal PyTorch's in onnxruntime on
inputs of two sizes, their in-graph decode equals kpnet's decode, `eval --onnx` scores like `eval --checkpoint`,
the model runs with only onnxruntime and numpy, and bad inputs exit 2 with one line and nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.conftest import REPO, parse_json_stdout, run_cli

onnx = pytest.importorskip("onnx")  # the export extra; test_missing_extra_is_exit_2 covers its absence
ort = pytest.importorskip("onnxruntime")

# The default suite covers objects as points and the triplets (whose graph holds CornerNet's pair decode too);
# CornerNet alone is `slow`, and CentripetalNet (torchvision's CPU deformable convolution trains slowly), whose
# graph decode the default suite checks against its eager decode in tests/test_centripetalnet.py.
SMALL = ("quickstart", pytest.param("cornernet_small_shapes", marks=pytest.mark.slow), "centernet_triplet_small_shapes",
         pytest.param("centripetalnet_small_shapes", marks=pytest.mark.slow))
TRAIN = ["train.max_iterations=60", "train.batch_size=8", "train.checkpoint_every=1000", "data.num_workers=0",
         "train.warmup_iters=10", "train.amp=false"]


class Trained(dict):
    """name -> checkpoint of a small recipe trained briefly on the shared shapes set, trained on first use."""

    def __init__(self, shapes: Path, out: Path) -> None:
        super().__init__()
        self.shapes, self.out = shapes, out

    def __missing__(self, name: str) -> Path:
        from kpnet.config import load_recipe
        from kpnet.engine.train import train

        train(load_recipe(REPO / "recipes" / f"{name}.yaml", [f"data.root={self.shapes}", *TRAIN]), self.out / name)
        self[name] = self.out / name / "last.pt"
        return self[name]


@pytest.fixture(scope="module")
def trained(shapes_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return Trained(shapes_small, tmp_path_factory.mktemp("export_runs"))


def detector_of(name: str, trained: dict[str, Path], shapes: Path, sets: tuple[str, ...] = ()):
    from kpnet.api import load_checkpoint
    from kpnet.config import load_recipe

    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml", [f"data.root={shapes}", *sets])
    return load_checkpoint(trained[name], recipe=recipe)


@pytest.fixture(scope="module")
def exported(trained: dict[str, Path], shapes_small: Path, tmp_path_factory: pytest.TempPathFactory):
    """(name, heads_only, sets) -> an exported .onnx path, exported once per module."""
    from kpnet.export.graph import export_onnx

    cache: dict[tuple, Path] = {}
    folder = tmp_path_factory.mktemp("onnx")

    def get(name: str, heads_only: bool = False, sets: tuple[str, ...] = ()) -> Path:
        key = (name, heads_only, sets)
        if key not in cache:
            path = folder / f"{name}{'_heads' if heads_only else ''}{len(cache)}.onnx"
            export_onnx(detector_of(name, trained, shapes_small, sets), path, heads_only=heads_only)
            cache[key] = path
        return cache[key]

    return get


def val_images(shapes: Path) -> list[np.ndarray]:
    """Two shapes val images of different sizes (the second resized to 100 x 150), so the dynamic axes are exercised."""
    files = sorted((shapes / "val").iterdir())
    first, second = cv2.imread(str(files[0])), cv2.imread(str(files[1]))
    return [first, cv2.resize(second, (150, 100))]


@pytest.mark.parametrize("name", SMALL)
def test_heads_match_pytorch_on_two_sizes(name, exported, trained, shapes_small):
    from kpnet.data.transforms import test_input

    path = exported(name, heads_only=True)
    onnx.checker.check_model(str(path), full_check=True)
    detector = detector_of(name, trained, shapes_small)
    session = ort.InferenceSession(str(path))
    sizes = set()
    for image in val_images(shapes_small):
        inp, _ = test_input(image, 1.0, detector.test.pad, detector.test.pad_add)
        sizes.add(inp.shape)
        outputs = session.run(None, {"images": inp[None]})
        with torch.no_grad():
            heads = detector.network(torch.from_numpy(inp)[None])[-1]
        assert [o.name for o in session.get_outputs()] == list(detector.heads)
        for head, value in zip(detector.heads, outputs):
            assert np.abs(value - heads[head].numpy()).max() < 1e-4, head
    assert len(sizes) == 2


def rows_found(a, b, index) -> bool:
    """Whether rows `index` of Detections b are rows of a (same class, box within 1e-3, scores within 1e-5)."""
    for i in index.tolist():
        same = (a.classes == b.classes[i]) & ((a.boxes - b.boxes[i]).abs().amax(1) < 1e-3)
        same &= (a.scores - b.scores[i]).abs() < 1e-5
        if b.corner_scores is not None:
            same &= (a.corner_scores - b.corner_scores[i]).abs().amax(1) < 1e-5
        if b.centres is not None:  # CentripetalNet's decoded centres
            same &= (a.centres - b.centres[i]).abs().amax(1) < 1e-3
        if b.keypoints is not None:  # a pose model's joints: x, y within 1e-3, confidence within 1e-5
            diff = (a.keypoints - b.keypoints[i]).abs()
            same &= (diff[..., :2].flatten(1).amax(1) < 1e-3) & (diff[..., 2].amax(1) < 1e-5)
        if not same.any():
            return False
    return True


def assert_same_scale_output(got, want) -> None:
    """Same detections; where scores differ by float rounding (onnxruntime's sigmoid vs PyTorch's) near-equal rows
    may swap places, and those at the num_dets cut may swap in or out, so rows are matched, not zipped."""
    a, b = got.detections, want.detections
    assert abs(len(a) - len(b)) <= 0.01 * len(b) and len(b) > 0
    clear = torch.nonzero(b.scores > b.scores.min() + 1e-4)[:, 0]  # rows not at the cut
    assert len(clear) > 0.5 * len(b) and rows_found(a, b, clear)
    assert (got.centres is None) == (want.centres is None)
    if want.centres is not None:
        assert torch.equal(got.centres.classes, want.centres.classes)
        assert torch.allclose(got.centres.xy, want.centres.xy, atol=1e-3)
        assert torch.allclose(got.centres.scores, want.centres.scores, atol=1e-5)


def check_decode(name, sets, exported, trained, shapes_small) -> None:
    from kpnet.engine.inference import scale_output
    from kpnet.export.runtime import OnnxModel

    detector = detector_of(name, trained, shapes_small, sets)
    model = OnnxModel(exported(name, sets=sets))
    for image in val_images(shapes_small):
        want = scale_output(detector.network_heads, detector, image, detector.test, 1.0)
        assert_same_scale_output(model.scale_output(detector, image, 1.0), want)


@pytest.mark.parametrize("name", SMALL)
def test_graph_decode_equals_kpnet_decode(name, exported, trained, shapes_small):
    check_decode(name, (), exported, trained, shapes_small)


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALL)
def test_graph_decode_equals_kpnet_decode_with_flip(name, exported, trained, shapes_small):
    check_decode(name, ("test.flip=true",), exported, trained, shapes_small)


def test_triplet_graph_check_is_kpnets_inside_the_image(exported, trained, shapes_small):
    """The in-graph centre check (input pixels, unclipped) keeps and rescores what kpnet's `postprocess` does, for
    boxes inside the image at scale 1."""
    from kpnet.data.transforms import test_input
    from kpnet.engine.inference import scale_output
    from kpnet.export.runtime import OnnxModel

    name = "centernet_triplet_small_shapes"
    detector = detector_of(name, trained, shapes_small)
    model = OnnxModel(exported(name))
    compared = 0
    for image in val_images(shapes_small):
        inp, meta = test_input(image, 1.0, detector.test.pad, detector.test.pad_add)
        out = {k: v[0] for k, v in model.run(inp[None]).items()}
        boxes = out["boxes"] - torch.tensor([meta["border_x"], meta["border_y"]] * 2)
        inside = (boxes[:, :2] >= 0).all(1) & (boxes[:, 2] <= meta["width"]) & (boxes[:, 3] <= meta["height"])
        inside &= out["pair_scores"] > -1
        kpnet = detector.postprocess([scale_output(detector.network_heads, detector, image, detector.test, 1.0)], (1.0,))
        for box, score in zip(boxes[inside], out["scores"][inside]):
            same = (kpnet.boxes - box).abs().amax(1) < 1e-3
            if score > -1:
                assert same.any() and torch.isclose(kpnet.scores[same][0], score, atol=1e-5)
            else:
                assert not same.any()
            compared += 1
    assert compared > 0


@pytest.mark.parametrize("name", SMALL)
def test_eval_onnx_scores_like_the_checkpoint(name, trained, exported, shapes_small, tmp_path):
    sets = ["--set", f"data.root={shapes_small}"]
    recipe = str(REPO / "recipes" / f"{name}.yaml")
    model = exported(name)
    docs = {}
    for source in (["--checkpoint", str(trained[name])], ["--onnx", str(model)]):
        out = tmp_path / f"results_{source[0][2:]}.json"
        proc = run_cli("eval", recipe, *source, *sets, "--out", str(out), "--json")
        assert proc.returncode == 0, proc.stderr
        docs[source[0]] = parse_json_stdout(proc)
        docs[source[0]]["results"] = json.loads(out.read_text())
    ckpt, onnx_doc = docs["--checkpoint"], docs["--onnx"]
    assert abs(ckpt["bbox"]["AP"] - onnx_doc["bbox"]["AP"]) <= 0.002
    assert abs(len(ckpt["results"]) - len(onnx_doc["results"])) <= 0.01 * len(ckpt["results"])


BLOCKER = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` raises ImportError; importlib.util.find_spec(name) is None: not installed
"""

STANDALONE = """
import json, sys
import numpy as np
import onnxruntime as ort
model, image_file, out_file = sys.argv[1:4]
side = json.load(open(model[:-5] + ".json"))
img = np.load(image_file)  # BGR uint8 (H, W, 3)
h, w = img.shape[:2]
p = side["input"]["pad"]
H, W = (h | p["pad"]) + p["pad_add"], (w | p["pad"]) + p["pad_add"]
canvas = np.zeros((H, W, 3), np.float32)
top, left = H // 2 - h // 2, W // 2 - w // 2
canvas[top:top + h, left:left + w] = img / 255.0
x = ((canvas - side["input"]["mean"]) / side["input"]["std"]).transpose(2, 0, 1)[None].astype(np.float32)
session = ort.InferenceSession(model)
outs = session.run(None, {"images": x})
np.savez(out_file, **{o.name: v for o, v in zip(session.get_outputs(), outs)})
assert sys.modules["torch"] is None and sys.modules["kpnet"] is None
"""


def test_export_cli_writes_model_and_sidecar(trained, shapes_small, tmp_path):
    model = tmp_path / "sub" / "model.onnx"
    proc = run_cli("export", str(REPO / "recipes" / "quickstart.yaml"), "--checkpoint", str(trained["quickstart"]),
                   "--out", str(model), "--set", f"data.root={shapes_small}", "--batch", "1", "--input-size", "128,128",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    sidecar = json.loads((tmp_path / "sub" / "model.json").read_text())
    assert sidecar == {k: v for k, v in parse_json_stdout(proc).items() if k not in ("onnx", "sidecar", "checks_failed")}
    assert sidecar["family"] == "centernet_points" and sidecar["class_names"][0] == "circle"
    assert sidecar["category_ids"] == [1, 2, 3, 4, 5, 6] and sidecar["opset"] == 19 and sidecar["output_stride"] == 4
    assert sidecar["input"]["batch"] == 1 and sidecar["input"]["size"] == [128, 128]
    assert sorted(p.name for p in model.parent.iterdir()) == ["model.json", "model.onnx"]
    onnx.checker.check_model(str(model), full_check=True)
    session = ort.InferenceSession(str(model))
    assert [d.shape for d in session.get_inputs()] == [[1, 3, 128, 128]]


def test_runs_with_only_onnxruntime_and_numpy(exported, trained, shapes_small, tmp_path):
    """The model and its sidecar are enough: a process that cannot import kpnet, torch or cv2 feeds and runs it."""
    from kpnet.export.runtime import OnnxModel
    from kpnet.data.transforms import test_input

    name = "centernet_triplet_small_shapes"
    path = exported(name)
    image = val_images(shapes_small)[1]
    np.save(tmp_path / "image.npy", image)
    script = tmp_path / "standalone.py"
    script.write_text(BLOCKER.format(blocked={"kpnet", "torch", "cv2", "torchvision"}) + STANDALONE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "image.npy"), str(tmp_path / "out.npz")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = np.load(tmp_path / "out.npz")
    detector = detector_of(name, trained, shapes_small)
    inp, _ = test_input(image, 1.0, detector.test.pad, detector.test.pad_add)
    want = OnnxModel(path).run(inp[None])
    assert set(got.files) == set(want)
    for key, value in want.items():
        assert np.allclose(got[key], value.numpy(), atol=1e-5), key


def test_viz_onnx_draws_what_the_checkpoint_draws(exported, trained, shapes_small, tmp_path):
    name = "quickstart"
    image = sorted((shapes_small / "val").iterdir())[0]
    args = [str(image), "--recipe", str(REPO / "recipes" / f"{name}.yaml"), "--set", f"data.root={shapes_small}",
            "--score-thresh", "0.05", "--json"]
    docs = []
    for source in (["--checkpoint", str(trained[name])], ["--onnx", str(exported(name))]):
        proc = run_cli("viz", *args, *source, "--out", str(tmp_path / source[0][2:]))
        assert proc.returncode == 0, proc.stderr
        docs.append(parse_json_stdout(proc))
    ckpt, onnx_doc = (d["images"][0]["detections"] for d in docs)
    assert [d["class"] for d in ckpt] == [d["class"] for d in onnx_doc]
    assert all(np.allclose(a["bbox"], b["bbox"], atol=0.02) for a, b in zip(ckpt, onnx_doc))
    assert Path(docs[1]["files"][0]).is_file()


def one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(n in lines[0] for n in needles), lines[0]


def test_bad_inputs_exit_2_and_write_nothing(trained, shapes_small, tmp_path):
    sets = ["--set", f"data.root={shapes_small}"]
    corner = str(REPO / "recipes" / "centernet_triplet_small_shapes.yaml")
    out = tmp_path / "out" / "model.onnx"
    # a checkpoint of another architecture (objects as points given to a CornerNet recipe)
    proc = run_cli("export", corner, "--checkpoint", str(trained["quickstart"]), "--out", str(out), *sets)
    one_error_line(proc, "last.pt", "does not match the recipe's architecture")
    # the recipe changed from the one the checkpoint was trained with
    proc = run_cli("export", corner, "--checkpoint", str(trained["centernet_triplet_small_shapes"]), "--out", str(out), *sets,
                   "--set", "model.num_classes=5")
    one_error_line(proc, "last.pt", "tl_heats")
    # an --out that cannot be written: its folder is a file
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_cli("export", corner, "--checkpoint", str(trained["centernet_triplet_small_shapes"]), "--out",
                   str(blocker / "model.onnx"), *sets)
    one_error_line(proc, "--out", "not a writable folder")
    proc = run_cli("export", corner, "--checkpoint", str(trained["centernet_triplet_small_shapes"]), "--out", str(out), *sets,
                   "--batch", "0")
    one_error_line(proc, "--batch")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_extra_is_exit_2(trained, shapes_small, tmp_path):
    script = tmp_path / "no_onnx.py"
    script.write_text(BLOCKER.format(blocked={"onnx", "onnxruntime", "onnxscript"})
                      + "from kpnet.cli import main\nmain()\n")
    out = tmp_path / "model.onnx"
    proc = subprocess.run([sys.executable, str(script), "export", str(REPO / "recipes" / "quickstart.yaml"),
                           "--checkpoint", str(trained["quickstart"]), "--out", str(out), "--set", f"data.root={shapes_small}"],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          timeout=300)
    one_error_line(proc, "pip install 'kpnet[export]'")
    assert list(tmp_path.iterdir()) == [script]


def test_corrupted_onnx_is_exit_2(exported, shapes_small, tmp_path):
    import shutil

    recipe = str(REPO / "recipes" / "quickstart.yaml")
    model = tmp_path / "model.onnx"
    shutil.copy(exported("quickstart"), model)
    shutil.copy(exported("quickstart").with_suffix(".json"), tmp_path / "model.json")
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    args = ["eval", recipe, "--onnx", str(model), "--set", f"data.root={shapes_small}", "--out", str(tmp_path / "r.json")]
    one_error_line(run_cli(*args), "model.onnx", "sha256")
    # a corrupted file whose sidecar agrees (re-hashed): onnxruntime refuses it
    import hashlib

    side = json.loads((tmp_path / "model.json").read_text())
    side["onnx_sha256"] = hashlib.sha256(model.read_bytes()).hexdigest()
    (tmp_path / "model.json").write_text(json.dumps(side))
    one_error_line(run_cli(*args), "model.onnx", "onnxruntime cannot load it")
    # a graph exported with other decode settings than the recipe's
    shutil.copy(exported("quickstart"), model)
    shutil.copy(exported("quickstart").with_suffix(".json"), tmp_path / "model.json")
    one_error_line(run_cli(*args, "--set", "test.k=50"), "--onnx", "test.k=100")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("flip", [False, True])
def test_pose_graph_heads_and_decode_equal_kpnets(flip, tmp_path):
    """The pose family (objects as points §4.2) exports too: raw heads equal PyTorch's and the in-graph decode
    (centres, joints regressed from them and snapped to the joint-heatmap peaks) equals kpnet's, on two synthetic
    people images of different sizes, for an untrained small pose model."""
    from kpnet.config import load_recipe
    from kpnet.data.poses import make_poses
    from kpnet.data.transforms import test_input
    from kpnet.engine.inference import scale_output
    from kpnet.export.graph import export_onnx
    from kpnet.export.runtime import OnnxModel
    from kpnet.models import build_detector

    make_poses(tmp_path / "people", num_train=1, num_val=2, image_size=128, seed=0)
    files = sorted((tmp_path / "people" / "val").iterdir())
    images = [cv2.imread(str(files[0])), cv2.resize(cv2.imread(str(files[1])), (150, 100))]
    torch.manual_seed(0)
    recipe = load_recipe(REPO / "recipes" / "centernet_pose_small_people.yaml", [f"test.flip={str(flip).lower()}"])
    detector = build_detector(recipe).eval()
    with torch.no_grad():  # spread the untrained heatmaps' logits so that peaks and their order are well defined
        for head in (*detector.network.hm, *detector.network.hm_hp):
            head[-1].weight.mul_(30.0)
    export_onnx(detector, tmp_path / "heads.onnx", heads_only=True)
    export_onnx(detector, tmp_path / "dets.onnx")
    onnx.checker.check_model(str(tmp_path / "dets.onnx"), full_check=True)
    session, model = ort.InferenceSession(str(tmp_path / "heads.onnx")), OnnxModel(tmp_path / "dets.onnx")
    for image in images:
        inp, _ = test_input(image, 1.0, detector.test.pad, detector.test.pad_add)
        with torch.no_grad():
            heads = detector.network(torch.from_numpy(inp)[None])[-1]
        for head, value in zip(detector.heads, session.run(None, {"images": inp[None]})):
            assert np.abs(value - heads[head].numpy()).max() < 1e-4, head
        want = scale_output(detector.network_heads, detector, image, detector.test, 1.0)
        got = model.scale_output(detector, image, 1.0)
        a, b = got.detections, want.detections
        assert b.keypoints.shape[1:] == (17, 3) and len(a) == len(b) == detector.test.k
        # an untrained heatmap is smooth: a few 3x3 peaks, the other top-K rows score 0 (non-peaks); every peak
        # row must be found on the other side (order may differ)
        peaks_a, peaks_b = (torch.nonzero(x.scores > 1e-6)[:, 0] for x in (a, b))
        assert len(peaks_a) == len(peaks_b) >= 3 and rows_found(a, b, peaks_b) and rows_found(b, a, peaks_a)
        assert (b.keypoints[..., 2] > detector.test.joint_threshold).any()  # some joints snapped to a peak
