"""Each stage on the faster of two backends, by measurement on this machine: the `measured`
backend (what `auto` resolves to on a CUDA device where ONNX Runtime's CUDA provider and an
engine folder are present).

Every stage is timed on both — the torch modules (the fused fast path) and the folder's graph
under ONNX Runtime — at the batch it sees when one image is made (the guided stages' two rows,
a tiled stage's tiles), with random inputs of its signature. On a GPU, one forward is replayed
from a CUDA graph, as the runtime's loop graphs replay it, so launch overhead counts for
neither; on the CPU, host time. ONNX Runtime's engine is kept only where it is faster by more
than `MARGIN`: the torch path is the reference, and a difference inside the timing's noise is
not worth a second copy of the stage's weights. A stage whose graph cannot be opened, run or
captured stays on torch, and the choice says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from runtime.backends.engine import Engine
from runtime.timing import event_ms, graph_ms, host_ms

MARGIN = 0.05  # ONNX Runtime must be this much faster (relative) to take a stage from torch


@dataclass(frozen=True)
class StageChoice:
    """What ran a stage, and the timings (ms per forward at `batch` rows) it was chosen by."""

    stage: str
    backend: str  # "torch" or "onnxruntime"
    batch: int
    torch_ms: float
    onnxruntime_ms: float | None  # None: the graph could not run (see `note`)
    note: str = ""

    def describe(self) -> str:
        other = f"{self.onnxruntime_ms:.3f} ms" if self.onnxruntime_ms is not None else self.note
        return f"{self.stage}: {self.backend} (torch {self.torch_ms:.3f} ms, onnxruntime {other}, batch {self.batch})"


def pick(torch_ms: float, onnxruntime_ms: float | None, margin: float = MARGIN) -> str:
    """"onnxruntime" when its time is known and below torch's by more than `margin`, else "torch"."""
    if onnxruntime_ms is None:
        return "torch"
    return "onnxruntime" if onnxruntime_ms < torch_ms * (1.0 - margin) else "torch"


def forward_timer(device: torch.device) -> Callable[[Engine, tuple[torch.Tensor, ...]], float]:
    """ms of one forward of an engine on `device`: replayed from a CUDA graph where the engine can
    be captured (as in the loop graphs), else between CUDA events; host time on the CPU."""
    if device.type != "cuda":
        return lambda engine, inputs: host_ms(lambda: engine(*inputs))

    def cuda_ms(engine: Engine, inputs: tuple[torch.Tensor, ...]) -> float:
        engine(*inputs)  # opens a fixed-batch session and sizes its memory before a capture
        torch.cuda.synchronize(device)
        if getattr(engine, "capturable", False):
            return graph_ms(lambda: engine(*inputs))
        return event_ms(lambda: engine(*inputs))

    return cuda_ms


def choose_stages(
    torch_engines: dict[str, Engine], onnxruntime_engines: dict[str, Engine], device: torch.device,
    timer: Callable[[Engine, tuple[torch.Tensor, ...]], float] | None = None, margin: float = MARGIN,
) -> tuple[dict[str, Engine], list[StageChoice]]:
    """Every stage of `torch_engines` on the engine `pick` prefers (ONNX Runtime's only for stages
    it has), and the choices. `timer` (default `forward_timer(device)`) gives ms per forward."""
    timer = timer or forward_timer(device)
    generator = torch.Generator().manual_seed(0)
    chosen: dict[str, Engine] = {}
    choices: list[StageChoice] = []
    for name, torch_engine in torch_engines.items():
        sig = torch_engine.signature
        batch = sig.max_batch(1)
        inputs = tuple(sig.sample_inputs(batch, torch_engine.float_dtype, device, generator).values())
        torch_ms = timer(torch_engine, inputs)
        ort_ms, note = None, "no graph in the folder"
        if name in onnxruntime_engines:
            try:
                ort_ms, note = timer(onnxruntime_engines[name], inputs), ""
            except Exception as exc:  # a graph that cannot run or be captured here leaves the stage on torch
                note = f"cannot run: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
        backend = pick(torch_ms, ort_ms, margin)
        choices.append(StageChoice(name, backend, batch, torch_ms, ort_ms, note))
        chosen[name] = onnxruntime_engines[name] if backend == "onnxruntime" else torch_engine
    return chosen, choices
