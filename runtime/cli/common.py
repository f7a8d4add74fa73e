"""What the command lines share: output file names, their image format, the check that they can be
written, and errors as one line naming the command's own flags."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

# `UnCLIP(backend=...)`'s choices (runtime.backends.choose.CHOICES), for the parsers; auto first.
BACKEND_CHOICES = ("auto", "torch", "measured", "onnxruntime", "tensorrt")

# The public API's argument names → this command's flags, so an error names what the user typed.
FLAG_NAMES = {"num_images_per_prompt": "--num-images", "prior_steps": "--prior-steps",
              "decoder_steps": "--decoder-steps", "super_res_steps": "--super-res-steps",
              "prior_guidance_scale": "--prior-guidance-scale", "decoder_guidance_scale": "--decoder-guidance-scale",
              "similarity_quantiles": "--similarity", "top_k": "--top-k", "top_p": "--top-p",
              "temperature": "--temperature", "fp8_scales": "--fp8-scales", "precision": "--precision",
              "fp8_networks": "--fp8-networks"}


def as_cli_message(exc: BaseException) -> str:
    """The error as one line, with API argument names replaced by this command's flags."""
    message = " ".join(str(exc).split())
    for name, flag in FLAG_NAMES.items():
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w=])", flag, message)
    return message


# Image formats an output name may ask for, by suffix (Pillow's names); no suffix means PNG. Lossy
# ones get a high quality setting: the user asked for the format, not for its default compression.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                 ".tif": "TIFF", ".tiff": "TIFF"}
_SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"quality": 95}}


def image_format(path: Path) -> str:
    """The Pillow format an output path names by its suffix (PNG without one); a suffix that names
    no image format is refused, so `-o out.txt` fails before any work instead of writing a PNG."""
    suffix = path.suffix.lower()
    if not suffix:
        return "PNG"
    if suffix not in IMAGE_FORMATS:
        known = ", ".join(sorted(IMAGE_FORMATS))
        raise ValueError(f"-o {path}: {path.suffix!r} is not an image format this command writes (use {known})")
    return IMAGE_FORMATS[suffix]


def save_image(image, path: Path) -> None:
    """Write a PIL image atomically in the format its path names."""
    from models.atomic_files import atomic_write

    fmt = image_format(path)
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt, **_SAVE_OPTIONS.get(fmt, {})))


def check_image_outputs(output: str, count: int) -> None:
    """The whole output check of an image command, before any work: `output` (an existing folder
    is refused even where several images would be named after it beside it) and the `count`
    files named after it, by `image_format` and `check_writable`."""
    paths = output_paths(output, count)
    check_writable([Path(output), *paths] if count > 1 else paths)
    for path in paths:
        image_format(path)


def check_writable(paths: list[Path]) -> None:
    """Refuse output paths that cannot be written, before any work: an existing directory, or a
    folder that cannot be made or written (missing folders are created when the images are saved)."""
    for path in paths:
        if path.is_dir():
            raise ValueError(f"-o {path}: is a directory; give a file name such as {path / 'out.png'}")
        existing = path.parent if str(path.parent) else Path(".")
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise ValueError(f"-o {path}: {existing} is a file, not a folder")
        try:  # a real write: permission bits say nothing for root or for /proc-like file systems
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".unclip-write-check-"):
                pass
        except OSError as exc:
            raise ValueError(f"-o {path}: cannot write in {existing} ({exc.strerror or exc})") from None


def output_paths(output: str, count: int) -> list[Path]:
    """The files `count` images go to: `output` itself for one, else `stem-0.suffix`, … (PNG's
    suffix where `output` has none)."""
    path = Path(output)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(count)]
