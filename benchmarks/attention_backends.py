"""The decoder's attention at Karlo's shapes on each attention kernel torch offers, one process,
each call replayed from a CUDA graph:

    python benchmarks/attention_backends.py [--batch 2 8] [--out FILE.json]

Per decoder level that attends (32², 16², 8² at 64-channel heads; 7, 7 and 8 blocks a step) the
keys are the image's own and the 81 context tokens, of which each sample keeps a few (the text's
padding is masked), laid out as `cpp_ext.kernels.pack_attention_kv` lays them out: per sample
[image keys | kept context | dropped context]. Timed on that layout:

- "flash varlen": flash attention's variable-length form with per-sample key counts
  (`models.fused.unet_blocks._attend_flash`, what the runtime runs), the reference for the
  others' outputs;
- "cudnn varlen": cuDNN's attention op given the same offsets and key counts
  (`unet_blocks._attend_cudnn`, where this torch's op takes `seqused_k`);
- "cudnn mask": cuDNN's attention through SDPA with the additive mask broadcast over the queries,
  "cudnn mask full" with it materialised per query, "cudnn mask contiguous" on contiguous copies
  of q, k and v (the copies not timed: whether the pack's strides are what it needs);
- "efficient mask": the memory-efficient kernel with the same mask;
- "cudnn all keys" / "flash all keys": no mask (every key attended, the dropped ones too): the
  bound a mask-free layout would give, not the same function (no error is given for them);
- "flash around" / "cudnn around" (one or two samples): the keys laid out around the image rows
  (`models.fused.keys_around`, what the runtime runs for one image): each sample's kept context
  keys beside its image keys, so each sample's keys are one run with nothing dropped inside;
  flash's op (what the runtime runs), and cuDNN's variable-length op with those offsets alone (no
  key counts needed; not in the runtime: on torch 2.11 it failed under graph capture).

A backend that refuses the inputs is recorded with its error instead of a time. The per-step
figure weights each level by its blocks (times the guided batch's steps: 25 per image).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.timing import graph_ms  # noqa: E402
from models.checkpoint import atomic_write  # noqa: E402
from models.fused import keys_around, unet_blocks  # noqa: E402
from models.fused.unet_blocks import _offsets  # noqa: E402

HEAD = 64
CONTEXT = 81  # 77 text tokens and Karlo's 4 extra context tokens
# (image side, heads, attention blocks per decoder step) of Karlo's decoder at 64-channel heads
LEVELS = [(32, 10, 7), (16, 15, 7), (8, 20, 8)]
# context tokens each sample keeps, repeated over the batch: a prompt's, the empty prompt's
KEPT = [18, 6]


def _problem(batch: int, side: int, heads: int) -> dict:
    """Queries and packed keys/values for one level: q [B, heads, HW, ch] (a view of the
    projection's rows), k/v [B, heads, HW + N, ch] (views of the pack), the per-sample key counts
    and the additive mask."""
    g = torch.Generator(device="cuda").manual_seed(side * 1000 + heads + batch)
    hw = side * side
    rows = torch.randn(batch, hw, heads, 3, HEAD, generator=g, device="cuda", dtype=torch.float16)
    kv = torch.randn(batch, hw + CONTEXT, heads, 2, HEAD, generator=g, device="cuda", dtype=torch.float16)
    kv[:, :hw] = rows[:, :, :, 1:]  # the image's own keys/values first
    used = torch.tensor([hw + KEPT[i % len(KEPT)] for i in range(batch)], device="cuda", dtype=torch.int32)
    positions = torch.arange(hw + CONTEXT, device="cuda")
    mask = torch.zeros(batch, 1, 1, hw + CONTEXT, device="cuda", dtype=torch.float16)
    mask.masked_fill_(positions[None, None, None, :] >= used[:, None, None, None], float("-inf"))
    return {"rows": rows, "kv": kv, "used": used, "mask": mask,
            "q": rows[..., 0, :].transpose(1, 2), "k": kv[..., 0, :].transpose(1, 2),
            "v": kv[..., 1, :].transpose(1, 2)}


def _varlen(p: dict, cudnn: bool = False) -> Callable[[], torch.Tensor]:
    """The runtime's call over the pack (`unet_blocks._attend_flash`, or with `cudnn`
    `_attend_cudnn`, where this torch's op takes `seqused_k`): [B·HW, heads, ch] out, as
    [B, heads, HW, ch] for comparison."""
    b, hw, heads = p["rows"].shape[:3]
    offsets = _offsets(b, hw, p["kv"].shape[1], torch.device("cuda"))
    rows, block = p["rows"].flatten(0, 1).flatten(1), SimpleNamespace(heads=heads)
    attend = unet_blocks._attend_cudnn if cudnn else unet_blocks._attend_flash

    def run() -> torch.Tensor:
        return attend(block, rows, p["kv"], p["used"], offsets).view(b, hw, heads, HEAD).transpose(1, 2)
    return run


def _sdpa(p: dict, backend: SDPBackend, mask: str, contiguous: bool = False) -> Callable[[], torch.Tensor]:
    """SDPA on one backend; `mask` "broadcast" ([B, 1, 1, L]), "full" ([B, 1, HW, L]) or "none";
    with `contiguous`, on contiguous copies of q, k, v made beforehand (the copies not timed)."""
    hw = p["q"].shape[2]
    attn_mask = {"none": None, "broadcast": p["mask"],
                 "full": p["mask"].expand(-1, -1, hw, -1).contiguous()}[mask]
    q, k, v = (t.contiguous() if contiguous else t for t in (p["q"], p["k"], p["v"]))

    def run() -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return run


def _around(p: dict, cudnn: bool = False) -> Callable[[], torch.Tensor]:
    """The same attention over the keys laid out around the image rows (`keys_around.KeysAround`,
    one or two samples; the pack's kept tokens): [B, heads, HW, ch] out for comparison."""
    b, hw, heads = p["rows"].shape[:3]
    if b > 2:
        raise TypeError("the keys around the image rows serve one or two samples")
    context_kv = p["kv"][:, hw:].permute(0, 3, 2, 1, 4)  # [B, 2, heads, N, ch]
    bias = p["mask"][:, 0, 0, hw:]  # the context tokens' part of the problem's mask
    around = keys_around.KeysAround(SimpleNamespace(heads=heads, kv_heads=slice(0, heads)), context_kv,
                                    keys_around.kept_tokens(bias, b, CONTEXT, bias.device), hw, torch.float16)
    around.image_rows().copy_(p["rows"].flatten(0, 1).flatten(1))

    def run() -> torch.Tensor:
        return around.attend(_cudnn_varlen if cudnn else None).view(b, hw, heads, HEAD).transpose(1, 2)
    return run


def _cudnn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                  max_q: int, max_k: int) -> torch.Tensor:
    """`keys_around.varlen_attention` on cuDNN's op, its offsets only (no per-sample key counts)."""
    return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu_q, cu_k, max_q, max_k, False)[0]


