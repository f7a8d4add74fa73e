"""The images a replica returns, encoded as OpenAI's `output_format` and `output_compression` ask:
PNG (the default), JPEG or WebP, as base64 text.

`output_compression` (0-100, default 100, as OpenAI's) is the quality of the lossy formats; PNG is
lossless whatever it says, so it is taken and ignored there, and PNG is written at zlib level 1,
which encodes several times faster than the default level for the same pixels.
"""

from __future__ import annotations

import base64
import io

from PIL import Image

FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}  # output_format → Pillow's name
DEFAULT_FORMAT = "png"
DEFAULT_COMPRESSION = 100


class EncodingError(ValueError):
    """A format or compression `encode` cannot honour; `param` names the request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def requested(request: dict) -> tuple[str, int | None]:
    """(output_format, output_compression) a replica request asks for, the format defaulted."""
    return request.get("output_format", DEFAULT_FORMAT), request.get("output_compression")


def check(output_format: str, compression: int | None) -> int:
    """Refuse a format or compression `encode` cannot honour (before any work); the quality to use."""
    if output_format not in FORMATS:
        raise EncodingError(f"output_format must be one of {sorted(FORMATS)}, got {output_format!r}", "output_format")
    quality = DEFAULT_COMPRESSION if compression is None else compression
    if isinstance(quality, bool) or not isinstance(quality, int) or not 0 <= quality <= 100:
        raise EncodingError(f"output_compression must be an integer in [0, 100], got {compression!r}",
                            "output_compression")
    return quality


def encode(image: Image.Image, output_format: str = DEFAULT_FORMAT, compression: int | None = None) -> str:
    """One image as base64 text in `output_format` ("png", "jpeg" or "webp")."""
    quality = check(output_format, compression)
    options = {"compress_level": 1} if output_format == "png" else {"quality": quality}
    buf = io.BytesIO()
    image.save(buf, format=FORMATS[output_format], **options)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def media_type(output_format: str) -> str:
    """The MIME type of a data URL of that format."""
    return f"image/{output_format}"
