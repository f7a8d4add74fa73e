"""Loading state dicts safely and strictly, and our own checkpoint format.

Foreign files (`.ckpt`, `.pt`, `.bin`, `.th`) load through `torch.load(weights_only=True)`,
which refuses pickled code; safetensors files load through `safetensors`. Our own format is a
folder with `config.json` (the `UnCLIPConfig`) and `model.safetensors`, written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models import configs
from models.atomic_files import atomic_write
from models.file_integrity import write_checksums


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model, with the reason."""


def load_tensors(path: str | os.PathLike) -> dict:
    """Load a state-dict-like object from safetensors or a weights-only torch file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error type for truncated/corrupt files
            raise CheckpointError(f"cannot read {path}: not a complete safetensors file ({exc}); the file is "
                                  "truncated or damaged, copy or export it again") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle payloads, corrupt files, TorchScript archives
        raise CheckpointError(
            f"cannot load {path} as a weights-only checkpoint ({type(exc).__name__}: {exc}). "
            "Only plain tensors are accepted; convert the file to safetensors if it holds code."
        ) from exc


def load_strict(module: nn.Module, state: dict, what: str, ignore_missing: tuple[str, ...] = ()) -> None:
    """Load `state` into `module` (assigning tensors), failing with every missing/unexpected key.

    :param ignore_missing: key prefixes that may be absent (e.g. a vision tower not shipped).
    """
    own = module.state_dict()  # once: it walks every submodule
    expected = set(own.keys())
    missing = sorted(k for k in expected - state.keys() if not k.startswith(ignore_missing))
    unexpected = sorted(state.keys() - expected)
    shape_errors = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in expected and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shape_errors:
        lines = [f"{what} does not match the model architecture:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shape_errors)):
            if items:
                shown = items[:40] + ([f"... and {len(items) - 40} more"] if len(items) > 40 else [])
                lines.append(f"  {title} keys ({len(items)}): " + ", ".join(shown))
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(state, strict=not ignore_missing, assign=True)


def config_to_dict(cfg: configs.UnCLIPConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict, source: str = "config") -> configs.UnCLIPConfig:
    """Inverse of `config_to_dict`, checked field by field (see `models.config_schema`)."""
    from models.config_schema import config_from_dict as checked

    return checked(data, source)


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 over every tensor of the module's state dict (names, shapes and values; floating
    tensors as float32), so the same weights hash the same whichever file or storage dtype they
    came from (a float16 file and its float32 cast in memory agree)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu()
        t = (t.float() if t.is_floating_point() else t).contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_model(model: nn.Module, cfg: configs.UnCLIPConfig, folder: str | os.PathLike) -> None:
    """Write `config.json`, `model.safetensors` (contiguous CPU tensors) and `checksums.json` (their
    SHA-256, verified on load) into `folder`."""
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda p: save_file(state, str(p)))
    text = json.dumps(config_to_dict(cfg), indent=2)
    atomic_write(folder / "config.json", lambda p: p.write_text(text))
    write_checksums(folder, ["config.json", "model.safetensors"])
