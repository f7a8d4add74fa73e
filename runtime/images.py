"""Image inputs of the public API → float tensors in [0, 1].

Accepted: a PIL image (any mode: 16-bit and float images are scaled to [0, 1], not clipped;
transparency is composited on white), a path to an image file (at most `MAX_PIXELS` pixels, checked
from the header before decoding), a numpy array (H×W, H×W×C with C in
1/3/4; uint8 0…255 or float 0…1), a torch tensor ([3, H, W], [B, 3, H, W] or [H, W]; uint8 or
float 0…1), or a list of these. Anything else, an unreadable file, an empty image or non-finite
values fail with a `ValueError`/`TypeError` that says which input and why.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 8192 * 8192


def pil_to_rgb8(image: Image.Image) -> np.ndarray:
    """Any Pillow mode → H×W×3 uint8: 16-bit and float images scaled rather than clipped, palettes
    and grey expanded, transparency composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        if image.mode == "F" and array.max(initial=0) <= 1.0:
            top = 1.0  # float images in [0, 1]
        grey = np.clip(np.rint(array / top * 255), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _from_pil(image: Image.Image, what: str) -> torch.Tensor:
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"{what}: empty image ({width}×{height})")
    array = pil_to_rgb8(image)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def open_image_file(source, what: str, max_pixels: int = MAX_PIXELS, formats: tuple[str, ...] | None = None,
                    label: str | None = None) -> Image.Image:
    """A decoded image from a path or a binary file object, its size checked from the header first
    (no decompression bombs) and, with `formats`, only those formats read. `label` names the
    source in errors (default: the path)."""
    label = str(source) if label is None else label
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source, formats=formats) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise ValueError(f"{what}: {label} is {width}×{height} pixels, over the {max_pixels}-pixel limit")
                if width == 0 or height == 0:
                    raise ValueError(f"{what}: {label} is an empty image ({width}×{height})")
                opened.load()
                return opened.copy()
    except FileNotFoundError as exc:
        raise ValueError(f"{what}: cannot read image file {label} (no such file)") from exc
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        kinds = f"{', '.join(formats)} " if formats else ""
        raise ValueError(f"{what}: cannot read image file {label}: not a readable {kinds}image ({exc})") from exc
    except (OSError, SyntaxError) as exc:  # truncated or corrupt data
        raise ValueError(f"{what}: cannot read image file {label}: the data is damaged or truncated ({exc})") from exc


def _from_array(array: np.ndarray, what: str) -> torch.Tensor:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"{what}: expected an H×W or H×W×C array with C in 1, 3, 4, got shape {array.shape}")
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # torch tensors are writable views: a read-only buffer (e.g. PIL's) is copied first
        array = array.copy()
    return _from_tensor(torch.from_numpy(array).permute(2, 0, 1), what)


def _from_tensor(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
        raise ValueError(f"{what}: expected [C, H, W] with C in 1, 3, 4, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{what}: empty image (shape {tuple(t.shape)})")
    if t.dtype == torch.uint8:
        t = t.float() / 255
    elif t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in (torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"{what}: unsupported dtype {t.dtype}")
    else:
        t = t.float()
        if not torch.isfinite(t).all():
            raise ValueError(f"{what}: contains NaN or infinite values")
        if t.min() < -1e-3 or t.max() > 1 + 1e-3:
            raise ValueError(f"{what}: float pixel values must lie in [0, 1], got [{t.min():.3g}, {t.max():.3g}]")
    t = t.clamp(0, 1)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t[:3].contiguous()


def _one(image, what: str) -> torch.Tensor:
    if isinstance(image, (str, Path)):
        return _from_pil(open_image_file(image, what), f"{what} ({image})")
    if isinstance(image, Image.Image):
        return _from_pil(image, what)
    if isinstance(image, np.ndarray):
        return _from_array(image, what)
    if isinstance(image, torch.Tensor):
        return _from_tensor(image.detach().cpu(), what)
    raise TypeError(f"{what}: expected a PIL image, a path, a numpy array or a torch tensor, "
                    f"got {type(image).__name__}")


def load_images(images, name: str = "image") -> list[torch.Tensor]:
    """Every input image as a float [3, H, W] tensor in [0, 1] (CPU)."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images)
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError(f"{name}: no images given")
    out = []
    for i, image in enumerate(items):
        what = name if len(items) == 1 else f"{name}[{i}]"
        out.append(_one(image, what))
    return out


def resize_batch(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """[B, 3, size, size] in [0, 1]: each image resized (bicubic, antialiased, no crop)."""
    return torch.cat([
        F.interpolate(t[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        for t in images
    ]).clamp(0, 1)
