"""ShapesWorld: procedurally generated scenes of coloured shapes with exact ground truth.

A scene is a pure function of ``(seed, cfg)``; rendering and language are pure functions of the scene.
That split (sample -> :class:`Scene` -> render / describe) is what later extensions hook into: clips move
objects with :meth:`Scene.at` (every object carries a ``velocity``), audio cues can read the same scene.

Coordinates are fractions of the image side: ``x`` grows to the right, ``y`` grows *downwards* (image
convention), so "above" means a smaller ``y``. An object's ``diameter`` is the diameter of the circle
that encloses its outline; every outline fits inside that circle, which is what the non-overlap and
margin guarantees are checked against.

Splits draw seeds from disjoint ranges (:data:`SPLIT_SEED_RANGES`)::

    train: [0, 10**7)    val: [10**7, 2 * 10**7)    test: [2 * 10**7, 3 * 10**7)

so a held-out scene is never a training scene.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import random
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from mmkit.config import StrictConfig

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond")
"""Every shape the renderer knows; ``ShapesWorldConfig.shapes`` picks from these."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 95, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 70, 210),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "cyan": (40, 215, 225),
    "pink": (250, 140, 200),
}
"""Named colours with fixed RGB; ``ShapesWorldConfig.colours`` picks from these."""

TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted")

DEFAULT_BACKGROUND: tuple[int, int, int] = (60, 60, 60)

SPLIT_SEED_RANGES: dict[str, tuple[int, int]] = {
    "train": (0, 10**7),
    "val": (10**7, 2 * 10**7),
    "test": (2 * 10**7, 3 * 10**7),
}
"""Half-open seed range per split; ``ShapesWorld(split=s)[i]`` uses seed ``SPLIT_SEED_RANGES[s][0] + i``."""

_SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliasing with exact coverage for the masks
_MASK_THRESHOLD = 128  # a pixel belongs to an object when at least half of its area is covered
_TEXTURE_SHADE = 0.5  # stripes / dots are the object's colour at half brightness


