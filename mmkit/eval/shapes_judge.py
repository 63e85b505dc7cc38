"""A deterministic ShapesWorld judge: reads colour, shape and position of every object in an image.

Used to score text-to-image models on ShapesWorld prompts (is the red star there, left of the square?)
and checked against exact ground truth on rendered scenes. No training, no weights:

1. **Coverage per palette colour.** Against the known background ``b``, a pixel ``p`` that an object of
   colour ``o`` covers by a fraction ``a`` is ``b + a (o - b)`` (that is how the renderer anti-aliases).
   For every palette colour the judge projects ``p - b`` on ``o - b`` (-> coverage ``a``) and keeps the
   residual; a pixel belongs to the palette colour with the smallest residual, and is foreground when
   that coverage is at least ``min_coverage`` (0.5, the rule of ``render_masks``).
2. **Objects** are 8-connected foreground components; a component holding a second colour over at least
   ``split_fraction`` of its pixels is split by colour (two touching objects); components covering less
   than ``min_area`` of the image are noise and dropped. An object's colour is the palette colour with
   the largest summed coverage.
3. **Position and area** are the coverage-weighted centroid and summed coverage of the object's soft
   mask (its colour's coverage in a window around it, other objects blanked). Every ShapesWorld outline
   is a regular figure, so its centroid is the centre of its enclosing circle: renders give the exact
   centre up to anti-aliasing.
4. **Shape** by template fit: for each candidate shape, the radius whose area matches, rendered with
   ShapesWorld's own renderer at the measured centre; the shape whose template differs least from the
   soft mask (sum of absolute differences / area, reported as ``fit``) wins.

Generated images are judged the same way; their blobs are blurrier and their colours off-palette, which
the projection and the template fit tolerate (see the README of ``recipes/generate`` for measured
accuracy on held-out renders).
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import permutations
from typing import Any

import numpy as np

from ..config import StrictConfig
from ..data.shapes import (
    COLOURS,
    DEFAULT_BACKGROUND,
    SHAPES,
    Scene,
    SceneObject,
    ShapesWorldConfig,
    render_scene,
    t2i_world,
)
from ..data.shapes_language import RELATION_PHRASES, caption_phrases, relation


@dataclass
class JudgeConfig(StrictConfig):
    """What the judge looks for; defaults are the text-to-image world (``mmkit.data.shapes.t2i_world``).

    colours / shapes: candidates (names from ShapesWorld's COLOURS / SHAPES); background: RGB backdrop;
    min_coverage: coverage a pixel needs to be foreground; min_area: smallest object, as a fraction of
    the image (0.012 = 12 px at 32 x 32, a third of the smallest rendered object);
    split_fraction: share of a component a second colour needs before the component is split.
    sizes: size words allowed in captions (for parsing prompts).
    """

    colours: tuple[str, ...] = field(default_factory=lambda: t2i_world().colours)
    shapes: tuple[str, ...] = field(default_factory=lambda: t2i_world().shapes)
    sizes: tuple[str, ...] = field(default_factory=lambda: t2i_world().sizes)
    background: tuple[int, int, int] = DEFAULT_BACKGROUND
    min_coverage: float = 0.5
    min_area: float = 0.012
    split_fraction: float = 0.25

    def __post_init__(self) -> None:
        for name in ("colours", "shapes", "sizes", "background"):
            setattr(self, name, tuple(getattr(self, name)))
        bad = [c for c in self.colours if c not in COLOURS]
        if bad or not self.colours:
            raise ValueError(f"JudgeConfig.colours: unknown {bad} in {list(self.colours)}; accepted: {list(COLOURS)}")
        bad = [s for s in self.shapes if s not in SHAPES]
        if bad or not self.shapes:
            raise ValueError(f"JudgeConfig.shapes: unknown {bad} in {list(self.shapes)}; accepted: {list(SHAPES)}")
        if not 0 < self.min_coverage < 1 or not 0 <= self.min_area < 1 or not 0 < self.split_fraction <= 0.5:
            raise ValueError(
                "JudgeConfig: need 0 < min_coverage < 1, 0 <= min_area < 1 and 0 < split_fraction <= 0.5, got "
                f"{self.min_coverage}, {self.min_area}, {self.split_fraction}"
            )

    @classmethod
    def for_world(cls, world: ShapesWorldConfig, **changes: Any) -> JudgeConfig:
        """The judge for scenes of ``world``: its colours, shapes, size words and background."""
        fields = {"colours": world.colours, "shapes": world.shapes, "sizes": world.sizes,
                  "background": tuple(world.background)}
        return cls(**{**fields, **changes})


@dataclass(frozen=True)
class DetectedObject:
    """An object the judge found. x, y: centre as fractions of the image side (y down, as in
    ShapesWorld); area: summed coverage as a fraction of the image; fit: template mismatch of the chosen
    shape (0 = perfect, around 0.1 for clean renders); pixels: foreground pixels."""

    colour: str
    shape: str
    x: float
    y: float
    area: float
    fit: float = 0.0
    pixels: int = 0


def _config(config: JudgeConfig | ShapesWorldConfig | None) -> JudgeConfig:
    if config is None:
        return _default_config()
    if isinstance(config, ShapesWorldConfig):
        return JudgeConfig.for_world(config)
    if not isinstance(config, JudgeConfig):
        raise TypeError(f"config must be a JudgeConfig, a ShapesWorldConfig or None, got {type(config).__name__}")
    return config


@functools.lru_cache(maxsize=1)
def _default_config() -> JudgeConfig:
    return JudgeConfig()


def as_rgb_array(image: Any) -> np.ndarray:
    """PIL image, uint8 / float array (H, W, 3) or torch tensor (3, H, W) in [0, 1] -> float (H, W, 3) in 0..255."""
    if hasattr(image, "detach"):  # torch tensor: channels first, [0, 1]
        image = image.detach().cpu().float().numpy()
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"judge: a tensor image must be (3, H, W) in [0, 1], got {tuple(image.shape)}")
        return np.clip(image.transpose(1, 2, 0), 0, 1) * 255.0
    if hasattr(image, "convert"):  # PIL
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"judge: expected an RGB image (H, W, 3), got an array of shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32)
    array = array.astype(np.float32)
    return array * 255.0 if array.max() <= 1.0 else array


# ---------------------------------------------------------------------- the judge
def judge(image: Any, config: JudgeConfig | ShapesWorldConfig | None = None) -> list[DetectedObject]:
    """Objects in ``image`` (PIL, (H, W, 3) array, or (3, H, W) tensor in [0, 1]), left to right.

    ``config``: a :class:`JudgeConfig`, a ShapesWorldConfig (judge for that world), or None for the
    text-to-image world. A blank background gives ``[]``.
    """
    cfg = _config(config)
    rgb = as_rgb_array(image)
    H, W = rgb.shape[:2]
    if H != W:
        raise ValueError(f"judge: ShapesWorld images are square, got {W}x{H}")
    background = np.asarray(cfg.background, dtype=np.float32)
    directions = np.asarray([COLOURS[c] for c in cfg.colours], dtype=np.float32) - background  # (K, 3)
    diff = rgb - background  # (H, W, 3)
    coverage = np.einsum("hwc,kc->hwk", diff, directions) / (directions**2).sum(1)  # (H, W, K)
    coverage = np.clip(coverage, 0.0, None)
    residual = np.linalg.norm(diff[:, :, None, :] - coverage[..., None] * directions, axis=-1)  # (H, W, K)
    label = residual.argmin(-1)  # (H, W)
    own = np.take_along_axis(coverage, label[..., None], -1)[..., 0]  # (H, W) coverage of the chosen colour
    foreground = own >= cfg.min_coverage

    min_pixels = cfg.min_area * H * W
    groups: list[np.ndarray] = []  # (n, 2) pixel coordinates of each object
    for comp in _components(foreground):
        labels = label[comp[:, 0], comp[:, 1]]
        counts = Counter(labels.tolist())
        second = counts.most_common(2)[1:]
        if second and second[0][1] >= max(cfg.split_fraction * len(comp), min_pixels):
            sub = np.zeros_like(foreground)
            for k, _ in counts.most_common():
                sub[:] = False
                mask = labels == k
                sub[comp[mask, 0], comp[mask, 1]] = True
                groups.extend(_components(sub))
        else:
            groups.append(comp)

    owner = np.full((H, W), -1, dtype=np.int64)
    for i, g in enumerate(groups):
        owner[g[:, 0], g[:, 1]] = i
    found = []
    ys, xs = np.mgrid[0:H, 0:W]
    for i, g in enumerate(groups):
        weights = Counter()
        for (r, c) in g:
            weights[int(label[r, c])] += float(own[r, c])
        k = max(weights, key=weights.get)
        soft = _soft_mask(coverage[..., k], owner, i, g, pad=2)  # (H, W)
        area = float(soft.sum())
        if area < min_pixels:
            continue
        cx = float((soft * (xs + 0.5)).sum() / area)
        cy = float((soft * (ys + 0.5)).sum() / area)
        shape, fit = _best_shape(soft, cx / W, cy / H, area, H, cfg.shapes)
        found.append(
            DetectedObject(colour=cfg.colours[k], shape=shape, x=cx / W, y=cy / H, area=area / (H * W),
                           fit=fit, pixels=len(g))
        )
    return sorted(found, key=lambda d: (d.x, d.y))


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a bool (H, W) mask, each as an (n, 2) array of (row, col)."""
    H, W = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        queue, pixels = deque([(r0, c0)]), []
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < H and 0 <= cc < W and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        queue.append((rr, cc))
        out.append(np.asarray(pixels, dtype=np.int64))
    return out


def _soft_mask(cov: np.ndarray, owner: np.ndarray, index: int, pixels: np.ndarray, pad: int) -> np.ndarray:
    """The object's coverage (H, W) in [0, 1]: its colour's coverage in its bounding box grown by
    ``pad`` px, with pixels owned by other objects blanked."""
    H, W = cov.shape
    r0, c0 = pixels.min(0)
    r1, c1 = pixels.max(0)
    out = np.zeros_like(cov)
    window = (slice(max(0, r0 - pad), min(H, r1 + pad + 1)), slice(max(0, c0 - pad), min(W, c1 + pad + 1)))
    out[window] = np.clip(cov[window], 0.0, 1.0)
    out[(owner != -1) & (owner != index)] = 0.0
    return out


@functools.cache
def _unit_area(shape: str) -> float:
    """Area of ``shape`` in units of its enclosing radius squared (pi for the circle), measured on a render."""
    size, diameter = 256, 0.8
    cov = _template(shape, 0.5, 0.5, diameter, size)
    return float(cov.sum()) / (diameter * size / 2) ** 2


def _template(shape: str, x: float, y: float, diameter: float, size: int) -> np.ndarray:
    """Coverage (size, size) in [0, 1] of one ``shape`` centred at (x, y), rendered by ShapesWorld."""
    obj = SceneObject(shape=shape, colour="white", size="template", diameter=diameter, x=x, y=y)
    image = render_scene(Scene(objects=(obj,), background=(0, 0, 0)), size)
    return np.asarray(image, dtype=np.float32)[..., 0] / COLOURS["white"][0]


def _best_shape(
    soft: np.ndarray, x: float, y: float, area: float, size: int, shapes: Sequence[str]
) -> tuple[str, float]:
    best, best_err = shapes[0], math.inf
    for shape in shapes:
        radius = math.sqrt(area / _unit_area(shape))  # px
        template = _template(shape, x, y, 2 * radius / size, size)
        err = float(np.abs(soft - template).sum()) / area
        if err < best_err:
            best, best_err = shape, err
    return best, best_err


# ---------------------------------------------------------------------- prompt following
@dataclass(frozen=True)
class Expected:
    """What a prompt asks for: objects as (colour, shape) in prompt order, and for two objects the
    relation of the first to the second ('left', 'right', 'above', 'below') or None."""

    objects: tuple[tuple[str, str], ...]
    relation: str | None = None


_RELATION_RE = re.compile("|".join(re.escape(p) for p in sorted(RELATION_PHRASES.values(), key=len, reverse=True)))
_PHRASE_TO_RELATION = {phrase: rel for rel, phrase in RELATION_PHRASES.items()}


def expected_from(scene_or_caption: Scene | str, config: JudgeConfig | ShapesWorldConfig | None = None) -> Expected:
    """Parse a caption ("a small red circle to the left of a large blue star") or read a Scene."""
    if isinstance(scene_or_caption, Scene):
        objs = scene_or_caption.objects
        rel = relation(objs[0], objs[1]) if len(objs) == 2 else None
        return Expected(tuple((o.colour, o.shape) for o in objs), rel)
    if not isinstance(scene_or_caption, str):
        raise TypeError(f"expected a Scene or a caption string, got {type(scene_or_caption).__name__}")
    cfg = _config(config)
    phrases = caption_phrases(scene_or_caption, set(cfg.sizes))
    if not phrases:
        raise ValueError(
            f"found no '<colour> <shape>' phrase in {scene_or_caption!r}; the judge reads ShapesWorld captions "
            f"such as 'a small red circle' (colours {list(cfg.colours)}, shapes {list(cfg.shapes)})"
        )
    rel = None
    if len(phrases) == 2:
        match = _RELATION_RE.search(scene_or_caption.lower())
        rel = _PHRASE_TO_RELATION[match.group(0)] if match else None
    return Expected(tuple(phrases), rel)


def prompt_following(
    image: Any, scene_or_caption: Scene | str, config: JudgeConfig | ShapesWorldConfig | None = None,
    *, detections: list[DetectedObject] | None = None,
) -> dict:
    """Does ``image`` show what the prompt (a caption or its Scene) asks for?

    Returns a dict: ``objects`` / ``colour`` / ``shape`` - fraction of the prompt's objects found with the
    right colour and shape / the right colour / the right shape (each detection used once); ``count`` -
    as many objects as asked; ``relation`` - for two objects, both found and in the asked relation
    (dominant axis, as captions use), else None; ``all`` - everything right; ``expected`` / ``detected`` -
    object counts. ``detections``: reuse a previous ``judge(image)`` result.
    """
    want = expected_from(scene_or_caption, config)
    dets = judge(image, config) if detections is None else detections
    n = len(want.objects)
    pairs = _multiset_hits(want.objects, [(d.colour, d.shape) for d in dets])
    colours = _multiset_hits([c for c, _ in want.objects], [d.colour for d in dets])
    shapes = _multiset_hits([s for _, s in want.objects], [d.shape for d in dets])
    rel_ok: bool | None = None
    if want.relation is not None and n == 2:
        a_cands = [i for i, d in enumerate(dets) if (d.colour, d.shape) == want.objects[0]]
        b_cands = [i for i, d in enumerate(dets) if (d.colour, d.shape) == want.objects[1]]
        rel_ok = any(relation(dets[i], dets[j]) == want.relation for i in a_cands for j in b_cands if i != j)
    count_ok = len(dets) == n
    return {
        "objects": pairs / n,
        "colour": colours / n,
        "shape": shapes / n,
        "count": count_ok,
        "relation": rel_ok,
        "all": pairs == n and count_ok and rel_ok is not False,
        "expected": n,
        "detected": len(dets),
    }


def _multiset_hits(wanted: Iterable, found: Iterable) -> int:
    have = Counter(found)
    return sum(min(k, have[key]) for key, k in Counter(wanted).items())


def prompt_following_accuracy(results: Sequence[dict]) -> dict:
    """Mean of :func:`prompt_following` results: objects, colour, shape, count and all over every result;
    relation over the two-object prompts only (``relation_n`` of them)."""
    if not results:
        raise ValueError("prompt_following_accuracy needs at least one result")
    out = {key: float(np.mean([float(r[key]) for r in results])) for key in ("objects", "colour", "shape", "count", "all")}
    rel = [float(r["relation"]) for r in results if r["relation"] is not None]
    out["relation"] = float(np.mean(rel)) if rel else None
    out["relation_n"] = len(rel)
    out["n"] = len(results)
    return out


# ---------------------------------------------------------------------- accuracy on exact ground truth
def judge_accuracy(
    scenes: Sequence[Scene], images: Sequence[Any] | None = None,
    config: JudgeConfig | ShapesWorldConfig | None = None, *, size: int = 32,
) -> dict:
    """Per-attribute accuracy of the judge against the scenes' exact ground truth.

    ``images``: the images to judge (default: ``render_scene(scene, size)``). Each true object is matched
    to the nearest unused detection whose centre lies within the object's radius. Returns ``detection``
    (objects found), ``colour`` / ``shape`` (of all true objects: found with the right colour / shape),
    ``count`` (scenes with the right number of detections), ``relation`` (two-object scenes whose matched
    detections stand in the true relation), ``all`` (every object right, count right, relation right),
    ``centre_error_px`` (mean distance of matched centres) and the numbers of scenes and objects.
    """
    cfg = _config(config)
    hits = Counter()
    objects = rel_scenes = 0
    errors: list[float] = []
    for k, scene in enumerate(scenes):
        image = render_scene(scene, size) if images is None else images[k]
        dets = judge(image, cfg)
        side = as_rgb_array(image).shape[0]
        matched = _match(scene.objects, dets)
        objects += len(scene.objects)
        good = 0
        for obj, d in zip(scene.objects, matched):
            if d is None:
                continue
            hits["detection"] += 1
            hits["colour"] += d.colour == obj.colour
            hits["shape"] += d.shape == obj.shape
            good += d.colour == obj.colour and d.shape == obj.shape
            errors.append(math.hypot(d.x - obj.x, d.y - obj.y) * side)
        count_ok = len(dets) == len(scene.objects)
        hits["count"] += count_ok
        rel_ok = True
        if len(scene.objects) == 2:
            rel_scenes += 1
            a, b = matched
            rel_ok = a is not None and b is not None and relation(a, b) == relation(*scene.objects)
            hits["relation"] += rel_ok
        hits["all"] += good == len(scene.objects) and count_ok and rel_ok
    n = len(scenes)
    return {
        "detection": hits["detection"] / objects,
        "colour": hits["colour"] / objects,
        "shape": hits["shape"] / objects,
        "count": hits["count"] / n,
        "relation": hits["relation"] / rel_scenes if rel_scenes else None,
        "all": hits["all"] / n,
        "centre_error_px": float(np.mean(errors)) if errors else None,
        "scenes": n,
        "objects": objects,
        "two_object_scenes": rel_scenes,
    }


def _match(truth: Sequence[SceneObject], dets: Sequence[DetectedObject]) -> list[DetectedObject | None]:
    """Assign detections to true objects, minimising total centre distance (objects are few)."""
    best: list[DetectedObject | None] = [None] * len(truth)
    best_cost = math.inf
    slots = list(range(len(dets))) + [None] * len(truth)
    for choice in set(permutations(slots, len(truth))):
        cost, out = 0.0, []
        for obj, j in zip(truth, choice):
            if j is None:
                cost += 1.0  # a miss costs more than any in-radius match
                out.append(None)
                continue
            dist = math.hypot(dets[j].x - obj.x, dets[j].y - obj.y)
            if dist > obj.radius:
                cost = math.inf
                break
            cost += dist
            out.append(dets[j])
        if cost < best_cost:
            best, best_cost = out, cost
    return best


__all__ = [
    "DetectedObject",
    "Expected",
    "JudgeConfig",
    "as_rgb_array",
    "expected_from",
    "judge",
    "judge_accuracy",
    "prompt_following",
    "prompt_following_accuracy",
]
