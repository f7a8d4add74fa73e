"""One stage → one ONNX graph, with the stage signature's names and dynamic batch axis.

Uses torch's TorchScript-based exporter (`dynamo=False`): it needs no extra package, handles every
op of these networks at opset 17, and exports in seconds; the dynamo exporter would add
onnxscript and minutes per graph for the same result here. Graphs whose weights pass 2 GB (the
Karlo prior in fp32 is 4 GB) keep their weights in one external-data file beside the graph. The
files appear atomically: export goes to a temporary folder that is renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from models.unclip import UnCLIPModel
from runtime.backends.signatures import StageSignature, stage_module

OPSET = 17
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB for the whole graph


def _weights_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def export_stage(
    model: UnCLIPModel, sig: StageSignature, folder: Path, dtype: torch.dtype = torch.float32, batch: int = 2
) -> Path:
    """Export stage `sig.name` of `model` (cast to `dtype`) to `folder/<name>.onnx` (+ `.onnx.data`
    when large). Returns the graph's path."""
    module = stage_module(model, sig.name)
    device = next(module.parameters()).device
    inputs = sig.sample_inputs(batch, dtype, device, torch.Generator().manual_seed(0),
                               model.cfg.prior.diffusion.num_train_timesteps, model.cfg.clip.vocab_size)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{sig.name}.onnx"
    data_name = f"{sig.name}.onnx.data"
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{sig.name}-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        fastpath = torch.backends.mha.get_fastpath_enabled()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
            # nn.MultiheadAttention's inference fast path is one fused op ONNX has no form for.
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                torch.onnx.export(
                    module, tuple(inputs.values()), str(raw), input_names=sig.input_names,
                    output_names=sig.output_names, dynamic_axes=sig.dynamic_axes(), opset_version=OPSET,
                    do_constant_folding=True, dynamo=False,
                )
            finally:
                torch.backends.mha.set_fastpath_enabled(fastpath)
        graph = onnx.load(str(raw), load_external_data=True)
        external = _weights_bytes(module) > EXTERNAL_DATA_BYTES
        staged = Path(tmp) / final.name
        onnx.save_model(graph, str(staged), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        # Rename into place: the data file first, so a graph never names data that is not there.
        if external:
            os.chmod(Path(tmp) / data_name, 0o644)  # onnx writes it owner-only; readers need it like the graph
            os.replace(Path(tmp) / data_name, folder / data_name)
        elif (folder / data_name).exists():
            (folder / data_name).unlink()
        os.replace(staged, final)
        shutil.rmtree(tmp, ignore_errors=True)
    return final
