"""Writing a folder of Karlo's original files (Kakao Brain's names and key layout) from our state
dict, for the loader's tests."""

from __future__ import annotations

from pathlib import Path

import torch

from models.convert.karlo import ours_to_karlo

NAMES = {
    "clip": "ViT-L-14.pt",
    "stats": "ViT-L-14_stats.th",
    "prior": "prior-ckpt-step=01000000-of-01000000.ckpt",
    "decoder": "decoder-ckpt-step=01000000-of-01000000.ckpt",
    "super_res": "improved-sr-ckpt-step=1.2M.ckpt",
}


def write_karlo_folder(state: dict, folder: Path, skip: tuple[str, ...] = ()) -> Path:
    """Karlo's five files in `folder` (`torch.save`, Lightning-style `state_dict` for the networks),
    except the parts in `skip`."""
    for part, content in ours_to_karlo(state).items():
        if part in skip:
            continue
        if part in ("prior", "decoder", "super_res"):
            content = {"state_dict": content, "global_step": 1_000_000}
        torch.save(content, folder / NAMES[part])
    return folder
