"""Converters from foreign checkpoint formats (Karlo originals, diffusers folders, HF CLIP)."""
