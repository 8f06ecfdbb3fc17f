"""Image transforms: the training augmentation of REFERENCE §5 and the test-time input of §4.6.

Images are BGR as read by OpenCV, scaled to [0, 1] and normalised with the COCO mean/std that all
three reference codebases use. Every random draw comes from the `rng` passed in, so an
augmented sample is a pure function of (seed, epoch, index) and training resumes exactly.
"""

from __future__ import annotations

import cv2
import numpy as np

from kpnet.data.poses import flip_permutation

# OpenCV's own thread pool spins between calls and fights PyTorch's threads for the cores (measured:
# a CPU training step 5x slower); the data pipeline parallelises over DataLoader workers instead.
cv2.setNumThreads(1)

MEAN_BGR = np.array([0.40789654, 0.44719302, 0.47026115], np.float32)
STD_BGR = np.array([0.28863828, 0.27408164, 0.27809835], np.float32)
CROP_MODES = ("centernet", "cornernet")
EIG_VAL = np.array([0.2141788, 0.01817699, 0.00341571], np.float32)
EIG_VEC = np.array(
    [[-0.58752847, -0.69563484, 0.41340352], [-0.5832747, 0.00994535, -0.81221408], [-0.56089297, 0.71832671, 0.41158938]],
    np.float32,
)


def normalize(image: np.ndarray) -> np.ndarray:
    """BGR float image in [0, 1] -> normalised CHW float32."""
    return ((image - MEAN_BGR) / STD_BGR).transpose(2, 0, 1).astype(np.float32)


def crop_border(border: int, size: int) -> int:
    """Largest border, halving from `border`, that leaves room for a random crop centre (XZ `_get_border`)."""
    i = 1
    while size - border // i <= border // i:
        i *= 2
    return border // i


def affine_to_square(center: np.ndarray, side: float, out_size: int) -> np.ndarray:
    """2x3 affine mapping a square of `side` centred at `center` onto an out_size x out_size canvas."""
    k = out_size / side
    return np.array([[k, 0, out_size / 2 - k * center[0]], [0, k, out_size / 2 - k * center[1]]], np.float32)


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply an axis-aligned 2x3 affine (scale + shift) to (N, 4) x1, y1, x2, y2 boxes."""
    out = boxes.copy()
    out[:, [0, 2]] = boxes[:, [0, 2]] * matrix[0, 0] + matrix[0, 2]
    out[:, [1, 3]] = boxes[:, [1, 3]] * matrix[1, 1] + matrix[1, 2]
    return out


def color_jitter(rng: np.random.Generator, image: np.ndarray, var: float) -> None:
    """Brightness, contrast and saturation in random order, each factor 1 + U(-var, var) (REFERENCE §5)."""
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    gray_mean = float(gray.mean())
    for op in rng.permutation(3):
        alpha = 1.0 + rng.uniform(-var, var)
        if op == 0:
            image *= alpha
        elif op == 1:
            image *= alpha
            image += gray_mean * (1 - alpha)
        else:
            image *= alpha
            image += gray[:, :, None] * (1 - alpha)


def pca_lighting(rng: np.random.Generator, image: np.ndarray, std: float) -> None:
    """AlexNet-style PCA lighting noise with the COCO eigen-decomposition (REFERENCE §5)."""
    alpha = rng.normal(scale=std, size=3).astype(np.float32)
    image += EIG_VEC @ (EIG_VAL * alpha)


def train_augment(
    rng: np.random.Generator,
    image: np.ndarray,
    boxes: np.ndarray,
    input_size: int,
    scales: tuple[float, ...],
    flip: float,
    color: float,
    lighting: float,
    border: int = 128,
    crop: str = "centernet",
    keypoints: np.ndarray | None = None,
    flip_pairs: tuple[tuple[int, int], ...] = (),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random-scale crop around a random centre, flip, colour, lighting (REFERENCE §5).

    The crop is a square window resized to the input, zero outside the image: `crop="centernet"` (XZ)
    takes side max(h, w)·s, so the zoom depends on the image size; `crop="cornernet"` (CN/DK
    `random_crop`) takes side int(input_size·s) of the original-resolution image. Returns the
    normalised CHW input, the boxes in input pixels (not yet clipped) and the 2x3 affine that took the
    boxes there (the flip x -> w - x - 1 included), for anything else annotated on the image. `keypoints`
    (N, J, 3) x, y, v, when given, are mapped in place the same way, left and right joints swapped along
    `flip_pairs` on a flip.
    """
    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
    h, w = image.shape[:2]
    scale = float(rng.choice(np.asarray(scales)))
    side = max(h, w) * scale if crop == "centernet" else float(int(input_size * scale))
    bw, bh = crop_border(border, w), crop_border(border, h)
    center = np.array([rng.integers(bw, max(bw + 1, w - bw)), rng.integers(bh, max(bh + 1, h - bh))], np.float32)
    boxes = boxes.astype(np.float32).reshape(-1, 4)
    flipped = rng.random() < flip
    if flipped:
        image = image[:, ::-1]
        center[0] = w - center[0] - 1
        boxes = np.stack([w - boxes[:, 2] - 1, boxes[:, 1], w - boxes[:, 0] - 1, boxes[:, 3]], axis=1)
        if keypoints is not None:
            keypoints[..., 0] = w - keypoints[..., 0] - 1
            keypoints[:] = keypoints[:, flip_permutation(flip_pairs, keypoints.shape[1])]
    matrix = affine_to_square(center, side, input_size)
    mirror = np.array([[-1, 0, w - 1], [0, 1, 0], [0, 0, 1]], np.float32) if flipped else np.eye(3, dtype=np.float32)
    if keypoints is not None:
        keypoints[..., :2] = keypoints[..., :2] * np.diag(matrix[:, :2]) + matrix[:, 2]
    warped = cv2.warpAffine(np.ascontiguousarray(image), matrix, (input_size, input_size), flags=cv2.INTER_LINEAR)
    img = warped.astype(np.float32) / 255.0
    if color > 0:
        color_jitter(rng, img, color)
    if lighting > 0:
        pca_lighting(rng, img, lighting)
    return normalize(img), transform_boxes(boxes, matrix), matrix @ mirror


def test_input(image: np.ndarray, scale: float, pad: int, pad_add: int = 1,
               full_hw: tuple[int, int] | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """Resize by `scale`, centre in a zero canvas of (h | pad) + pad_add by (w | pad) + pad_add, normalise.

    pad_add 1 gives a multiple of pad + 1 (XZ); pad_add 0 with pad 127 gives 128k − 1 (CN/DK; REFERENCE §4.6).
    `full_hw`: the full image's size when `image` was decoded smaller (`data.images.read_reduced`); `scale` and
    the meta then refer to the full image's pixels.

    Returns the CHW input and the meta needed to map outputs back: border offsets and the scale.
    """
    h, w = full_hw or image.shape[:2]
    new_h, new_w = int(h * scale), int(w * scale)
    resized = cv2.resize(image, (new_w, new_h)) if (new_h, new_w) != image.shape[:2] else image
    inp_h, inp_w = (new_h | pad) + pad_add, (new_w | pad) + pad_add
    top, left = inp_h // 2 - new_h // 2, inp_w // 2 - new_w // 2
    canvas = np.zeros((inp_h, inp_w, 3), np.float32)
    canvas[top : top + new_h, left : left + new_w] = resized.astype(np.float32) / 255.0
    meta = {"border_x": float(left), "border_y": float(top), "scale": float(scale), "width": float(w), "height": float(h)}
    return normalize(canvas), meta