@dataclass
class ShapesWorldConfig(StrictConfig):
    """What ShapesWorld scenes may contain, how they are laid out and rendered.

    ``image_size``: pixels per side of dataset images. ``min_objects``..``max_objects`` objects per
    scene (uniform), each with a shape from ``shapes`` and a colour from ``colours`` (see
    :data:`SHAPES`, :data:`COLOURS`). ``background``: RGB of the backdrop.
    Sizes are named (``sizes``) with the enclosing-circle diameter of each as a fraction of the image
    side (``size_fractions``, same order, increasing). ``margin`` is the smallest distance from any object
    to the border and ``min_gap`` the smallest distance between two objects, both as image fractions.
    ``placement_tries`` bounds the rejection sampling of one object's position and
    ``placement_restarts`` the number of fresh layouts tried before giving up.
    ``texture_probability``: chance that an object is striped or dotted instead of plain.
    ``max_speed``: velocities are uniform in [-max_speed, max_speed] per axis (image fractions per unit
    of time); 0 gives static scenes. ``background_noise``: std of grey noise (0-255 units) on the
    background only.
    """

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 3
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white")
    sizes: tuple[str, ...] = ("small", "large")
    size_fractions: tuple[float, ...] = (0.2, 0.32)
    margin: float = 0.06
    min_gap: float = 0.04
    placement_tries: int = 100
    placement_restarts: int = 50
    texture_probability: float = 0.0
    max_speed: float = 0.0
    background: tuple[int, int, int] = DEFAULT_BACKGROUND
    background_noise: float = 0.0

    def __post_init__(self) -> None:
        # Accept lists (e.g. from YAML) but store tuples, so configs stay hashable and comparable.
        for name in ("shapes", "colours", "sizes", "size_fractions", "background"):
            setattr(self, name, tuple(getattr(self, name)))
        _check_names("shapes", self.shapes, SHAPES)
        _check_names("colours", self.colours, tuple(COLOURS))
        if not self.sizes or len(self.sizes) != len(self.size_fractions):
            raise ValueError(
                f"ShapesWorldConfig: sizes {self.sizes} and size_fractions {self.size_fractions} must be "
                "non-empty and of equal length (one diameter fraction per size name)"
            )
        if not all(isinstance(name, str) and name.isalpha() and name.islower() for name in self.sizes):
            raise ValueError(
                f"ShapesWorldConfig: size names must be single lower-case words, got {self.sizes}"
            )
        increasing = list(self.size_fractions) == sorted(self.size_fractions)
        if not increasing or len(set(self.sizes)) != len(self.sizes):
            raise ValueError(
                f"ShapesWorldConfig: size_fractions must increase and size names be distinct, got "
                f"sizes={self.sizes}, size_fractions={self.size_fractions}"
            )
        largest = max(self.size_fractions)
        if min(self.size_fractions) <= 0 or largest + 2 * self.margin >= 1:
            raise ValueError(
                f"ShapesWorldConfig: size_fractions {self.size_fractions} with margin {self.margin} do not "
                "fit in the image; need 0 < fraction and max fraction + 2 * margin < 1"
            )
        if not 1 <= self.min_objects <= self.max_objects <= 10:
            raise ValueError(
                f"ShapesWorldConfig: need 1 <= min_objects <= max_objects <= 10, got "
                f"min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        if not 0.0 <= self.texture_probability <= 1.0:
            raise ValueError(
                f"ShapesWorldConfig: texture_probability must be in [0, 1], got {self.texture_probability}"
            )
        if self.image_size < 1 or self.placement_tries < 1 or self.placement_restarts < 1:
            raise ValueError(
                "ShapesWorldConfig: image_size, placement_tries and placement_restarts must be >= 1, got "
                f"{self.image_size}, {self.placement_tries}, {self.placement_restarts}"
            )
        if len(self.background) != 3 or not all(0 <= int(c) <= 255 for c in self.background):
            raise ValueError(
                f"ShapesWorldConfig: background must be an RGB triple in 0..255, got {self.background}"
            )
        if self.max_speed < 0 or self.background_noise < 0 or self.margin < 0 or self.min_gap < 0:
            raise ValueError(
                "ShapesWorldConfig: max_speed, background_noise, margin and min_gap must be >= 0"
            )


def _check_names(field: str, given: tuple[str, ...], accepted: tuple[str, ...]) -> None:
    unknown = [name for name in given if name not in accepted]
    if unknown or not given or len(set(given)) != len(given):
        raise ValueError(
            f"ShapesWorldConfig.{field}: got {list(given)}; need a non-empty list of distinct names from "
            f"{list(accepted)}" + (f" (unknown: {unknown})" if unknown else "")
        )


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene. ``x, y``: centre at time 0 (image fractions, y down);
    ``diameter``: enclosing-circle diameter (image fraction) of the named ``size``;
    ``velocity``: (vx, vy) in image fractions per unit time."""

    shape: str
    colour: str
    size: str
    diameter: float
    x: float
    y: float
    texture: str = "plain"
    velocity: tuple[float, float] = (0.0, 0.0)

    @property
    def radius(self) -> float:
        return self.diameter / 2

    def position_at(self, t: float) -> tuple[float, float]:
        """Centre at time ``t``: linear motion ``(x, y) + velocity * t``."""
        return (self.x + self.velocity[0] * t, self.y + self.velocity[1] * t)

    def at(self, t: float) -> SceneObject:
        """This object moved to its position at time ``t`` (velocity kept)."""
        x, y = self.position_at(t)
        return dataclasses.replace(self, x=x, y=y)


@dataclass(frozen=True)
class Scene:
    """A ShapesWorld scene: objects (in sampling order), background colour and noise, and the seed
    it was sampled from (``None`` for hand-built scenes; language uses it to pick negatives)."""

    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int] = DEFAULT_BACKGROUND
    background_noise: float = 0.0
    seed: int | None = None

    def __len__(self) -> int:
        return len(self.objects)

    def positions_at(self, t: float) -> list[tuple[float, float]]:
        """Object centres at time ``t``, in object order."""
        return [obj.position_at(t) for obj in self.objects]

    def at(self, t: float) -> Scene:
        """The scene at time ``t``: every object moved by ``velocity * t``. Overlaps or leaving the frame
        are not prevented here; a clip generator chooses ``max_speed`` and durations that keep them rare."""
        if t == 0:
            return self
        return dataclasses.replace(self, objects=tuple(obj.at(t) for obj in self.objects))


# --------------------------------------------------------------------------------------------------
# Sampling


def sample_scene(seed: int, cfg: ShapesWorldConfig | None = None) -> Scene:
    """Sample the scene for ``seed``: a pure function of ``(seed, cfg)``, never touching global RNG.

    Layout (number of objects, attributes, positions) comes from ``random.Random(seed)``; textures and
    velocities come from separate streams derived from the seed, so switching textures or motion on does
    not change where objects are or what they look like otherwise. Positions are rejection-sampled:
    objects keep ``cfg.margin`` from the border and ``cfg.min_gap`` from each other.
    """
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"sample_scene: seed must be a non-negative int, got {type(seed).__name__} {seed!r}")
    seed = int(seed)
    cfg = cfg if cfg is not None else ShapesWorldConfig()
    rng = random.Random(seed)
    count = rng.randint(cfg.min_objects, cfg.max_objects)
    attributes = []
    for _ in range(count):
        shape = rng.choice(cfg.shapes)
        colour = rng.choice(cfg.colours)
        size_index = rng.randrange(len(cfg.sizes))
        attributes.append((shape, colour, size_index))
    diameters = [cfg.size_fractions[s] for _, _, s in attributes]
    centres = _place(rng, diameters, cfg, seed)

    texture_rng = random.Random(f"{seed}/texture")
    velocity_rng = random.Random(f"{seed}/velocity")
    objects = []
    for (shape, colour, size_index), (x, y) in zip(attributes, centres):
        texture = "plain"
        if cfg.texture_probability > 0 and texture_rng.random() < cfg.texture_probability:
            texture = texture_rng.choice(TEXTURES[1:])
        velocity = (0.0, 0.0)
        if cfg.max_speed > 0:
            velocity = (
                velocity_rng.uniform(-cfg.max_speed, cfg.max_speed),
                velocity_rng.uniform(-cfg.max_speed, cfg.max_speed),
            )
        objects.append(
            SceneObject(
                shape=shape,
                colour=colour,
                size=cfg.sizes[size_index],
                diameter=cfg.size_fractions[size_index],
                x=x,
                y=y,
                texture=texture,
                velocity=velocity,
            )
        )
    return Scene(
        objects=tuple(objects),
        background=tuple(int(c) for c in cfg.background),
        background_noise=float(cfg.background_noise),
        seed=seed,
    )


def _corner_layout(diameters: list[float], order: list[int], cfg: ShapesWorldConfig) -> list[tuple[float, float]] | None:
    """Objects pushed into the corners (largest first: two opposite corners, then the other two), or None when
    that does not keep the gaps either. Used only after every random layout failed, so scenes that place
    randomly are unchanged."""
    if len(diameters) > 4:
        return None
    corners = ((0, 0), (1, 1), (0, 1), (1, 0))
    centres: dict[int, tuple[float, float]] = {}
    for i, (cx, cy) in zip(order, corners):
        r = diameters[i] / 2
        lo, hi = cfg.margin + r, 1 - cfg.margin - r
        centres[i] = (hi if cx else lo, hi if cy else lo)
    for a, b in itertools.combinations(centres, 2):
        if math.dist(centres[a], centres[b]) < diameters[a] / 2 + diameters[b] / 2 + cfg.min_gap:
            return None
    return [centres[i] for i in range(len(diameters))]


def _place(
    rng: random.Random, diameters: list[float], cfg: ShapesWorldConfig, seed: int
) -> list[tuple[float, float]]:
    # Largest first: big objects are the hard ones to fit, small ones slot into the gaps left.
    order = sorted(range(len(diameters)), key=lambda i: -diameters[i])
    for _ in range(cfg.placement_restarts):
        centres: dict[int, tuple[float, float]] = {}
        for i in order:
            r = diameters[i] / 2
            lo, hi = cfg.margin + r, 1 - cfg.margin - r
            for _ in range(cfg.placement_tries):
                x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
                if all(
                    math.hypot(x - cx, y - cy) >= r + diameters[j] / 2 + cfg.min_gap
                    for j, (cx, cy) in centres.items()
                ):
                    centres[i] = (x, y)
                    break
            else:
                break  # this layout is stuck; start a fresh one
        if len(centres) == len(diameters):
            return [centres[i] for i in range(len(diameters))]
    corners = _corner_layout(diameters, order, cfg)  # random layouts of large objects can all miss a narrow fit
    if corners is not None:
        return corners
    raise RuntimeError(
        f"sample_scene(seed={seed}): could not place {len(diameters)} objects with diameters {diameters} "
        f"(margin={cfg.margin}, min_gap={cfg.min_gap}) in {cfg.placement_restarts} layouts of "
        f"{cfg.placement_tries} tries each; lower max_objects or size_fractions, or raise placement_restarts"
    )


# --------------------------------------------------------------------------------------------------
# Rendering


def _regular(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
    return [
        (radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _star(points: int, outer: float, inner: float) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        rad = outer if k % 2 == 0 else inner
        angle = -math.pi / 2 + math.pi * k / points  # first tip points up
        out.append((rad * math.cos(angle), rad * math.sin(angle)))
    return out


_ARM, _REACH = 0.3, 0.92  # cross: half-width of an arm and half-length; corner (0.3, 0.92) stays inside 1
_UNIT_OUTLINES: dict[str, list[tuple[float, float]]] = {
    # Vertices in units of the enclosing radius (all within the unit circle), y down.
    "circle": _regular(96, 1.0, 0.0),
    "square": [(-0.7, -0.7), (0.7, -0.7), (0.7, 0.7), (-0.7, 0.7)],
    "triangle": _regular(3, 1.0, -math.pi / 2),  # pointing up
    "star": _star(5, 1.0, 0.45),
    "hexagon": _regular(6, 1.0, 0.0),
    "cross": [
        (-_ARM, -_REACH),
        (_ARM, -_REACH),
        (_ARM, -_ARM),
        (_REACH, -_ARM),
        (_REACH, _ARM),
        (_ARM, _ARM),
        (_ARM, _REACH),
        (-_ARM, _REACH),
        (-_ARM, _ARM),
        (-_REACH, _ARM),
        (-_REACH, -_ARM),
        (-_ARM, -_ARM),
    ],
    "diamond": [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)],
}
assert set(_UNIT_OUTLINES) == set(SHAPES)


def _check_size(size: Any, fn: str) -> int:
    if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size < 1:
        raise ValueError(f"{fn}: size must be a positive int (pixels per side), got {size!r}")
    return int(size)


class _Layer(NamedTuple):
    """An object's coverage at the supersampled resolution, cropped to its bounding box.
    ``left``/``top`` are multiples of the supersampling factor so the crop reduces onto whole pixels."""

    left: int
    top: int
    coverage: Image.Image  # 'L', 255 inside the outline


def _hires_layers(scene: Scene, size: int) -> list[_Layer | None]:
    """Per object: its supersampled coverage crop, or None when the object lies entirely off-image."""
    side = size * _SUPERSAMPLE
    layers: list[_Layer | None] = []
    for obj in scene.objects:
        if obj.shape not in _UNIT_OUTLINES:
            raise ValueError(f"render: unknown shape {obj.shape!r}; accepted: {list(SHAPES)}")
        r = obj.radius * side
        cx, cy = obj.x * side, obj.y * side
        # Crop box around the enclosing circle, snapped outwards to whole output pixels, clipped to the image.
        left = max(0, math.floor((cx - r) / _SUPERSAMPLE) * _SUPERSAMPLE)
        top = max(0, math.floor((cy - r) / _SUPERSAMPLE) * _SUPERSAMPLE)
        right = min(side, math.ceil((cx + r) / _SUPERSAMPLE) * _SUPERSAMPLE)
        bottom = min(side, math.ceil((cy + r) / _SUPERSAMPLE) * _SUPERSAMPLE)
        if right <= left or bottom <= top:
            layers.append(None)
            continue
        # PIL puts pixel centres on integer coordinates, so continuous u maps to u - 0.5.
        outline = [
            (cx + r * ux - 0.5 - left, cy + r * uy - 0.5 - top) for ux, uy in _UNIT_OUTLINES[obj.shape]
        ]
        coverage = Image.new("L", (right - left, bottom - top), 0)
        ImageDraw.Draw(coverage).polygon(outline, fill=255)
        layers.append(_Layer(left, top, coverage))
    return layers


def _texture_layer(obj: SceneObject, side: int, layer: _Layer) -> Image.Image:
    """Stripes or dots (255) over the object's crop at the supersampled resolution."""
    pattern = Image.new("L", layer.coverage.size, 0)
    draw = ImageDraw.Draw(pattern)
    r = obj.radius * side
    cx, cy = obj.x * side - layer.left, obj.y * side - layer.top
    period = max(2.0 * _SUPERSAMPLE, r / 2)  # about four stripes / dots across an object
    x0, y0, x1, y1 = cx - r, cy - r, cx + r, cy + r
    if obj.texture == "striped":
        width = max(1, round(period / 2))
        k = x0 - (y1 - y0)
        while k <= x1:  # diagonal lines from the bottom-left to the top-right of the box
            draw.line([(k, y1), (k + (y1 - y0), y0)], fill=255, width=width)
            k += period
    elif obj.texture == "dotted":
        dot = period / 4
        y = y0 + period / 2
        while y <= y1:
            x = x0 + period / 2
            while x <= x1:
                draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=255)
                x += period
            y += period
    elif obj.texture != "plain":
        raise ValueError(f"render: unknown texture {obj.texture!r}; accepted: {list(TEXTURES)}")
    return pattern


