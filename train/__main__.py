"""`python -m train STAGE [STAGE …] --out weights/default`: train the default model.

Stages: `clip`, `prior`, `decoder`, `super_res`, `super_res_2` (the second upsampler, for configs
whose super-res chain has one), `ar_prior` (the paper's autoregressive prior,
`train.ar_prior`; optional: a model without it generates with the diffusion prior), or `all` (in
that order). Each stage writes
`stage-<name>.safetensors` into `--out` (matrices in fp16, vectors in fp32, to keep the shipped
weights small) and its record (seed, settings, device, versions, earlier rounds) as
`stage-<name>.json`; later stages read the CLIP they need from there. Stages may train at the same
time in separate processes. When the first four exist the folder gets `model.safetensors` +
`config.json` (loadable by `UnCLIP(folder)`) and `manifest.json` (config, data version, held-out
combinations, every stage's record).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import atomic_write, config_to_dict, load_strict
from models.clip import ClipEncoder
from models.configs import get_config
from models.file_integrity import write_checksums
from models.unclip import UnCLIPModel, chain_state_keys
from train import stages
from train.ar_prior import train_ar_prior
from train.data import DATA_VERSION, HELD_OUT

STAGES = ("clip", "prior", "decoder", "super_res", "super_res_2", "ar_prior")


def required_stages(cfg) -> tuple[str, ...]:
    """The stages an assembled model needs: CLIP, prior, decoder and each super-res stage of the
    config's chain (the AR prior joins when trained)."""
    chain = tuple("super_res" if i == 0 else f"super_res_{i + 1}" for i in range(len(cfg.super_res)))
    return ("clip", "prior", "decoder", *chain)

log = logging.getLogger("train")


def compact(state: dict, keep_fp32: frozenset[str] = frozenset()) -> dict:
    """Matrices to fp16, vectors, scalars and the names in `keep_fp32` kept fp32, all contiguous on the CPU."""
    return {k: (v.half() if v.ndim >= 2 and k not in keep_fp32 else v.float()).detach().cpu().contiguous()
            for k, v in state.items()}


def save_stage(out: Path, name: str, module: torch.nn.Module) -> None:
    # Buffers (CLIP statistics, the AR prior's codebook: bucket edges finer than fp16 resolves) stay fp32.
    state = compact(module.state_dict(), frozenset(n for n, _ in module.named_buffers()))
    atomic_write(out / f"stage-{name}.safetensors", lambda p: save_file(state, str(p)))


def load_clip(out: Path, cfg, device) -> ClipEncoder:
    path = out / "stage-clip.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: train the clip stage first (python -m train clip --out {out})")
    with torch.device("meta"):
        clip = ClipEncoder(cfg.clip)
    load_strict(clip, {k: v.float() for k, v in load_file(str(path)).items()}, str(path))
    clip.reset_causal_mask()
    return clip.to(device)


def split_model(out: Path) -> None:
    """Recreate missing stage files from `model.safetensors` (only the assembled model is committed)."""
    path = out / "model.safetensors"
    if not path.is_file():
        return
    state = None
    for s in STAGES:
        if not (out / f"stage-{s}.safetensors").is_file():
            state = state if state is not None else chain_state_keys(load_file(str(path)))
            prefix = state_prefix(s)
            part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if not part:
                continue  # a stage the assembled model does not have (ar_prior before it was trained)
            atomic_write(out / f"stage-{s}.safetensors", lambda p, part=part: save_file(part, str(p)))


def state_prefix(stage: str) -> str:
    """Where a training stage's weights sit in the model's state: `super_res` is the chain's first
    super-res stage (`super_res.0.`), `super_res_2` its second (`super_res.1.`); the others under
    their own name."""
    if stage == "super_res":
        return "super_res.0."
    if stage.startswith("super_res_"):
        return f"super_res.{int(stage.removeprefix('super_res_')) - 1}."
    return f"{stage}."


def stage_record(out: Path, name: str) -> dict:
    """The training record of a stage: its `stage-<name>.json`, else the one in manifest.json."""
    path = out / f"stage-{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    manifest = out / "manifest.json"
    return json.loads(manifest.read_text()).get("stages", {}).get(name, {}) if manifest.is_file() else {}


