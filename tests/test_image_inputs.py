"""Image inputs (#29 item 5): an empty image, a PNG whose header claims 20000×10000 pixels, a 16-bit
PNG and transparency are converted correctly or refused with a `ValueError` naming the input and
the reason; the image tools' CLI prints one line for them."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from runtime.images import load_images


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _bomb(path) -> None:
    header = _png_bytes(Image.new("RGB", (1, 1)))
    path.write_bytes(header[:16] + (20000).to_bytes(4, "big") + (10000).to_bytes(4, "big") + header[24:])


def test_an_empty_pil_image_is_refused():
    with pytest.raises(ValueError, match=r"image: empty image \(0×0\)"):
        load_images(Image.new("RGB", (0, 0)))


def test_a_bomb_sized_header_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "huge.png"
    _bomb(path)
    with pytest.raises(ValueError, match=r"huge.png"):
        load_images(path)


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    (t,) = load_images(path)
    expected = np.rint(ramp / 65535 * 255) / 255
    assert np.allclose(t[0].numpy(), expected, atol=1e-6)
    assert (t == 1).float().mean() < 0.01  # not clipped to white


def test_transparency_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    (t,) = load_images(Image.fromarray(rgba, "RGBA"))
    assert bool((t == 1).all())


def test_the_cli_reports_an_unreadable_image_in_one_line(tmp_path, capsys):
    from runtime.__main__ import main

    path = tmp_path / "huge.png"
    _bomb(path)
    code = main(["variations", str(path), "-o", str(tmp_path / "v.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "huge.png" in err[0] and "Traceback" not in err[0]
