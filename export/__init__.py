"""Export of each stage to ONNX, checks against the torch modules, and engine builds
(`python -m export.build_engines`)."""
