"""Images as users have them (issue 18): grayscale, RGBA, 16-bit PNGs, CMYK and EXIF-rotated JPEGs, generated here,
load with their real pixels through the one reader (`kpnet.data.images`) that training, eval, predict and viz use;
a 10000 x 10000 photograph is tested within the memory its `test.input_size` copy needs."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import REPO, TINY_QUICKSTART
from kpnet.cli import app
from kpnet.config import load_recipe
from kpnet.data import dataset, images
from kpnet.data.images import oriented_size, read_image, read_reduced
from kpnet.data import transforms
from kpnet.data.validate import read_image_size
from kpnet.engine.checkpoint import save_checkpoint
from kpnet.models import build_model

H, W = 60, 80
BOX = (20, 10, 50, 30)  # x1, y1, x2, y2 of the red block in the image as shown
RED_BGR = (0, 0, 220)
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
TINY = [*TINY_QUICKSTART, "model.num_classes=1",
        "data.num_workers=0", "train.batch_size=1", "train.max_iterations=2", "train.warmup_iters=0",
        "train.channels_last=false", "test.input_size=64"]


def shown() -> np.ndarray:
    """The BGR image every file below must read as: grey background, a red block at BOX."""
    image = np.full((H, W, 3), 90, np.uint8)
    x1, y1, x2, y2 = BOX
    image[y1:y2, x1:x2] = RED_BGR
    return image


def _rgb() -> np.ndarray:
    return shown()[..., ::-1].copy()


def _save(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def make_kinds() -> dict[str, tuple[bytes, np.ndarray, int]]:
    """file name -> (bytes, the BGR image it must read as, max abs pixel error allowed)."""
    gray = cv2.cvtColor(shown(), cv2.COLOR_BGR2GRAY)
    rgba = np.dstack([_rgb(), np.full((H, W), 77, np.uint8)])
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = 6  # "rotate 90 degrees clockwise to show": store it turned the other way
    stored = np.ascontiguousarray(np.rot90(_rgb()))
    rgb16 = cv2.imencode(".png", shown().astype(np.uint16) * 256 + 100)[1].tobytes()  # low byte must not matter
    return {
        "gray.png": (_save(Image.fromarray(gray), "PNG"), np.repeat(gray[..., None], 3, axis=2), 0),
        "rgba.png": (_save(Image.fromarray(rgba), "PNG"), shown(), 0),  # alpha dropped, colour kept
        "gray16.png": (_save(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"), np.repeat(gray[..., None], 3, 2), 0),
        "rgb16.png": (rgb16, shown(), 0),
        "cmyk.jpg": (_save(Image.fromarray(_rgb()).convert("CMYK"), "JPEG", quality=98), shown(), 8),
        "exif_rotated.jpg": (_save(Image.fromarray(stored), "JPEG", quality=98, subsampling=0, exif=exif.tobytes()), shown(), 8),
    }


@pytest.fixture(scope="module")
def kinds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("kinds")
    for name, (data, _, _) in make_kinds().items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("name", sorted(make_kinds()))
def test_each_kind_reads_as_shown(kinds: Path, name: str) -> None:
    _, expected, tolerance = make_kinds()[name]
    image = read_image(kinds / name)
    assert image.dtype == np.uint8 and image.shape == (H, W, 3)
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= tolerance
    # the size prepare-data checks a COCO file against is the size as shown (EXIF applied)
    assert read_image_size(kinds / name) == oriented_size(kinds / name) == (W, H)


def test_exif_rotated_header_is_the_stored_size(kinds: Path) -> None:
    """The control: the file itself stores 60 columns x 80 rows; only the orientation makes it 80 x 60."""
    with Image.open(kinds / "exif_rotated.jpg") as im:
        assert im.size == (H, W)


def test_training_eval_predict_and_viz_read_through_the_one_reader() -> None:
    import kpnet.api
    import kpnet.cli.visualize  # noqa: F401  (imports read_image inside its functions)

    assert dataset.read_image is images.read_image and dataset.read_reduced is images.read_reduced
    assert kpnet.api.read_image is images.read_image
    source = (REPO / "kpnet" / "cli" / "visualize.py").read_text()
    assert "from kpnet.data.images import read_image" in source
    assert "cv2.imread" not in "".join(p.read_text() for p in (REPO / "kpnet").rglob("*.py"))


def _coco(folder: Path, names: list[str]) -> dict[str, object]:
    x1, y1, x2, y2 = BOX
    return {"images": [{"id": i, "file_name": n, "width": W, "height": H} for i, n in enumerate(names, 1)],
            "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                             "area": (x2 - x1) * (y2 - y1), "iscrowd": 0} for i in range(1, len(names) + 1)],
            "categories": [{"id": 1, "name": "block"}]}


def test_every_kind_trains_evaluates_predicts_and_draws(kinds: Path, tmp_path: Path) -> None:
    names = sorted(make_kinds())
    root = tmp_path / "data"
    for split in ("train", "valid"):
        (root / split).mkdir(parents=True)
        for n in names:
            (root / split / n).write_bytes((kinds / n).read_bytes())
        (root / split / "_annotations.coco.json").write_text(json.dumps(_coco(root / split, names)))
    sets = [a for s in TINY for a in ("--set", s)]
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(QUICKSTART), "--data", str(root), "--out", str(tmp_path / "run"), *sets,
                              "--json"])
    assert res.exit_code == 0, res.output
    ckpt = tmp_path / "run" / "last.pt"
    res = runner.invoke(app, ["eval", str(QUICKSTART), "--data", str(root), "--checkpoint", str(ckpt), *sets,
                              "--out", str(tmp_path / "results.json"), "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["predict", str(ckpt), str(root / "valid"), "--out", str(tmp_path / "pred.json"),
                              "--viz", str(tmp_path / "pviz"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["images"] == len(names) and len(list((tmp_path / "pviz").iterdir())) == len(names)
    res = runner.invoke(app, ["viz", *[str(root / "valid" / n) for n in names], "--checkpoint", str(ckpt),
                              "--out", str(tmp_path / "viz"), "--json"])
    assert res.exit_code == 0, res.output
    assert all(entry["size"] == [W, H] for entry in json.loads(res.stdout)["images"])


def test_test_images_and_predict_files_read_the_shown_pixels(kinds: Path) -> None:
    """Eval's and predict's loaders deliver the image as shown, with its full size."""
    from kpnet.data.dataset import ImageFiles

    names = sorted(make_kinds())
    files = ImageFiles([kinds / n for n in names], min_side=None)
    for i, name in enumerate(names):
        _, expected, tolerance = make_kinds()[name]
        item = files[i]
        assert item["full_hw"] == (H, W)
        assert np.abs(item["image"].astype(int) - expected.astype(int)).max() <= tolerance


def test_reduced_decode_maps_to_the_full_image(tmp_path: Path) -> None:
    """A JPEG decoded at 1/4 gives the test input (and meta) the full image would give, up to resampling."""
    rng = np.random.default_rng(0)
    full = cv2.resize(rng.integers(0, 255, (10, 13, 3), np.uint8), (1300, 1000), interpolation=cv2.INTER_CUBIC)
    path = tmp_path / "big.jpg"
    cv2.imwrite(str(path), full, [cv2.IMWRITE_JPEG_QUALITY, 98])
    reduced, full_hw = read_reduced(path, min_side=300)
    assert full_hw == (1000, 1300) and max(reduced.shape[:2]) >= 300 and reduced.shape[:2] == (250, 325)
    scale = 256 / 1300
    a, meta_a = transforms.test_input(read_image(path), scale, 31, 1)
    b, meta_b = transforms.test_input(reduced, scale, 31, 1, full_hw)
    assert meta_a == meta_b and a.shape == b.shape
    error = np.abs(a - b).mean()  # normalised units
    assert error < 0.05 and np.abs(a - np.roll(b, 6, axis=-1)).mean() > 4 * error  # control: 6 px off


def test_reduction_keeps_the_needed_side() -> None:
    assert images.reduction(10000, 128) == 8 and images.reduction(10000, None) == 1
    assert images.reduction(416, 256) == 1 and images.reduction(1024, 256) == 4 and images.reduction(1025, 256) == 4


HUGE = """
import resource, sys, torch
from pathlib import Path
from kpnet.config import load_recipe
from kpnet.engine.inference import predict_files
from kpnet.models import build_detector
torch.set_num_threads(1)
sets = ["model.hg_dims=[16,16,16,16,16]", "model.hg_stem=8", "model.hg_cnv=16", "model.head_conv=16",
        "model.num_classes=1", "test.input_size=128"]
