"""unclip-rt runtime: the `UnCLIP` pipeline, the shared sampler and the denoising loops."""

from runtime.pipeline import UnCLIP, UnCLIPOutput

__all__ = ["UnCLIP", "UnCLIPOutput"]
