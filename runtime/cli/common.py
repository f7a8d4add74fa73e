"""What the command lines share: output file names, the check that they can be written, and errors
as one line naming the command's own flags."""

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
    path = Path(output)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(count)]
