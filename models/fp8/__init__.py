"""FP8 (e4m3) weights and activations for the networks' large linear maps, opt-in
(`UnCLIP(precision="fp8")`): which layers (`policy`), the number format (`e4m3`), the layers that
replace them (`layers`) and activation scales calibrated once per model (`scales`).
The reference modules are untouched: conversion swaps layers in a model copy."""

from models.fp8.layers import Fp8Conv, Fp8Linear
from models.fp8.policy import DEFAULT_GROUPS, GROUPS, check_groups, convert, fp8_layer_names, fp8_layers, holds_fp8

__all__ = ["DEFAULT_GROUPS", "GROUPS", "Fp8Conv", "Fp8Linear", "check_groups", "convert", "fp8_layer_names",
           "fp8_layers", "holds_fp8"]