WAYS = {"flash varlen": lambda p: _varlen(p),
        "cudnn varlen": lambda p: _varlen(p, cudnn=True),
        "cudnn mask": lambda p: _sdpa(p, SDPBackend.CUDNN_ATTENTION, "broadcast"),
        "cudnn mask full": lambda p: _sdpa(p, SDPBackend.CUDNN_ATTENTION, "full"),
        "cudnn mask contiguous": lambda p: _sdpa(p, SDPBackend.CUDNN_ATTENTION, "broadcast", contiguous=True),
        "efficient mask": lambda p: _sdpa(p, SDPBackend.EFFICIENT_ATTENTION, "broadcast"),
        "cudnn all keys": lambda p: _sdpa(p, SDPBackend.CUDNN_ATTENTION, "none"),
        "flash all keys": lambda p: _sdpa(p, SDPBackend.FLASH_ATTENTION, "none"),
        "flash around": lambda p: _around(p),
        "cudnn around": lambda p: _around(p, cudnn=True)}
SAME_FUNCTION = {"flash varlen", "cudnn varlen", "cudnn mask", "cudnn mask full", "cudnn mask contiguous",
                 "efficient mask", "flash around", "cudnn around"}


def measure(batch: int) -> dict:
    """Microseconds per call and max relative difference from "flash varlen", per level and way."""
    levels, per_step = {}, dict.fromkeys(WAYS, 0.0)
    for side, heads, blocks in LEVELS:
        p = _problem(batch, side, heads)
        want = _varlen(p)().float()
        row = {}
        for name, make in WAYS.items():
            try:
                fn = make(p)
                got = fn().float()
                entry = {"us": round(graph_ms(fn, replays=50) * 1e3, 2)}
                if name in SAME_FUNCTION:
                    entry["rel"] = float((got - want).abs().max() / want.abs().max())
            except (RuntimeError, TypeError) as error:  # the backend refuses these inputs (or lacks them)
                entry = {"error": str(error).splitlines()[0][:300]}
            row[name] = entry
            if per_step[name] is not None:
                per_step[name] = per_step[name] + blocks * entry["us"] if "us" in entry else None
        levels[f"{side}x{side}, {heads} heads"] = row
    return {"levels": levels, "per_step_us": {k: None if v is None else round(v, 1) for k, v in per_step.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[2, 8], help="guided batches (2 per image)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention_backends.py needs a CUDA GPU")
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "cudnn": torch.backends.cudnn.version(), "context": CONTEXT, "kept": KEPT, "batches": {}}
    for batch in args.batch:
        results["batches"][str(batch)] = r = measure(batch)
        print(f"batch {batch}")
        for level, row in r["levels"].items():
            cells = "  ".join(f"{name} {e['us']:.1f}" + (f" ({e['rel']:.1e})" if "rel" in e else "")
                              if "us" in e else f"{name} refused" for name, e in row.items())
            print(f"  {level:20s} {cells}")
        print("  per decoder step (µs): " + "  ".join(f"{k} {v}" for k, v in r["per_step_us"].items()))
        for level, row in r["levels"].items():
            for name, e in row.items():
                if "error" in e:
                    print(f"  {level} {name}: {e['error']}")
    if args.out is not None:
        atomic_write(args.out, lambda path: path.write_text(json.dumps(results, indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