detector = build_detector(load_recipe(sys.argv[1], sets))
list(predict_files(detector, [Path(sys.argv[3])]))  # warm up on a small image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
(item, dets), = predict_files(detector, [Path(sys.argv[2])])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(after - before, item["full_hw"], item["image"].shape)
"""


@pytest.mark.slow
def test_a_10000_pixel_photograph_runs_in_the_memory_of_its_test_size(tmp_path: Path) -> None:
    big, small = tmp_path / "huge.jpg", tmp_path / "small.jpg"
    make = ("from PIL import Image, ImageDraw; im = Image.new('RGB', (10000, 10000), (90, 90, 90)); "
            f"ImageDraw.Draw(im).rectangle((2000, 3000, 6000, 5000), fill=(220, 0, 0)); im.save({str(big)!r}, quality=80); "
            f"im.resize((500, 500)).save({str(small)!r})")
    subprocess.run([sys.executable, "-c", make], check=True, timeout=120)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(HUGE), str(QUICKSTART), str(big), str(small)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    grown_kib, *_ = proc.stdout.split(" ", 1)
    assert "(10000, 10000)" in proc.stdout and "(1250, 1250, 3)" in proc.stdout, proc.stdout
    # full resolution would need 300 MB for the pixels alone (and as much again as floats); 1/8 needs 4.7 MB
    assert int(grown_kib) < 60 * 1024, proc.stdout
    assert "DecompressionBomb" not in proc.stderr  # a large photograph is not an attack


def test_checkpoint_fixture_for_tiny_models(tmp_path: Path) -> None:
    """The tiny recipe used above builds and saves (guards the TINY overrides against recipe changes)."""
    recipe = load_recipe(QUICKSTART, TINY)
    assert save_checkpoint(tmp_path / "x.pt", build_model(recipe), recipe, iteration=0).is_file()
