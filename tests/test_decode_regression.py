"""The test pipeline's results JSON is unchanged by refactoring: three small recipes (objects as points — the
quickstart recipe as it was when the digests were recorded, kept in tests/recipes — CornerNet, triplets) trained 60 iterations from a fixed seed are decoded under six test settings (single
scale, flip, three scales with soft-NMS, with soft-NMS merge, linear soft-NMS, triplets without the
central region) and each results list must hash to the digest recorded before the Detector interface
landed (the per-family `detect`/`postprocess` functions of commit 2bc572c). One digest was re-recorded
afterwards, on purpose: soft-NMS now computes its gaussian decay and merge weights with kpnet's correctly
rounded exp/pow (`kpnet.ops.kpmath`, the kernels' arithmetic) instead of torch's float32 exp/pow, which
moves a few merged triplet boxes across a rounding boundary of the results JSON.

Float results depend on the CPU's arithmetic, so the training losses are fingerprinted too: where they
differ from the recorded ones the machine computes differently from the one the digests came from and
the test skips, saying so. Regenerate the digests with `python tests/test_decode_regression.py`
only for an intended change of the decoded output, and say why in the commit. The heads come from the eager
network (`test.engine=false`): the inference engine's folded weights and bf16 move boxes across the JSON's rounding.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["train.max_iterations=60", "train.batch_size=8", "train.checkpoint_every=1000", "data.num_workers=0",
         "train.warmup_iters=10", "train.amp=false"]
VARIANTS = {
    "default": [],
    "flip": ["test.flip=true"],
    "multiscale": ["test.scales=[0.75,1.0,1.25]", "test.nms=soft_gaussian"],
    "merge": ["test.scales=[0.75,1.0,1.25]", "test.nms_merge=true", "test.weight_exp=10"],
    "linear": ["test.nms=soft_linear", "test.flip=true"],
    "nocre": ["test.central_region=false"],
}
LOSSES = {  # sha256[:16] of [[iteration, loss], ...] from metrics.jsonl
    "points_resnet18_small": "1fe0384cb80c07d6",
    "cornernet_small_shapes": "020ae51efb7c2b8c",
    "centernet_triplet_small_shapes": "27379b83d41730c2",
}
RESULTS = {  # sha256[:16] of json.dumps(results) for (recipe, variant)
    ("points_resnet18_small", "default"): "cdccab8515cb234f",
    ("points_resnet18_small", "flip"): "9c3aa3a8f67c0c79",
    ("points_resnet18_small", "multiscale"): "6c03091116b1affd",
    ("points_resnet18_small", "linear"): "309128a28dbeb29f",
    ("cornernet_small_shapes", "default"): "9634e32e03f29dac",
    ("cornernet_small_shapes", "flip"): "f8e8495c5bcee740",
    ("cornernet_small_shapes", "multiscale"): "77ab797e22f533a8",
    ("cornernet_small_shapes", "merge"): "f76029cc2f37d12a",
    ("cornernet_small_shapes", "linear"): "2916e88dfa34929e",
    ("centernet_triplet_small_shapes", "default"): "07eb519c0d815048",
    ("centernet_triplet_small_shapes", "flip"): "7324117b41e269bf",
    ("centernet_triplet_small_shapes", "multiscale"): "176498c9547753ec",
    ("centernet_triplet_small_shapes", "merge"): "18d299ceedc46711",  # re-recorded: soft-NMS's own exp/pow
    ("centernet_triplet_small_shapes", "linear"): "8d9421179f905597",
    ("centernet_triplet_small_shapes", "nocre"): "b595b71c586a0be5",
}


def recipe_path(name: str) -> Path:
    """The shipped recipe, or the test's own (tests/recipes: the points model the digests were recorded with)."""
    own = REPO / "tests" / "recipes" / f"{name}.yaml"
    return own if own.exists() else REPO / "recipes" / f"{name}.yaml"


def digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]


def train_and_decode(name: str, data: Path, out: Path) -> tuple[str, dict[str, str]]:
    """(loss fingerprint, {variant: results digest}) of one recipe trained on `data`."""
    from kpnet.api import load_checkpoint
    from kpnet.config import load_recipe
    from kpnet.data.dataset import load_index
    from kpnet.engine.inference import predict_dataset
    from kpnet.engine.train import train

    base = [f"data.root={data}", *TRAIN, "test.engine=false"]  # the decode of the eager network's heads
    train(load_recipe(recipe_path(name), base), out / name)
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = digest([[r["iteration"], r["loss"]] for r in rows])
    index = load_index(data / "annotations" / "instances_val.json", data / "val")
    results = {}
    for (recipe, variant) in RESULTS:
        if recipe == name:
            r = load_recipe(recipe_path(name), base + VARIANTS[variant])
            results[variant] = digest(predict_dataset(load_checkpoint(out / name / "last.pt", recipe=r), index))
    return losses, results


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_results_json_unchanged(name: str, shapes_small: Path, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        losses, results = train_and_decode(name, shapes_small, tmp_path)
    finally:
        torch.set_num_threads(threads)
    if losses != LOSSES[name]:
        pytest.skip(f"training losses differ from the recorded ones ({losses} != {LOSSES[name]}): this CPU computes "
                    "differently from the machine the digests were recorded on")
    assert results == {v: d for (recipe, v), d in RESULTS.items() if recipe == name}


if __name__ == "__main__":  # print fresh digests (see the module docstring before using them)
    import tempfile

    from kpnet.data.shapes import make_shapes

    with tempfile.TemporaryDirectory() as tmp:
        make_shapes(Path(tmp) / "shapes", num_train=64, num_val=24, image_size=128, seed=3)
        torch.set_num_threads(2)
        for recipe_name in sorted(LOSSES):
            print(recipe_name, *train_and_decode(recipe_name, Path(tmp) / "shapes", Path(tmp) / "runs"), file=sys.stdout)
