"""The default model's domain: one shape on a plain background, with a caption, made in code.

Shapes `circle`, `square`, `triangle` of varying size and position (squares and triangles
rotate), drawn anti-aliased in one of eight named colours on a background of another. Images are
rendered with torch on any device, batched, at any size (the decoder's 64×64 and super-res'
256×256 views of one scene are the same scene). Captions come from templates with synonyms and
optional parts, so the text encoder has to learn language, not a lookup table.

A fixed set of (foreground, shape, background) combinations is held out of all training
(`HELD_OUT`); every quality figure is reported on them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

DATA_VERSION = 1

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (0.16, 0.22), "medium": (0.24, 0.30), "large": (0.32, 0.40)}  # radius / image side
SIZE_NAMES = tuple(SIZES)

# Fixed held-out (foreground, shape, background) combinations: each colour appears held out as a
# foreground twice and a background twice, each shape five or six times.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "circle", "blue"), ("green", "square", "yellow"), ("blue", "triangle", "orange"),
    ("yellow", "circle", "purple"), ("purple", "square", "white"), ("orange", "triangle", "black"),
    ("white", "circle", "red"), ("black", "square", "green"), ("red", "triangle", "white"),
    ("green", "circle", "black"), ("blue", "square", "red"), ("yellow", "triangle", "green"),
    ("purple", "circle", "orange"), ("orange", "square", "blue"), ("white", "triangle", "purple"),
    ("black", "circle", "yellow"),
)

SHAPE_WORDS = {"circle": ("circle", "disc", "round dot"), "square": ("square", "box", "square block"),
               "triangle": ("triangle", "three-sided shape", "triangle")}
TEMPLATES = (
    "a {fg} {shape} on a {bg} background",
    "a {size} {fg} {shape} on a {bg} background",
    "a {fg} {shape}",
    "a {size} {fg} {shape}",
    "{fg} {shape}, {bg} backdrop",
    "a picture of a {fg} {shape} against a {bg} background",
    "the {shape} is {fg} and the background is {bg}",
    "a {size} {fg} {shape} in front of a plain {bg} wall",
)


@dataclass(frozen=True)
class Scene:
    """One image's content."""

    fg: str
    shape: str
    bg: str
    size: str
    cx: float  # centre, in image fractions
    cy: float
    radius: float  # centre-to-corner (or circle radius), image fraction
    angle: float  # radians

    @property
    def combo(self) -> tuple[str, str, str]:
        return (self.fg, self.shape, self.bg)


@dataclass(frozen=True)
class SceneBatch:
    """B scenes as tensors: colour/shape/size indices ([B] long) and layout ([B] float32)."""

    fg: torch.Tensor
    shape: torch.Tensor
    bg: torch.Tensor
    size: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    radius: torch.Tensor
    angle: torch.Tensor

    def __len__(self) -> int:
        return self.fg.shape[0]

    @classmethod
    def from_scenes(cls, scenes: list[Scene], device: str | torch.device = "cpu") -> SceneBatch:
        def longs(values):
            return torch.tensor(values, dtype=torch.long, device=device)

        def floats(values):
            return torch.tensor(values, dtype=torch.float32, device=device)

        return cls(
            fg=longs([COLOURS.index(s.fg) for s in scenes]),
            shape=longs([SHAPES.index(s.shape) for s in scenes]),
            bg=longs([COLOURS.index(s.bg) for s in scenes]),
            size=longs([SIZE_NAMES.index(s.size) for s in scenes]),
            cx=floats([s.cx for s in scenes]),
            cy=floats([s.cy for s in scenes]),
            radius=floats([s.radius for s in scenes]),
            angle=floats([s.angle for s in scenes]),
        )

    def combo_keys(self) -> torch.Tensor:
        """`train.data.combo_index` of each scene, [B] long."""
        return (self.fg * len(SHAPES) + self.shape) * len(COLOURS) + self.bg


def training_combos() -> list[tuple[str, str, str]]:
    """Every (fg, shape, bg) with fg ≠ bg, minus `HELD_OUT`."""
    held = set(HELD_OUT)
    return [(f, s, b) for f in COLOURS for s in SHAPES for b in COLOURS if f != b and (f, s, b) not in held]


def combo_index(combo: tuple[str, str, str]) -> int:
    """A unique integer for a (fg, shape, bg) combination."""
    fg, shape, bg = combo
    return (COLOURS.index(fg) * len(SHAPES) + SHAPES.index(shape)) * len(COLOURS) + COLOURS.index(bg)


def sample_scene(rng: random.Random, combo: tuple[str, str, str]) -> Scene:
    """A random layout for the combination."""
    fg, shape, bg = combo
    size = rng.choice(tuple(SIZES))
    radius = rng.uniform(*SIZES[size])
    margin = radius + 0.02
    angle = rng.uniform(0, 2 * math.pi) if shape != "circle" else 0.0
    return Scene(fg, shape, bg, size, rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin), radius, angle)