def render_scene(scene: Scene, size: int, t: float = 0.0) -> Image.Image:
    """Render ``scene`` at time ``t`` as an anti-aliased RGB image of ``size`` x ``size`` pixels.

    Objects are drawn at 4x resolution and box-filtered down, so edges are smooth and each pixel's colour
    is the exact area-weighted mix of object and background (consistent with :func:`render_masks`).
    """
    size = _check_size(size, "render_scene")
    scene = scene.at(t)
    side = size * _SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), tuple(scene.background))
    layers = _hires_layers(scene, size)
    for obj, layer in zip(scene.objects, layers):
        rgb = COLOURS.get(obj.colour)
        if rgb is None:
            raise ValueError(f"render_scene: unknown colour {obj.colour!r}; accepted: {list(COLOURS)}")
        if layer is None:
            continue
        box = (layer.left, layer.top, layer.left + layer.coverage.width, layer.top + layer.coverage.height)
        canvas.paste(rgb, box, layer.coverage)
        if obj.texture != "plain":
            shade = tuple(round(c * _TEXTURE_SHADE) for c in rgb)
            canvas.paste(shade, box, ImageChops.multiply(layer.coverage, _texture_layer(obj, side, layer)))
    image = canvas.reduce(_SUPERSAMPLE)
    if scene.background_noise > 0:
        image = _add_background_noise(image, scene, _coverage(layers, size).sum(axis=0) / 255.0)
    return image


