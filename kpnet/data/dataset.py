"""COCO-format detection data for training and evaluation.

Annotations are read through `kpnet.data.validate.load_coco_checked` (structural problems stop
with one line naming the file and the culprit) and indexed by pycocotools. As in all three
reference codebases, crowd boxes are kept and trained as positives (REFERENCE §2.4); boxes with
zero or negative width/height are dropped and counted, and boxes reaching outside the image are
clipped after augmentation, where the targets are rendered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset, Sampler

from kpnet.config import Recipe
from kpnet.data.images import read_image, read_reduced
from kpnet.data.poses import NUM_JOINTS
from kpnet.data.transforms import train_augment
from kpnet.data.validate import coco_index, load_coco_checked
from kpnet.errors import KpnetError


@dataclass(frozen=True)
class CocoIndex:
    """A validated COCO file: pycocotools index, image ids in file order, contiguous class mapping."""

    ann_file: Path
    image_root: Path
    coco: COCO
    image_ids: list[int]
    cat_ids: list[int]  # contiguous class c <-> COCO category id cat_ids[c]
    dropped_boxes: int

    @property
    def class_names(self) -> list[str]:
        return [self.coco.cats[c]["name"] for c in self.cat_ids]

    def image_path(self, image_id: int) -> Path:
        return self.image_root / self.coco.imgs[image_id]["file_name"]

    def objects(self, image_id: int) -> list[dict[str, Any]]:
        """One image's annotations that train: degenerate boxes dropped, ordered by category (as CN orders them)."""
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        return sorted(anns, key=lambda a: a["category_id"])

    def segmentations(self, image_id: int) -> list[Any]:
        """The `segmentation` of each of `objects(image_id)`, in that order."""
        return [a["segmentation"] for a in self.objects(image_id)]

    def keypoints(self, image_id: int, num_joints: int) -> np.ndarray:
        """(N, J, 3) COCO keypoints x, y, v of `objects(image_id)` (zeros where an object has none)."""
        kps = np.zeros((len(anns := self.objects(image_id)), num_joints, 3), np.float32)
        for k, a in enumerate(anns):
            if a.get("keypoints"):
                if len(a["keypoints"]) != 3 * num_joints:
                    raise KpnetError(self.ann_file, f"annotation id {a.get('id')} (image {image_id}) has "
                                                    f"{len(a['keypoints']) // 3} keypoints; this model has {num_joints} joints")
                kps[k] = np.asarray(a["keypoints"], np.float32).reshape(num_joints, 3)
        return kps

    def boxes(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(N, 4) x1, y1, x2, y2 boxes and (N,) contiguous classes of `objects(image_id)`."""
        label = {c: i for i, c in enumerate(self.cat_ids)}
        anns = self.objects(image_id)
        if not anns:
            return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
        xywh = np.array([a["bbox"] for a in anns], np.float32)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        return boxes, np.array([label[a["category_id"]] for a in anns], np.int64)


def load_index(ann_file: str | Path, image_root: str | Path) -> CocoIndex:
    """Validate and index a COCO annotation file whose images live under `image_root`."""
    ann_file, image_root = Path(ann_file), Path(image_root)
    dataset = load_coco_checked(ann_file, image_root)
    coco = coco_index(dataset)
    dropped = sum(1 for a in dataset["annotations"] if a["bbox"][2] <= 0 or a["bbox"][3] <= 0)
    image_ids = [img["id"] for img in dataset["images"]]
    cat_ids = sorted(c["id"] for c in dataset["categories"])
    return CocoIndex(ann_file, image_root, coco, image_ids, cat_ids, dropped)


SPLITS = ("train", "val", "test")
# Roboflow / CVAT-style exports: one folder per split with its COCO file beside the images
SPLIT_FOLDERS = {"train": ("train",), "val": ("valid", "val"), "test": ("test",)}
SPLIT_ANNOTATIONS = ("_annotations.coco.json", "annotations.json", "instances.json")


def split_paths(recipe: Recipe, split: str) -> tuple[Path, Path]:
    """Annotation file and image folder of a split ("train", "val" or "test"), under `data.root`."""
    d = recipe.data
    root = Path(d.root)
    if split == "train":
        return root / d.train_ann, root / d.train_images
    if split == "val":
        return root / d.val_ann, root / d.val_images
    if split == "test":
        return root / d.test_ann, root / d.test_images
    raise KpnetError("--split", f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def _split_folder(root: Path, split: str) -> tuple[Path, Path] | None:
    for name in SPLIT_FOLDERS[split]:
        for ann in SPLIT_ANNOTATIONS:
            if (root / name / ann).is_file():
                return Path(name) / ann, Path(name)
    return None


def data_overrides(root: Path) -> dict[str, str]:
    """The `data.*` keys that point a recipe at the data set in `root` (`--data DIR`): a Roboflow / CVAT-style
    export (train/, valid/ or val/, test/, each with its `_annotations.coco.json` beside the images), or a folder
    laid out as the recipe's `data.*` paths say."""
    if not root.is_dir():
        raise KpnetError(root, "no such data folder")
    found = {split: _split_folder(root, split) for split in SPLITS}
    if not any(found.values()):
        return {"data.root": str(root)}
    keys = {"data.root": str(root)}
    for split, paths in found.items():
        if paths is not None:
            keys[f"data.{split}_ann"], keys[f"data.{split}_images"] = str(paths[0]), str(paths[1])
    return keys


def load_split(recipe: Recipe, split: str) -> CocoIndex:
    """The recipe's validated `split`, whose category count must equal `model.num_classes` (unless it is auto)."""
    ann_file, image_root = split_paths(recipe, split)
    if not ann_file.is_file() and split != "train" and Path(recipe.data.root).is_dir():
        raise KpnetError(ann_file, f"no {split} split here (looked for {recipe.data.root}/"
                                   f"{{{','.join(SPLIT_FOLDERS[split])}}}/_annotations.coco.json and the recipe's "
                                   f"data.{split}_ann); choose another with --split")
    index = load_index(ann_file, image_root)
    classes = recipe.model.num_classes
    if classes != "auto" and len(index.cat_ids) != classes:
        raise KpnetError(
            ann_file,
            f"has {len(index.cat_ids)} categories but the recipe sets model.num_classes={classes} "
            f"(use --set model.num_classes={len(index.cat_ids)}, or auto)",
        )
    return index


class TrainDataset(Dataset):
    """Augmented training samples; an index is (image index, epoch) so augmentation is reproducible."""

    def __init__(
        self,
        index: CocoIndex,
        encode: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]],
        input_size: int,
        scales: tuple[float, ...],
        flip: float,
        color: float,
        lighting: float,
        seed: int,
        border: int = 128,
        crop: str = "centernet",
        encode_masks: Callable[..., dict[str, np.ndarray]] | None = None,
        flip_pairs: tuple[tuple[int, int], ...] | None = None,
    ) -> None:
        self.index = index
        self.encode = encode
        self.encode_masks = encode_masks
        self.input_size = input_size
        self.aug = dict(scales=scales, flip=flip, color=color, lighting=lighting, border=border, crop=crop)
        self.seed = seed
        self.flip_pairs = flip_pairs  # a pose family's: keypoints are augmented and encoded with the boxes

    def __len__(self) -> int:
        return len(self.index.image_ids)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        i, epoch = key
        image_id = self.index.image_ids[i]
        path = self.index.image_path(image_id)
        try:
            image = read_image(path)
        except KpnetError as e:
            return {"error": e.line()}
        boxes, classes = self.index.boxes(image_id)
        rng = np.random.default_rng([self.seed, epoch, i])
        kps = None
        if self.flip_pairs is not None:
            try:
                kps = self.index.keypoints(image_id, NUM_JOINTS)
            except KpnetError as e:
                return {"error": e.line()}
        inp, boxes, matrix = train_augment(rng, image, boxes, self.input_size, **self.aug, keypoints=kps,
                                           flip_pairs=self.flip_pairs or ())
        targets = self.encode(boxes, classes) if kps is None else self.encode(boxes, classes, keypoints=kps)
        sample = {"image": torch.from_numpy(inp)}
        sample.update({k: torch.from_numpy(v) for k, v in targets.items()})
        if self.encode_masks is not None:
            masks = self.encode_masks(self.index.segmentations(image_id), matrix, image.shape[:2], boxes, classes)
            sample.update({k: torch.from_numpy(v) for k, v in masks.items()})
        return sample


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack samples; a sample that failed to load raises its one-line error in the main process."""
    for s in samples:
        if "error" in s:
            raise KpnetError(None, s["error"])
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


class EpochBatchSampler(Sampler):
    """Batches of (index, epoch) for iterations [start, total): epoch e is a permutation seeded by (seed, e).

    Because the order is a function of the iteration number, `--resume` continues the exact stream.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, start: int, total: int) -> None:
        if num_samples < batch_size:
            raise KpnetError(None, f"batch size {batch_size} is larger than the training set ({num_samples} images)")
        self.n, self.batch_size, self.seed = num_samples, batch_size, seed
        self.per_epoch = num_samples // batch_size
        self.start, self.total = start, total

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order, order_epoch = None, -1
        for it in range(self.start, self.total):
            epoch, pos = divmod(it, self.per_epoch)
            if epoch != order_epoch:
                order, order_epoch = np.random.default_rng([self.seed, epoch]).permutation(self.n), epoch
            batch = order[pos * self.batch_size : (pos + 1) * self.batch_size]
            yield [(int(i), epoch) for i in batch]


class TestImages(Dataset):
    """Un-augmented images for evaluation: each item is the BGR image, its id and its full (height, width); with
    `min_side`, the image is decoded only as large as that (`kpnet.data.images.read_reduced`)."""

    def __init__(self, index: CocoIndex, min_side: int | None = None) -> None:
        self.index = index
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.index.image_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image_id = self.index.image_ids[i]
        try:
            image, full_hw = read_reduced(self.index.image_path(image_id), self.min_side)
            return {"image": image, "image_id": image_id, "full_hw": full_hw}
        except KpnetError as e:
            return {"error": e.line(), "image_id": image_id}



class ImageFiles(Dataset):
    """Unlabelled image files for `kpnet predict`: like `TestImages`, each item names its file instead of an id."""

    def __init__(self, paths: list[Path], min_side: int | None = None) -> None:
        self.paths, self.min_side = paths, min_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            image, full_hw = read_reduced(self.paths[i], self.min_side)
            return {"image": image, "index": i, "full_hw": full_hw}
        except KpnetError as e:
            return {"error": e.line(), "index": i}
