"""unclip-rt runtime: the `UnCLIP` pipeline, the shared sampler and the denoising loops.

The noise types are exported for replaying a run exactly: `UnCLIP.draw_noise` gives a
`SamplingNoise` (one `StageNoise` per stage; an `ARNoise` for the autoregressive prior) that
`generate(..., noise=...)` takes.
"""

from runtime.pipeline import UnCLIP, UnCLIPOutput
from runtime.sampling.ar_loop import ARNoise
from runtime.sampling.inputs import SamplingNoise, StageNoise

__all__ = ["ARNoise", "SamplingNoise", "StageNoise", "UnCLIP", "UnCLIPOutput"]
