"""Uploaded images → H×W×3 uint8 arrays, or a `ValueError` saying why not.

Checked before anything reaches a replica: the byte size (the caller's 413), then, through the
runtime's own reader (`runtime.images.open_image_file`), a readable PNG, JPEG or WebP, the pixel
count from the header before decoding (no decompression bombs) and a non-empty image. Modes are
converted as the runtime converts them (`pil_to_rgb8`: 16-bit images scaled, not clipped).
"""

from __future__ import annotations

import io

import numpy as np

from runtime.images import open_image_file, pil_to_rgb8

FORMATS = ("PNG", "JPEG", "WEBP")
MAX_PIXELS = 4096 * 4096  # an upload's limit, below the runtime's own


class UploadTooLarge(ValueError):
    """An upload over the byte limit."""


def decode_upload(data: bytes, max_bytes: int, name: str = "image") -> np.ndarray:
    """The uploaded image as an H×W×3 uint8 array."""
    if len(data) > max_bytes:
        raise UploadTooLarge(f"{name}: {len(data)} bytes is over the {max_bytes}-byte limit")
    if not data:
        raise ValueError(f"{name}: the upload is empty")
    image = open_image_file(io.BytesIO(data), name, MAX_PIXELS, FORMATS, label="the upload")
    return pil_to_rgb8(image)
