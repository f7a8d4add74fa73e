"""Uploaded images → H×W×3 uint8 arrays, or a `ValueError` saying why not.

Checked before anything reaches a replica: the byte size (the caller's 413), a readable PNG, JPEG
or WebP, the pixel count from the header before decoding (no decompression bombs), a non-empty
image. Modes are converted correctly: 16-bit images are scaled to 8 bits (not clipped), palettes
and grey expanded, transparency composited on white.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from runtime.images import pil_to_rgb8

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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ValueError(f"{name}: {width}×{height} pixels is over the {MAX_PIXELS}-pixel limit")
            if width == 0 or height == 0:
                raise ValueError(f"{name}: empty image ({width}×{height})")
            image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"{name}: not a readable {', '.join(FORMATS)} image ({exc})") from exc
    except (OSError, SyntaxError) as exc:  # truncated or corrupt data
        raise ValueError(f"{name}: the image data is damaged or truncated ({exc})") from exc
    return pil_to_rgb8(image)
