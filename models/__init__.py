"""Plain PyTorch modules of unCLIP (CLIP wrapper, prior, decoder, super-res), their named
configurations, checkpoint I/O and converters from Karlo's and diffusers' formats."""
