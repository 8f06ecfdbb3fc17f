"""Writes the generated image cases of images/ (run from anywhere; the output is deterministic):
empty.jpg (0 bytes), png_named.jpg (a PNG under a .jpg name), one_pixel.png (1x1), gray16.png
(16-bit grey ramp), cmyk.jpg (a CMYK JPEG of solid red) and animated.gif (red, then blue)."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

IMAGES = Path(__file__).resolve().parent / "images"


def ramp16() -> np.ndarray:
    """The 16-bit grey ramp of gray16.png: 30 rows x 40 columns, value 1600 * column + row."""
    return (np.arange(40, dtype=np.uint16)[None, :] * 1600 + np.arange(30, dtype=np.uint16)[:, None]).astype(np.uint16)


def main() -> None:
    (IMAGES / "empty.jpg").write_bytes(b"")
    bgr = np.zeros((30, 40, 3), np.uint8)
    bgr[:, :20] = (255, 0, 0)
    (IMAGES / "png_named.jpg").write_bytes(cv2.imencode(".png", bgr)[1].tobytes())
    (IMAGES / "one_pixel.png").write_bytes(cv2.imencode(".png", np.full((1, 1, 3), 128, np.uint8))[1].tobytes())
    (IMAGES / "gray16.png").write_bytes(cv2.imencode(".png", ramp16())[1].tobytes())
    buf = io.BytesIO()
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(buf, format="JPEG", quality=95)
    (IMAGES / "cmyk.jpg").write_bytes(buf.getvalue())
    buf = io.BytesIO()
    frames = [Image.new("RGB", (40, 30), colour) for colour in ("red", "blue")]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (IMAGES / "animated.gif").write_bytes(buf.getvalue())


if __name__ == "__main__":
    main()