def assemble(out: Path, cfg) -> bool:
    """Write model.safetensors + config.json + manifest.json once every required stage file exists
    (with the AR prior when its file exists too)."""
    required = required_stages(cfg)
    if not all((out / f"stage-{s}.safetensors").is_file() for s in required):
        return False
    present = [s for s in STAGES if (out / f"stage-{s}.safetensors").is_file() and (s in required or s == "ar_prior")]
    manifest = {"config": config_to_dict(cfg), "data_version": DATA_VERSION, "held_out": HELD_OUT,
                "stages": {s: stage_record(out, s) for s in present}}
    state = {}
    for s in present:
        state.update({state_prefix(s) + k: v for k, v in load_file(str(out / f"stage-{s}.safetensors")).items()})
    model = UnCLIPModel.empty(cfg, with_ar_prior="ar_prior" in present)
    load_strict(model, state, "assembled default model")  # checks every key before writing
    atomic_write(out / "model.safetensors", lambda p: save_file(state, str(p)))
    atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(config_to_dict(cfg), indent=2)))
    atomic_write(out / "manifest.json", lambda p: p.write_text(json.dumps(manifest, indent=2)))
    write_checksums(out, ["config.json", "model.safetensors"])
    return True


def _resume(out: Path, name: str, resume: bool, previous: dict, seed: int) -> tuple[dict | None, int]:
    """(weights to continue from or None, the seed of this round: a new one per resumed round)."""
    path = out / f"stage-{name}.safetensors"
    if not (resume and path.is_file()):
        return None, seed
    return load_file(str(path)), seed + 10 * previous.get("rounds", 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n")[0])
    p.add_argument("stages", nargs="+", choices=STAGES + ("all",))
    p.add_argument("--out", default="weights/default")
    p.add_argument("--config", default="default")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count (smoke tests)")
    p.add_argument("--batch", type=int, default=None, help="override every stage's batch size (smoke tests)")
    p.add_argument("--max-minutes", type=float, default=None, help="per-stage time budget (stops early)")
    p.add_argument("--codebook-images", type=int, default=65536,
                   help="ar_prior: training images whose CLIP embeddings fit its PCA and buckets")
    p.add_argument("--resume", action="store_true", help="prior/decoder/super_res: continue from the weights in --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    cfg, device, out = get_config(args.config), torch.device(args.device), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split_model(out)
    wanted = (*required_stages(cfg), "ar_prior") if "all" in args.stages else args.stages
    todo = tuple(s for s in STAGES if s in wanted)
    budget_share = {"super_res": 0.75, "super_res_last": 0.25}  # one budget per stage, split over its models
    settings = {
        k: dataclasses.replace(v, steps=max(1, round(v.steps * args.scale)), batch=args.batch or v.batch,
                               warmup=min(v.warmup, max(1, round(v.steps * args.scale) // 4)),
                               max_seconds=None if args.max_minutes is None
                               else 60 * args.max_minutes * budget_share.get(k, 1.0))
        for k, v in stages.SETTINGS.items()
    }
    for i, name in enumerate(todo):
        seed = args.seed * 100 + STAGES.index(name)
        previous = stage_record(out, name) if args.resume else {}
        init, seed = (None, seed) if name == "clip" else _resume(out, name, args.resume, previous, seed)
        start = time.time()
        if name == "clip":
            module = stages.train_clip(cfg, settings["clip"], device, seed)
        elif name == "prior":
            module = stages.train_prior(cfg, load_clip(out, cfg, device), settings["prior"], device, seed, init)
        elif name == "decoder":
            module = stages.train_decoder(cfg, load_clip(out, cfg, device), settings["decoder"], device, seed, init)
        elif name == "ar_prior":
            module, codebook = train_ar_prior(cfg, load_clip(out, cfg, device), settings["ar_prior"], device, seed,
                                              init, args.codebook_images)
        elif name == "super_res":
            module = stages.train_super_res(cfg, settings["super_res"], settings["super_res_last"], device, seed,
                                            init)
        else:  # a later super-res stage of the chain
            module = stages.train_super_res(cfg, settings[name], settings["super_res_last"], device, seed, init,
                                            stage=int(name.removeprefix("super_res_")) - 1)
        save_stage(out, name, module)
        used = [settings[k] for k in settings if k == name or k.startswith(name + "_")]
        record = {
            "rounds": previous.get("rounds", 1) + (1 if previous and init is not None else 0),
            "previous": previous if init is not None else None,
            "seed": seed, "seconds": round(time.time() - start, 1), "settings": [dataclasses.asdict(s) for s in used],
            "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
            "torch": torch.__version__,
            **({"codebook": codebook} if name == "ar_prior" else {}),
        }
        atomic_write(out / f"stage-{name}.json", lambda p, r=record: p.write_text(json.dumps(r, indent=2)))
        log.info("stage %s done in %.0f s (%d/%d)", name, time.time() - start, i + 1, len(todo))
    if assemble(out, cfg):
        log.info("wrote %s (model.safetensors, config.json, manifest.json)", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