def caption(rng: random.Random, scene: Scene) -> str:
    """A caption from a random template and synonyms."""
    template = rng.choice(TEMPLATES)
    shape = rng.choice(SHAPE_WORDS[scene.shape])
    return template.format(fg=scene.fg, bg=scene.bg, shape=shape, size=scene.size)


def canonical_caption(combo: tuple[str, str, str]) -> str:
    """The evaluation prompt of a combination."""
    fg, shape, bg = combo
    return f"a {fg} {shape} on a {bg} background"


def inside_shape(scenes: SceneBatch, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """[B, N] bool: which sample points lie inside each scene's shape (points [N], the same for
    every scene, or [B, N], each scene's own)."""
    cx, cy, r, a = (v[:, None] for v in (scenes.cx, scenes.cy, scenes.radius, scenes.angle))
    xs, ys = (xs, ys) if xs.dim() == 2 else (xs[None], ys[None])
    dx, dy = xs - cx, ys - cy
    u = torch.cos(a) * dx + torch.sin(a) * dy  # rotate into the shape's frame
    v = -torch.sin(a) * dx + torch.cos(a) * dy
    circle = dx**2 + dy**2 <= r**2
    half = r / math.sqrt(2)
    square = (u.abs() <= half) & (v.abs() <= half)
    # Equilateral triangle with centroid at 0 and vertices at distance r: three half-planes.
    tri = torch.ones_like(circle)
    for k in range(3):
        theta = math.pi / 2 + 2 * math.pi * k / 3 + math.pi / 3
        tri &= u * math.cos(theta) + v * math.sin(theta) <= r / 2
    kind = scenes.shape[:, None]
    return torch.where(kind == 0, circle, torch.where(kind == 1, square, tri))


_PALETTE_RGB = torch.tensor([PALETTE[c] for c in COLOURS], dtype=torch.float32)


def render(
    scenes: list[Scene] | SceneBatch, size: int, device: str | torch.device | None = None,
    supersample: int | None = None,
) -> torch.Tensor:
    """Render scenes to [B, 3, size, size] float32 in [−1, 1], anti-aliased by supersampling
    (4×4 samples a pixel up to 64×64, 2×2 above). A `SceneBatch` renders on its own device."""
    if not isinstance(scenes, SceneBatch):
        scenes = SceneBatch.from_scenes(scenes, device or "cpu")
    device = scenes.fg.device
    supersample = supersample or (4 if size <= 64 else 2)
    n = size * supersample
    coords = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    cover = inside_shape(scenes, xs.reshape(-1), ys.reshape(-1)).float().view(len(scenes), 1, n, n)
    return _paint(scenes, cover, supersample)


def _paint(scenes: SceneBatch, cover: torch.Tensor, supersample: int) -> torch.Tensor:
    """[B, 3, H, W] in [−1, 1] from the shapes' coverage of every sample point [B, 1, H·s, W·s]:
    each pixel the foreground and background colours mixed by its share of covered samples."""
    cover = torch.nn.functional.avg_pool2d(cover, supersample)
    palette = _PALETTE_RGB.to(cover.device)
    fg, bg = palette[scenes.fg][:, :, None, None], palette[scenes.bg][:, :, None, None]
    return (cover * fg + (1 - cover) * bg) / 127.5 - 1


def render_windows(scenes: SceneBatch, size: int, top: torch.Tensor, left: torch.Tensor, crop: int,
                   supersample: int = 2) -> torch.Tensor:
    """Window `[top, top + crop) × [left, left + crop)` of each scene rendered at `size`×`size`
    ([B, 3, crop, crop], the pixels `render(scenes, size)` would give there with this supersampling),
    without rendering the rest: the training crops of a large stage at a small cost."""
    device = scenes.fg.device
    n = crop * supersample
    steps = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / supersample  # within the window
    ys = (top.float()[:, None] + steps[None]) / size  # [B, n]
    xs = (left.float()[:, None] + steps[None]) / size
    grid_y = ys[:, :, None].expand(-1, n, n).reshape(len(scenes), -1)
    grid_x = xs[:, None, :].expand(-1, n, n).reshape(len(scenes), -1)
    cover = inside_shape(scenes, grid_x, grid_y).float().view(len(scenes), 1, n, n)
    return _paint(scenes, cover, supersample)


def sample_batch(
    rng: random.Random, batch: int, combos: list[tuple[str, str, str]] | None = None
) -> tuple[list[Scene], list[str]]:
    """`batch` random training scenes (from `combos`, default all training ones) and captions."""
    combos = combos or training_combos()
    scenes = [sample_scene(rng, rng.choice(combos)) for _ in range(batch)]
    return scenes, [caption(rng, s) for s in scenes]
