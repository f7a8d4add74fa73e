"""Kakao Brain's original Karlo checkpoints ↔ our `UnCLIPModel` state dict.

Karlo's files (`karlo/sampler/template.py`): `ViT-L-14.pt`, `ViT-L-14_stats.th`,
`prior-ckpt-step=…ckpt`, `decoder-ckpt-step=…ckpt`, `improved-sr-ckpt-step=…ckpt`, each
`{"state_dict": …}` with `model.` (prior, decoder) or `model_first_steps.`/`model_last_step.`
(super-res) prefixes. Our modules keep Karlo's parameter names, so the mapping is by prefix,
except that the decoder's conditioning layers live in `decoder.text_proj`.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from models.checkpoint import CheckpointError, load_tensors
from models.clip import UNUSED_CLIP_KEYS
from models.configs import KARLO, UnCLIPConfig
from models.torchscript_archive import ArchiveRefused, is_torchscript, read_torchscript_state
from models.unclip import UnCLIPModel

FILE_PATTERNS = {
    "clip": ("ViT-L-14.safetensors", "ViT-L-14.pt"),
    "stats": ("ViT-L-14_stats.th",),
    "prior": ("prior-ckpt*.ckpt", "prior*.safetensors"),
    "decoder": ("decoder-ckpt*.ckpt", "decoder*.safetensors"),
    "super_res": ("improved-sr-ckpt*.ckpt", "improved-sr*.safetensors"),
}
TEXT_PROJ_MODULES = ("clip_emb.", "text_feat_proj.", "clip_tok_proj.", "text_seq_proj.", "cf_param")
SR_PREFIXES = {"model_first_steps.": "first_steps.", "model_last_step.": "last_step."}


def find_karlo_files(root: str | Path) -> dict[str, Path]:
    """Locate Karlo's five files in `root`; raise FileNotFoundError naming what is missing."""
    root = Path(root)
    found, missing = {}, []
    for part, patterns in FILE_PATTERNS.items():
        hits = [p for pattern in patterns for p in sorted(root.glob(pattern))]
        if hits:
            found[part] = hits[0]
        else:
            missing.append(f"{part} ({' or '.join(patterns)})")
    if missing:
        raise FileNotFoundError(f"Karlo folder {root} lacks: {', '.join(missing)}")
    return found


def load_checkpoint_state(path: Path, trust_pickle: bool = False) -> dict:
    """Tensors of a Karlo file: `state_dict` of a Lightning-style checkpoint, or the file itself.

    Nothing that can run code loads unless `trust_pickle` is set (only for files from a source you
    trust). TorchScript archives (OpenAI's CLIP release format) are read as data, never through
    `torch.jit.load`, which runs the archive's code; an archive that needs its own code to load, and
    a pickle that is not plain tensors, are refused without the opt-in.
    """
    if is_torchscript(path):
        try:
            return read_torchscript_state(path)
        except ArchiveRefused as exc:
            if not trust_pickle:
                raise CheckpointError(str(exc)) from exc
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    try:
        obj = load_tensors(path)
    except CheckpointError as exc:
        if not trust_pickle:
            if isinstance(exc.__cause__, pickle.UnpicklingError):
                raise CheckpointError(
                    f"{path}: refused because loading it could run code (it pickles objects beyond plain tensors); "
                    "only for a file from a source you trust, load it with trust_pickle=True (CLI: --trust-pickle)"
                ) from None
            raise
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    return dict(obj)


def karlo_to_ours(clip: dict, stats: tuple | list, prior: dict, decoder: dict, super_res: dict) -> dict:
    """Karlo state dicts → one `UnCLIPModel` state dict."""
    out = {f"clip.model.{k}": v for k, v in clip.items() if k not in UNUSED_CLIP_KEYS}
    mean, std = stats
    out["prior.clip_mean"] = torch.as_tensor(mean).reshape(1, -1)
    out["prior.clip_std"] = torch.as_tensor(std).reshape(1, -1)
    for k, v in prior.items():
        out["prior." + k.removeprefix("model.")] = v
    for k, v in decoder.items():
        name = k.removeprefix("model.")
        out[("decoder.text_proj." if name.startswith(TEXT_PROJ_MODULES) else "decoder.unet.") + name] = v
    for k, v in super_res.items():
        src = next((p for p in SR_PREFIXES if k.startswith(p)), None)
        if src is None:
            raise CheckpointError(f"unexpected key in the super-res checkpoint: {k}")
        out["super_res.0." + SR_PREFIXES[src] + k[len(src) :]] = v  # Karlo's one stage: the chain's first
    return out


def ours_to_karlo(state: dict) -> dict[str, dict]:
    """Inverse of `karlo_to_ours`: {"clip", "stats", "prior", "decoder", "super_res"} contents."""
    files: dict[str, dict] = {"clip": {}, "prior": {}, "decoder": {}, "super_res": {}}
    inverse_sr = {v: k for k, v in SR_PREFIXES.items()}
    for k, v in state.items():
        if k.startswith("clip.model."):
            files["clip"][k.removeprefix("clip.model.")] = v
        elif k in ("prior.clip_mean", "prior.clip_std"):
            continue
        elif k.startswith("prior."):
            files["prior"]["model." + k.removeprefix("prior.")] = v
        elif k.startswith(("decoder.unet.", "decoder.text_proj.")):
            files["decoder"]["model." + k.split(".", 2)[2]] = v
        elif k.startswith("super_res.0."):
            sub, rest = k.removeprefix("super_res.0.").split(".", 1)
            files["super_res"][inverse_sr[sub + "."] + rest] = v
        elif k.startswith("super_res."):
            raise CheckpointError(f"Karlo's files hold one super-res stage; {k} belongs to a later one")
    files["stats"] = (state["prior.clip_mean"][0], state["prior.clip_std"][0])
    return files


def load_karlo(root: str | Path, cfg: UnCLIPConfig = KARLO, trust_pickle: bool = False) -> UnCLIPModel:
    """Build an `UnCLIPModel` from a folder of Karlo's original files."""
    files = find_karlo_files(root)
    parts = {name: load_checkpoint_state(path, trust_pickle) for name, path in files.items() if name != "stats"}
    stats = load_tensors(files["stats"])
    if not (isinstance(stats, (tuple, list)) and len(stats) == 2):
        raise CheckpointError(f"{files['stats']} should hold (clip_mean, clip_std)")
    state = karlo_to_ours(parts["clip"], stats, parts["prior"], parts["decoder"], parts["super_res"])
    return UnCLIPModel.from_state(cfg, state, f"Karlo checkpoints in {root}")
