"""ShapesWorld promptable segmentation: an image, a prompt (points or a box) on one object, its exact mask.

What SAM trains on, made from ShapesWorld scenes (split by seed like every ShapesWorld source)::

    data = PromptableShapes(PromptableConfig(image_size=64), split="train", size=20_000)
    batch = data.batch(start=0, size=16, prompt="points")
    batch["pixel_values"]  # (16, 3, 64, 64) SAM-normalised (ImageNet mean / std on 0-255, as SamProcessor)
    batch["points"]        # (16, P, 2) pixel (x, y); batch["labels"] (16, P): 1 inside, 0 outside, -10 padding
    batch["boxes"]         # (16, 4) x0, y0, x1, y1 (the object's box, jittered)
    batch["masks"]         # (16, 64, 64) bool, the prompted object's exact mask

Every sample is a pure function of (split, item index, sample number), so batches replay exactly on resume.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from ..config import StrictConfig
from .shapes import ShapesWorldConfig, render_masks, render_scene
from .shapesworld import ShapesWorld

SAM_MEAN = (123.675, 116.28, 103.53)  # SamProcessor's defaults (ImageNet, 0-255)
SAM_STD = (58.395, 57.12, 57.375)
PROMPTS = ("points", "box")


@dataclass
class PromptableConfig(StrictConfig):
    """image_size: pixels per side (SAM's input). max_positive / max_negative: points per prompt (at least
    one positive). box_jitter: each box side moves by up to this fraction of the box's size."""

    image_size: int = 64
    max_objects: int = 3
    max_positive: int = 3
    max_negative: int = 2
    box_jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"PromptableConfig.image_size must be >= 16, got {self.image_size}")
        if self.max_positive < 1 or self.max_negative < 0:
            raise ValueError("PromptableConfig needs max_positive >= 1 and max_negative >= 0, got "
                             f"{self.max_positive} and {self.max_negative}")
        if not 0.0 <= self.box_jitter < 0.5:
            raise ValueError(f"PromptableConfig.box_jitter must be in [0, 0.5), got {self.box_jitter}")


def sam_pixels(image) -> torch.Tensor:
    """A PIL RGB image -> (3, H, W) float32 normalised the way SamProcessor normalises."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
    mean = torch.tensor(SAM_MEAN).view(3, 1, 1)
    std = torch.tensor(SAM_STD).view(3, 1, 1)
    return (x - mean) / std


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """The tight box (x0, y0, x1, y1) in pixel coordinates of a non-empty bool mask."""
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())


def sample_points(mask: np.ndarray, rng: random.Random, positive: int, negative: int) -> list[tuple[float, float, int]]:
    """``positive`` pixels inside ``mask`` and ``negative`` outside, as (x, y, label)."""
    inside, outside = np.argwhere(mask), np.argwhere(~mask)
    out = []
    for pool, n, label in ((inside, positive, 1), (outside, negative, 0)):
        for _ in range(n if len(pool) else 0):
            y, x = pool[rng.randrange(len(pool))]
            out.append((float(x), float(y), label))
    return out


class PromptableShapes:
    """ShapesWorld scenes as promptable segmentation samples (see the module docstring)."""

    def __init__(self, config: PromptableConfig, split: str = "train", size: int = 10_000) -> None:
        self.config = config
        world = ShapesWorldConfig(image_size=config.image_size, max_objects=config.max_objects)
        self.world = ShapesWorld(world, split=split, size=size)

    def __len__(self) -> int:
        return len(self.world)

    def scene_sample(self, index: int) -> tuple[torch.Tensor, np.ndarray]:
        """Item ``index``: SAM pixels (3, S, S) and the object masks (num_objects, S, S)."""
        scene = self.world.scene(index)
        size = self.config.image_size
        return sam_pixels(render_scene(scene, size)), render_masks(scene, size)

    def sample(self, number: int, prompt: str) -> dict:
        """Sample ``number`` (cycling over the items): one object of its scene and a prompt on it."""
        if prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
        cfg = self.config
        index = number % len(self)
        rng = random.Random(self.world.seed_of(index) * 1_000_003 + number)
        pixels, masks = self.scene_sample(index)
        visible = [k for k in range(len(masks)) if masks[k].any()]
        k = rng.choice(visible)
        mask = masks[k]
        points = sample_points(mask, rng, rng.randint(1, cfg.max_positive), rng.randint(0, cfg.max_negative))
        x0, y0, x1, y1 = mask_box(mask)
        w, h = x1 - x0 + 1, y1 - y0 + 1
        j = cfg.box_jitter
        box = [x0 + rng.uniform(-j, j) * w, y0 + rng.uniform(-j, j) * h,
               x1 + rng.uniform(-j, j) * w, y1 + rng.uniform(-j, j) * h]
        box = [min(max(v, 0.0), cfg.image_size - 1.0) for v in box]
        return {"pixels": pixels, "points": points, "box": box, "mask": mask}

    def batch(self, start: int, size: int, prompt: str) -> dict:
        """Samples ``start .. start + size - 1`` stacked; points padded with label -10 to the batch's longest."""
        samples = [self.sample(start + i, prompt) for i in range(size)]
        longest = max(len(s["points"]) for s in samples)
        points = torch.zeros(size, longest, 2)
        labels = torch.full((size, longest), -10, dtype=torch.long)
        for i, s in enumerate(samples):
            for p, (x, y, label) in enumerate(s["points"]):
                points[i, p] = torch.tensor([x, y])
                labels[i, p] = label
        return {
            "pixel_values": torch.stack([s["pixels"] for s in samples]),
            "points": points,
            "labels": labels,
            "boxes": torch.tensor([s["box"] for s in samples], dtype=torch.float32),
            "masks": torch.from_numpy(np.stack([s["mask"] for s in samples])),
            "prompt": prompt,
        }
