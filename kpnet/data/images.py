"""Reading images as users have them: the one decoder of training, eval, predict, viz and the library.

Every image becomes 8-bit BGR (OpenCV's `IMREAD_COLOR`): grayscale is replicated to three channels, an
alpha channel is dropped (transparent pixels keep the colour stored under them), 16-bit samples keep
their high byte (v >> 8), CMYK JPEGs (Adobe's inverted ones included) are converted to BGR, and
the EXIF orientation is applied, so pixels, `width`/`height` and boxes refer to the image as viewers show
it (the convention of Roboflow, CVAT's browser view, OpenCV and Detectron2). `oriented_size` reports that
size from the file's header, which is what `kpnet prepare-data coco` checks a COCO file against.

Test time needs only `test.input_size` pixels on the longer side: `read_reduced` decodes a JPEG at 1/2,
1/4 or 1/8 of its resolution in the DCT (never materialising the full image), and other formats are
decoded once and shrunk by the same power of two, so a 10000 x 10000 photograph costs what its reduced
copy costs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np

from kpnet.errors import KpnetError

# cv2 flags decoding at 1/f of the resolution (JPEG: inside the DCT; other formats: decode, then shrink)
REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
           8: cv2.IMREAD_REDUCED_COLOR_8}
EXIF_ORIENTATION = 0x0112
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees (width and height swap)


def oriented_size(path: Path, decode: bool = False) -> tuple[int, int]:
    """(width, height) of an image as it is shown (EXIF orientation applied), from its header; with `decode`,
    the pixels are decoded too (JPEGs at reduced DCT scale), so a truncated or corrupt file raises OSError."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # large photographs are what users have
            im = Image.open(path)
        with im:
            width, height = im.size
            if decode:
                im.draft("RGB", (max(width // 8, 1), max(height // 8, 1)))
                im.load()
            # Pillow's TIFF reader already reports the oriented size
            turned = im.format != "TIFF" and im.getexif().get(EXIF_ORIENTATION) in TRANSPOSING_ORIENTATIONS
    except Image.DecompressionBombError as e:
        raise OSError(str(e)) from None
    return (height, width) if turned else (width, height)


def reduction(full_side: int, min_side: int | None) -> int:
    """The largest decode reduction (1, 2, 4 or 8) that keeps a longer side of `full_side` at least `min_side`."""
    if min_side is None:
        return 1
    return max(f for f in REDUCED if f == 1 or -(-full_side // f) >= min_side)


def read_reduced(path: Path, min_side: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """A BGR image whose longer side is at least `min_side` (None: the full resolution), decoded at 1/1, 1/2, 1/4
    or 1/8 of its resolution, and the full image's (height, width); KpnetError naming the file when it is missing
    or cannot be decoded."""
    data = np.fromfile(str(path), np.uint8) if path.is_file() else None
    if data is None:
        raise KpnetError(path, "image file not found")
    if data.size == 0:
        raise KpnetError(path, "empty file (0 bytes), not an image")
    factor, full_hw = 1, None
    if min_side is not None:
        try:
            width, height = oriented_size(path)
        except (OSError, ValueError, SyntaxError):  # a format Pillow does not know: OpenCV may still read it
            width = height = 0
        factor = reduction(max(width, height), min_side)
        full_hw = (height, width)
    image = cv2.imdecode(data, REDUCED[factor])
    if image is None:
        raise KpnetError(path, "cannot decode image (corrupt or not an image)")
    return image, full_hw if factor > 1 else image.shape[:2]


def read_image(path: Path) -> np.ndarray:
    """The BGR image at full resolution (see the module docstring for what each kind of file becomes)."""
    return read_reduced(path)[0]


def header_sizes(paths: list[Path]) -> list[tuple[int, int]]:
    """(height, width) as shown of each readable image, from the headers (for the test-scale warning)."""
    sizes = []
    for path in paths:
        try:
            width, height = oriented_size(path)
        except (OSError, ValueError, SyntaxError):
            continue
        sizes.append((height, width))
    return sizes
