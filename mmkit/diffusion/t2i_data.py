"""ShapesWorld as text-to-image training data: (caption, image) pairs at 32 px.

The world (:func:`t2i_world`) is chosen so that a small pixel-space UNet can learn it on a CPU and a
deterministic judge (:mod:`mmkit.eval.shapes_judge`) can read every attribute back from 32 px images:

- 32 x 32 px, 1-2 objects: captions state size, colour and shape of each object and, for two, their
  relation ("a small red circle to the left of a large blue star");
- 4 shapes that stay distinct at this size (circle, square, triangle, star; a hexagon is a circle at
  11 px, diamond / cross are left out to keep the combinations few) and 6 colours far apart in RGB
  (red, green, blue, yellow, purple, white; orange, cyan and pink sit too close to their neighbours
  for generated colours to be judged reliably);
- enclosing diameters 0.34 and 0.46 of the side (11 and 15 px): a small star's points and a small
  triangle's corners survive anti-aliasing; two large objects still fit with room around them
  (margin 0.04, gap 0.06 = 2 px, so objects never touch and can be told apart);
- plain textures, no motion, a flat (60, 60, 60) background.

Sample ``i`` of a split is the scene of seed ``SPLIT_SEED_RANGES[split][0] + i``; the training loop reads
samples ``step * batch ... step * batch + batch - 1``, so data order is a pure function of the step and
resuming needs no sampler state. Caption dropout (for classifier-free guidance) replaces the caption by
"" for a deterministic ``caption_dropout`` fraction of samples, decided by the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import StrictConfig
from ..data.shapes import SPLIT_SEED_RANGES, Scene, ShapesWorldConfig, render_scene, sample_scene, t2i_world
from ..data.shapes_language import caption


@dataclass
class T2IDataConfig(StrictConfig):
    """world: the ShapesWorld scenes; split: seed range to draw from (train / val / test);
    caption_dropout: fraction of samples whose prompt is "" (unconditional, for guidance)."""

    world: ShapesWorldConfig = field(default_factory=t2i_world)
    split: str = "train"
    caption_dropout: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.world, dict):
            self.world = ShapesWorldConfig.from_dict(self.world)
        if self.split not in SPLIT_SEED_RANGES:
            raise ValueError(f"T2IDataConfig.split: got {self.split!r}; accepted: {list(SPLIT_SEED_RANGES)}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"T2IDataConfig.caption_dropout must be in [0, 1), got {self.caption_dropout}")


def image_to_tensor(image) -> torch.Tensor:
    """PIL RGB image or uint8 (H, W, 3) array -> float32 (3, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image_to_tensor expects an RGB image (H, W, 3), got shape {array.shape}")
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


class ShapesT2IData:
    """Indexable text-to-image samples of one split (no length: a split has 10**7 seeds).

    ``data[i]`` -> ``{"pixel_values": (3, H, W) in [-1, 1], "prompt": str ("" when dropped),
    "caption": str, "seed": int}``; ``data.batch(start, size)`` stacks ``size`` consecutive samples.
    """

    def __init__(self, cfg: T2IDataConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else T2IDataConfig()
        self.first, self.last = SPLIT_SEED_RANGES[self.cfg.split]

    def seed_of(self, index: int) -> int:
        if not 0 <= index < self.last - self.first:
            raise IndexError(f"ShapesT2IData({self.cfg.split}): index {index} outside [0, {self.last - self.first})")
        return self.first + int(index)

    def scene(self, index: int) -> Scene:
        return sample_scene(self.seed_of(index), self.cfg.world)

    def dropped(self, seed: int) -> bool:
        """Whether the caption of ``seed`` is replaced by "" (independent of the scene's own RNG)."""
        p = self.cfg.caption_dropout
        return p > 0 and random.Random(f"{seed}/caption-dropout").random() < p

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        text = caption(scene)
        return {
            "pixel_values": image_to_tensor(render_scene(scene, self.cfg.world.image_size)),
            "prompt": "" if self.dropped(scene.seed) else text,
            "caption": text,
            "seed": scene.seed,
        }

    def batch(self, start: int, size: int) -> dict:
        """Samples ``start .. start + size - 1``: pixel_values (size, 3, H, W), prompts / captions lists."""
        items = [self[i] for i in range(start, start + size)]
        return {
            "pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "prompts": [it["prompt"] for it in items],
            "captions": [it["caption"] for it in items],
            "seeds": [it["seed"] for it in items],
        }


def held_out_prompts(count: int, world: ShapesWorldConfig | None = None, split: str = "test") -> list[tuple[Scene, str]]:
    """The first ``count`` scenes of ``split`` with their canonical captions: fixed evaluation prompts."""
    world = world if world is not None else t2i_world()
    first = SPLIT_SEED_RANGES[split][0]
    scenes = [sample_scene(first + i, world) for i in range(count)]
    return [(s, caption(s)) for s in scenes]


__all__ = ["ShapesT2IData", "T2IDataConfig", "held_out_prompts", "image_to_tensor", "t2i_world"]
