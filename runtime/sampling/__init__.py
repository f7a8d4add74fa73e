"""How the runtime samples: the noise schedules and step tables (`schedules`), the denoising loops
of the prior, the decoder and each super-res stage (`loops`) and of the autoregressive prior
(`ar_loop`), the per-step update (`update`: the fused kernel or its torch reference), CUDA graphs
over whole loops (`graphs`), and what a run consumes — text conditioning and noise (`inputs`)."""
