"""unclip-rt runtime: the `UnCLIP` pipeline, the shared sampler and the denoising loops.

The noise types are exported for replaying a run exactly: `UnCLIP.draw_noise` gives a
`SamplingNoise` (one `StageNoise` per stage; an `ARNoise` for the autoregressive prior) that
`generate(..., noise=...)` takes.
"""

from runtime.ar_sampling import ARNoise
from runtime.loops import SamplingNoise, StageNoise
from runtime.pipeline import UnCLIP, UnCLIPOutput

__all__ = ["ARNoise", "SamplingNoise", "StageNoise", "UnCLIP", "UnCLIPOutput"]
