"""Instance masks (CentripetalNet §3.3): targets through augmentation, the head's loss, pasting and RLE."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from kpnet.data.transforms import train_augment
from kpnet.masks import MaskHead, crop_masks, mask_loss, paste_masks, to_rle
from kpnet.targets import MASK_SIZE, mask_targets, segmentation_mask


def _star(cx: float, cy: float, r: float) -> list[float]:
    angles = np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
    return np.stack([cx + radii * np.sin(angles), cy - radii * np.cos(angles)], 1).reshape(-1).tolist()


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_mask_targets_follow_the_augmentation(flip: float) -> None:
    """The 28x28 target of each kept object equals the object's mask warped with the image and cropped to
    its RoI: the flip and the random-scale crop move masks exactly as they move the image."""
    h, w = 96, 120
    polygons = [[_star(40, 45, 30)], [[70.0, 10.0, 115.0, 14.0, 100.0, 60.0, 66.0, 50.0]]]
    masks = np.stack([segmentation_mask(p, h, w) for p in polygons])
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    boxes = np.array(boxes, np.float32)
    image = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
    rng = np.random.default_rng(5)
    _, aug_boxes, matrix = train_augment(rng, image, boxes, 127, (0.9,), flip, 0.0, 0.0, border=16, crop="cornernet")
    ratio, out = 32 / 127, (32, 32)
    t = mask_targets(polygons, matrix, (h, w), aug_boxes, np.array([3, 1]), ratio, out, 8)
    assert t["mask_valid"].tolist()[:3] == [1, 1, 0] and t["mask_classes"][:2].tolist() == [3, 1]
    if flip:  # the box-consistent mirror x -> w - 1 - x, then the crop's scale and shift
        assert matrix[0, 0] < 0
    for k in range(2):
        warped = cv2.warpAffine(masks[k].astype(np.float32), _centred(matrix), (127, 127), flags=cv2.INTER_LINEAR)
        expected = crop_masks(torch.from_numpy(warped)[None], torch.from_numpy(t["mask_rois"][k:k + 1] / ratio))[0] >= 0.5
        agree = (torch.from_numpy(t["mask_targets"][k]).bool() == expected).float().mean()
        assert agree > 0.97, (k, float(agree))
        assert 0.2 < t["mask_targets"][k].mean() < 0.9


def _centred(matrix: np.ndarray) -> np.ndarray:
    out = matrix.astype(np.float64).copy()
    out[:, 2] += matrix[:, :2].sum(1) * 0.5 - 0.5
    return out


def test_mask_head_loss_is_the_mean_binary_cross_entropy_of_the_rois() -> None:
    torch.manual_seed(0)
    head = MaskHead(8, 3)
    features = torch.randn(2, 8, 16, 16)
    targets = {"mask_valid": torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
               "mask_rois": torch.tensor([[[1.0, 1.0, 9.0, 7.0], [0, 0, 0, 0]], [[2.0, 3.0, 15.0, 15.0], [0.0, 0.0, 5.0, 5.0]]]),
               "mask_classes": torch.tensor([[2, 0], [0, 1]]),
               "mask_targets": (torch.rand(2, 2, MASK_SIZE, MASK_SIZE) > 0.5).to(torch.uint8)}
    loss = mask_loss(head, features, targets)
    rois = torch.tensor([[0, 1.0, 1.0, 9.0, 7.0], [1, 2.0, 3.0, 15.0, 15.0], [1, 0.0, 0.0, 5.0, 5.0]])
    logits = head(features, rois, torch.tensor([2, 0, 1]))
    goal = targets["mask_targets"][targets["mask_valid"] > 0].float()
    assert torch.allclose(loss, torch.nn.functional.binary_cross_entropy_with_logits(logits, goal))
    loss.backward()
    assert all(p.grad is not None for p in head.parameters())
    empty = {k: v[:, :0] for k, v in targets.items()}
    assert float(mask_loss(head, features, empty).detach()) == 0.0


def test_paste_inverts_crop_up_to_the_grid_resolution() -> None:
    """A mask cropped to its box at 28x28 and pasted back covers the original with IoU > 0.9; RLE round-trips."""
    h, w = 80, 100
    mask = segmentation_mask([_star(52.3, 37.8, 33.1)], h, w)
    ys, xs = np.nonzero(mask)
    box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0]])
    grid = crop_masks(torch.from_numpy(mask)[None], box)
    pasted = paste_masks(grid, box, h, w, 0.5)[0]
    iou = (pasted & mask.astype(bool)).sum() / (pasted | mask.astype(bool)).sum()
    assert iou > 0.9
    from pycocotools import mask as mask_utils
    rle = to_rle(pasted)
    assert rle["size"] == [h, w] and isinstance(rle["counts"], str)
    assert (mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}) == pasted).all()
    assert not paste_masks(grid, torch.tensor([[5.0, 5.0, 5.0, 9.0]]), h, w, 0.5).any()


def test_mask_is_refused_for_families_without_the_head() -> None:
    from kpnet.config import load_recipe
    from kpnet.errors import KpnetError

    repo = Path(__file__).resolve().parents[1]
    with pytest.raises(KpnetError, match="model.mask: the cornernet family has no instance-mask head"):
        load_recipe(repo / "recipes" / "cornernet_small_shapes.yaml", ["model.mask=true"])
    assert load_recipe(repo / "recipes" / "centripetalnet_small_shapes.yaml", ["model.mask=true"]).model.mask


def test_training_annotations_without_masks_are_named(tmp_path: Path) -> None:
    """A mask recipe needs polygons or RLE on every training annotation: exit 2 naming the file and the annotation."""
    from kpnet.data.validate import require_segmentations
    from kpnet.errors import KpnetError

    doc = {"annotations": [{"id": 1, "segmentation": [[0, 0, 4, 0, 4, 4]]}, {"id": 7, "segmentation": []}]}
    with pytest.raises(KpnetError, match="annotation id 7 has no usable 'segmentation'") as err:
        require_segmentations(doc, tmp_path / "instances.json")
    assert "instances.json" in err.value.line()
    require_segmentations({"annotations": [{"id": 2, "segmentation": {"size": [4, 4], "counts": "04L"}}]}, tmp_path)
