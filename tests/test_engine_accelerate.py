"""The inference engine (kpnet/engine/accelerate.py) and batch-norm folding (kpnet/engine/fuse.py)."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest
import torch
from torch import nn
from torchvision.ops import DeformConv2d

import kpnet
from conftest import REPO
from kpnet.config import recipe_from_dict
from kpnet.data.dataset import load_index
from kpnet.engine import accelerate
from kpnet.engine.fuse import fold_batch_norm
from kpnet.engine.inference import detect_batch, detect_with_heads, predict_dataset
from kpnet.errors import KpnetError

SMALL = {"model.num_classes": 3, "model.head_conv": 16}
BACKBONES = [
    ("cornernet_small_shapes", {}, 64),  # hourglass (corner pooling heads)
    ("centernet_points_res18", {**SMALL, "model.width": 16, "model.up_channels": [32, 16, 16]}, 64),  # ResNet + DCN
    ("centernet_points_res18", {**SMALL, "model.width": 16, "model.up_channels": [32, 16, 16],
                                "model.deformable": False}, 64),
    ("centernet_points_dla34", SMALL, 64),
    ("centripetalnet_small_shapes", {}, 64),  # cross-star deformable convolution after corner pooling
]


def randomise_batch_norms(network: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so folding changes every weight it touches."""
    g = torch.Generator().manual_seed(0)
    for m in network.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)


@pytest.mark.parametrize(("recipe", "overrides", "side"), BACKBONES, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(BACKBONES)])
def test_folding_every_batch_norm_keeps_the_outputs(recipe: str, overrides: dict, side: int) -> None:
    torch.manual_seed(0)
    detector = kpnet.build_detector(kpnet.load_recipe(REPO / "recipes" / f"{recipe}.yaml", overrides)).eval()
    randomise_batch_norms(detector.network)
    before = {k: v.clone() for k, v in detector.network.state_dict().items()}
    x = torch.randn(1, 3, side, side)
    folded, count = fold_batch_norm(detector.network, x)
    batch_norms = sum(isinstance(m, nn.BatchNorm2d) for m in detector.network.modules())
    assert count == batch_norms > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        want, got = detector.network(x)[-1], folded(x)[-1]
    for name, value in want.items():
        scale = value.abs().max().clamp(min=1.0)
        assert ((got[name] - value).abs().max() / scale).item() < 1e-4, name
    after = detector.network.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


