"""`benchmarks/conv_shapes.py`: one UNet forward's convolutions by shape on the meta device."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.conv_shapes import conv_shapes
from models.configs import get_config
from models.unet import UNet


def test_every_convolution_of_the_forward_is_counted_once_with_its_shape_and_size():
    rows = conv_shapes("default", "decoder", 2)
    cfg = get_config("default").decoder
    with torch.device("meta"):
        convs = [m for m in UNet(cfg).modules() if isinstance(m, nn.Conv2d)]
    assert sum(r["count"] for r in rows) == len(convs)  # each module runs once a forward
    first = next(r for r in rows if r["x"][1] == cfg.in_channels)  # the input convolution, full size
    assert first["rows"] == 2 * cfg.image_size**2 and first["weight"][1] == cfg.in_channels
    for r in rows:
        elements = r["weight"][0] * r["weight"][1] * r["weight"][2] * r["weight"][3]
        assert r["weight_mb"] == pytest.approx(elements * 2 / 1e6)
        assert r["gflop"] == pytest.approx(2 * r["rows"] * elements / 1e9)