def _coverage(layers: list[_Layer | None], size: int) -> np.ndarray:
    """Coverage of each output pixel by each object: uint8 (N, size, size), 255 = fully covered."""
    out = np.zeros((len(layers), size, size), dtype=np.uint8)  # (N, H, W)
    for k, layer in enumerate(layers):
        if layer is None:
            continue
        small = np.asarray(layer.coverage.reduce(_SUPERSAMPLE))  # (h, w)
        top, left = layer.top // _SUPERSAMPLE, layer.left // _SUPERSAMPLE
        out[k, top : top + small.shape[0], left : left + small.shape[1]] = small
    return out


def _add_background_noise(image: Image.Image, scene: Scene, covered: np.ndarray) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32)  # (H, W, 3)
    noise = np.random.default_rng([abs(scene.seed or 0), 1]).normal(
        0.0, scene.background_noise, pixels.shape[:2]
    )
    pixels += (noise * (1.0 - np.clip(covered, 0.0, 1.0)))[..., None]  # grey noise, background only
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def render_masks(scene: Scene, size: int, t: float = 0.0) -> np.ndarray:
    """Per-object masks of ``scene`` at time ``t``: bool array (num_objects, size, size).

    A pixel belongs to an object when at least half of its area is covered by the object's outline
    (computed from the same 4x drawing :func:`render_scene` uses). Masks of a sampled scene are disjoint.
    """
    size = _check_size(size, "render_masks")
    return _coverage(_hires_layers(scene.at(t), size), size) >= _MASK_THRESHOLD


def t2i_world() -> ShapesWorldConfig:
    """The ShapesWorld configuration of the text-to-image recipe (``mmkit.diffusion.t2i_data``): 32 px, one or
    two objects of four shapes, six colours and two sizes."""
    return ShapesWorldConfig(
        image_size=32,
        min_objects=1,
        max_objects=2,
        shapes=("circle", "square", "triangle", "star"),
        colours=("red", "green", "blue", "yellow", "purple", "white"),
        sizes=("small", "large"),
        size_fractions=(0.34, 0.46),
        margin=0.04,
        min_gap=0.06,
    )