class ResidualReadsConv(nn.Module):
    """conv -> bn, but the raw conv output is also added back: the pair must not fold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.ConvTranspose2d(3, 4, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        y = self.conv(x)
        z = self.bn(y) + y
        return [{"out": self.bn2(self.conv2(z))}]


def test_folding_skips_a_convolution_output_read_elsewhere_and_folds_transposed_convolutions() -> None:
    torch.manual_seed(0)
    net = ResidualReadsConv().eval()
    randomise_batch_norms(net)
    x = torch.randn(2, 3, 8, 8)
    folded, count = fold_batch_norm(net, x)
    assert count == 1 and isinstance(folded.bn, nn.BatchNorm2d) and isinstance(folded.bn2, nn.Identity)
    with torch.no_grad():
        assert torch.allclose(folded(x)[0]["out"], net(x)[0]["out"], atol=1e-5)


def eager_detections(detector: kpnet.Detector, image) -> kpnet.Detections:
    """The test pipeline with the plain eager network (no engine) as the head source."""
    with torch.no_grad():
        return detect_with_heads(lambda batch, meta: detector.network(batch)[-1], detector, image, detector.test)


@pytest.mark.parametrize(("recipe", "extra"), [
    ("cornernet_small_shapes", {}),
    ("quickstart", {}),
    ("centernet_points_res18", {**SMALL, "model.width": 16, "model.up_channels": [32, 16, 16]}),  # DCNv2 up-convs:
    # the engine's SampledDeformConv
])
def test_engine_fp32_gives_the_eager_detections(recipe: str, extra: dict, shapes_small: Path) -> None:
    torch.manual_seed(0)
    overrides = {"test.precision": "fp32", "test.flip": True, "test.k": 20, **extra}
    detector = kpnet.build_detector(kpnet.load_recipe(REPO / "recipes" / f"{recipe}.yaml", overrides)).eval()
    randomise_batch_norms(detector.network)
    image = cv2.imread(str(shapes_small / "val" / "000000.jpg"))
    want, got = eager_detections(detector, image), kpnet.detect(detector, [image])[0]
    assert len(want) == len(got) > 0
    assert torch.equal(want.classes, got.classes)
    assert torch.allclose(want.scores, got.scores, atol=1e-4)
    assert torch.allclose(want.boxes, got.boxes, atol=1e-2)
    assert detector.network.training is False and any(isinstance(m, nn.BatchNorm2d) for m in detector.network.modules())


@pytest.mark.parametrize("recipe", ["quickstart", "cornernet_small_shapes", "centripetalnet_small_shapes_mask",
                                    "centernet_pose_small_people"])
def test_batched_images_get_the_detections_each_gets_alone(recipe: str, shapes_small: Path) -> None:
    """test.batch_size: images whose inputs share a shape are stacked (each followed by its flip), at every scale;
    the third image's shape differs, so it runs alone. Each image's detections (masks, joints) are its own."""
    torch.manual_seed(0)
    overrides = {"test.precision": "fp32", "test.flip": True, "test.scales": [1.0, 0.75], "test.k": 20}
    detector = kpnet.build_detector(kpnet.load_recipe(REPO / "recipes" / f"{recipe}.yaml", overrides)).eval()
    randomise_batch_norms(detector.network)
    if recipe.startswith("centripetalnet"):  # untrained shifts match no corners: 6 cells (log 1.8) toward the centre
        network_heads = detector.network_heads

        def long_shifts(batch: torch.Tensor, meta: dict) -> dict:
            out = network_heads(batch, meta)
            return {k: torch.full_like(v, 1.8) if k.endswith("centripetal_shift") else v for k, v in out.items()}

        detector.network_heads = long_shifts
    images = [cv2.imread(str(shapes_small / "val" / f"00000{i}.jpg")) for i in range(3)]
    images[2] = cv2.resize(images[2], (200, 96))
    alone = [kpnet.detect(detector, [image])[0] for image in images]
    batched = detect_batch(detector, images, [None] * 3)
    assert sum(len(d) for d in alone) > 0
    for want, got in zip(alone, batched, strict=True):
        assert len(want) == len(got)
        assert torch.equal(want.classes, got.classes)
        assert torch.allclose(want.scores, got.scores, atol=1e-4)
        assert torch.allclose(want.boxes, got.boxes, atol=1e-2)
        for name in ("masks", "keypoints"):
            if getattr(want, name) is not None:
                assert torch.allclose(getattr(want, name), getattr(got, name), atol=1e-2), name


def test_eval_batch_size_is_checked(shapes_small: Path) -> None:
    detector = kpnet.build_detector(kpnet.load_recipe(REPO / "recipes" / "quickstart.yaml", {"test.batch_size": 0}))
    index = load_index(shapes_small / "annotations" / "instances_val.json", shapes_small / "val")
    with pytest.raises(KpnetError, match="test.batch_size: must be at least 1, got 0"):
        predict_dataset(detector, index)


def test_engine_bf16_heads_stay_close_and_come_back_float32(shapes_small: Path) -> None:
    torch.manual_seed(0)
    recipe = kpnet.load_recipe(REPO / "recipes" / "cornernet_small_shapes.yaml", {"test.precision": "bf16"})
    detector = kpnet.build_detector(recipe).eval()
    batch = torch.randn(2, 3, 128, 128)
    heads = detector.network_heads(batch, {})
    with torch.no_grad():
        eager = detector.network(batch)[-1]
    for name, value in heads.items():
        assert value.dtype == torch.float32 and value.is_contiguous() and not value.is_inference()
        if name.endswith("heat"):
            assert (value.sigmoid() - eager[name].sigmoid()).abs().max().item() < 0.02, name


def test_engine_follows_weight_changes_and_leaves_training_mode_alone() -> None:
    torch.manual_seed(0)
    recipe = kpnet.load_recipe(REPO / "recipes" / "cornernet_small_shapes.yaml", {"test.precision": "fp32"})
    detector = kpnet.build_detector(recipe).eval()
    batch = torch.randn(2, 3, 64, 64)
    first = detector.network_heads(batch, {})["tl_heat"]
    assert accelerate.inference_network(detector.network, recipe) is accelerate.inference_network(
        detector.network, recipe)
    with torch.no_grad():
        detector.network.tl_heats[-1][-1].bias.add_(1.0)
        want = detector.network(batch)[-1]["tl_heat"]
    second = detector.network_heads(batch, {})["tl_heat"]
    assert torch.allclose(second, want, atol=1e-4) and not torch.allclose(first, second)
    detector.network.train()
    assert detector.network_heads(batch, {})["tl_heat"].requires_grad
    eager = type(detector)(kpnet.load_recipe(REPO / "recipes" / "cornernet_small_shapes.yaml", {"test.engine": False}),
                           detector.network).eval()
    with torch.no_grad():
        assert torch.equal(eager.network_heads(batch, {})["tl_heat"], detector.network(batch)[-1]["tl_heat"])


def test_precision_auto_follows_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    test = recipe_from_dict({}).test
    assert test.precision == "auto" and test.compile == "auto"
    cpu = torch.device("cpu")
    monkeypatch.setattr(accelerate, "native_bf16_cpu", lambda: False)
    assert accelerate.plan(test, cpu, "hourglass104").precision == "fp32"
    monkeypatch.setattr(accelerate, "native_bf16_cpu", lambda: True)
    plan = accelerate.plan(test, cpu, "hourglass104")
    assert plan.precision == "bf16" and not plan.compile and "native bf16" in plan.reason
    for backbone in ("resnet18", "dla34", "hourglass_small"):
        assert accelerate.plan(test, cpu, backbone).precision == "fp32"
    fp32 = recipe_from_dict({"test": {"precision": "fp32"}}).test
    assert accelerate.plan(fp32, cpu, "hourglass104").precision == "fp32"


def test_training_autocasts_to_bf16_only_on_native_bf16_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """`train.amp` follows the engine's native-bf16 rule on CPU (not oneDNN's, true on any AVX512 CPU)."""
    from kpnet.engine.train import mixed_precision

    monkeypatch.setattr(accelerate, "native_bf16_cpu", lambda: False)
    assert mixed_precision(True, "cpu") == (False, torch.bfloat16)
    monkeypatch.setattr(accelerate, "native_bf16_cpu", lambda: True)
    assert mixed_precision(True, "cpu") == (torch.backends.mkldnn.is_available(), torch.bfloat16)
    assert mixed_precision(False, "cpu")[0] is False
    assert mixed_precision(True, "cuda") == (True, torch.float16)


def test_compile_switch_reads_yaml_on_off_and_rejects_other_values() -> None:
    assert recipe_from_dict({"test": {"compile": False}}).test.compile == "off"  # YAML's unquoted `off`
    assert recipe_from_dict({"test": {"compile": True}}).test.compile == "on"
    with pytest.raises(KpnetError, match="test.precision.*fp32"):
        recipe_from_dict({"test": {"precision": "fp33"}})


@pytest.mark.parametrize(("stride", "padding", "dilation", "bias", "modulated"),
                         [(1, 1, 1, True, True), (1, 1, 1, False, False), (2, 2, 2, True, True)])
def test_sampled_deformable_convolution_equals_torchvision(stride: int, padding: int, dilation: int, bias: bool,
                                                            modulated: bool) -> None:
    g = torch.Generator().manual_seed(0)
    conv = DeformConv2d(5, 7, 3, stride=stride, padding=padding, dilation=dilation, bias=bias).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        if bias:
            conv.bias.copy_(torch.randn(7, generator=g))
    x = torch.randn(2, 5, 11, 13, generator=g)
    ho, wo = (11 + 2 * padding - 2 * dilation - 1) // stride + 1, (13 + 2 * padding - 2 * dilation - 1) // stride + 1
    offset = torch.randn(2, 18, ho, wo, generator=g) * 4  # many taps land outside the input, some on its border
    offset[0, :, 0, 0] = torch.tensor([-1.0, 0.0] * 9)
    mask = torch.rand(2, 9, ho, wo, generator=g) if modulated else None
    with torch.no_grad():
        want = conv(x, offset, mask)
        got = accelerate.SampledDeformConv(conv)(x, offset, mask)
    assert got.shape == want.shape
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
