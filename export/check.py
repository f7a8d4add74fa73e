"""Checks of an exported graph: `onnx.checker`, then ONNX Runtime against the torch module on
fresh random inputs at several batch sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from models.unclip import UnCLIPModel
from runtime.backends.signatures import StageSignature, stage_module


def max_relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max|got − ref| / max|ref| over the reference's finite values (the project's tolerance
    measure); infinite where the two disagree on which values are NaN or infinite (a graph whose
    outputs are all NaN is not "0.0 off"), infinities of the same sign at the same places agreeing
    (the decoder context's −inf mask bias)."""
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    finite = np.isfinite(ref)
    if not np.array_equal(np.isfinite(got), finite) or not np.array_equal(got[~finite], ref[~finite]):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = float(np.abs(ref[finite]).max()) or 1.0
    return float(np.abs(got[finite] - ref[finite]).max()) / scale


def check_graph(
    model: UnCLIPModel, sig: StageSignature, path: Path, dtype: torch.dtype = torch.float32,
    batches: tuple[int, ...] = (1, 3),
    providers: tuple[str | tuple[str, dict[str, str]], ...] = ("CPUExecutionProvider",), seed: int = 1,
) -> float:
    """Largest relative error of the graph's outputs against the torch module, over `batches`:
    the float32 module, or the module in the precision the model is held in (a model held in
    fp16 is its own reference). Raises `onnx.checker.ValidationError` for an invalid graph."""
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    options = ort.SessionOptions()
    if dtype == torch.float16 and list(providers) == ["CPUExecutionProvider"]:
        # ONNX Runtime 1.32's extended CPU fusions crash the process (SIGSEGV) on our fp16 CLIP
        # text graph; basic optimisation runs it. fp16 graphs are meant for GPU providers anyway.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=list(providers))
    module = stage_module(model, sig.name)
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in batches:
        inputs = sig.sample_inputs(batch, torch.float32, "cpu", gen, model.cfg.prior.diffusion.num_train_timesteps,
                                   model.cfg.clip.vocab_size)
        feed = {k: (v.to(dtype) if v.is_floating_point() else v).numpy() for k, v in inputs.items()}
        got = session.run(sig.output_names, feed)
        held = next(module.parameters())
        with torch.no_grad():
            ref = module(*(v.to(held.device, held.dtype if v.is_floating_point() else v.dtype)
                           for v in inputs.values()))
        for g, r in zip(got, ref, strict=True):
            if g.shape != tuple(r.shape):
                raise AssertionError(f"{sig.name}: output shape {g.shape} != torch {tuple(r.shape)} at batch {batch}")
            worst = max(worst, max_relative_error(g, r.float().cpu().numpy()))
    return worst
