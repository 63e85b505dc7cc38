"""The ShapesWorld dataset: scenes (:mod:`.shapes`) with their rendering and language (:mod:`.shapes_language`)."""

from __future__ import annotations

import numbers
from typing import Any

from torch.utils.data import Dataset

from .shapes import SPLIT_SEED_RANGES, Scene, ShapesWorldConfig, render_scene, sample_scene
from .shapes_language import captions, qa_pairs, referring_expressions


class ShapesWorld(Dataset):
    """Torch dataset of ShapesWorld scenes; item ``i`` of ``split`` is the scene of seed
    ``SPLIT_SEED_RANGES[split][0] + i`` (see :data:`SPLIT_SEED_RANGES`), generated on the fly.

    Each item is a dict::

        id        "train-000123"
        seed      int
        image     PIL RGB image, cfg.image_size pixels per side
        caption   canonical caption (states size, colour and shape of every object)
        captions  list of paraphrases, canonical first (CIDEr references)
        qa        list of QA(question, answer, kind)
        refs      list of Ref(expression, object_index); masks from render_masks(item["scene"], ...)
        scene     the Scene
    """

    def __init__(
        self, cfg: ShapesWorldConfig | None = None, split: str = "train", size: int = 10_000
    ) -> None:
        if split not in SPLIT_SEED_RANGES:
            raise ValueError(f"ShapesWorld: unknown split {split!r}; accepted: {list(SPLIT_SEED_RANGES)}")
        first, last = SPLIT_SEED_RANGES[split]
        if not isinstance(size, numbers.Integral) or not 0 <= size <= last - first:
            raise ValueError(f"ShapesWorld: size must be an int in [0, {last - first}], got {size!r}")
        self.cfg = cfg if cfg is not None else ShapesWorldConfig()
        self.split = split
        self.size = int(size)

    def __len__(self) -> int:
        return self.size

    def seed_of(self, index: int) -> int:
        """Seed of item ``index`` (negative indices count from the end, as for lists)."""
        return SPLIT_SEED_RANGES[self.split][0] + self._check_index(index)

    def _check_index(self, index: int) -> int:
        if not isinstance(index, numbers.Integral) or isinstance(index, bool):
            raise TypeError(f"ShapesWorld: index must be an int, got {type(index).__name__}")
        if not -self.size <= index < self.size:
            raise IndexError(f"ShapesWorld({self.split}): index {index} out of range for size {self.size}")
        return int(index) % self.size

    def scene(self, index: int) -> Scene:
        """The scene of item ``index`` without rendering or language."""
        return sample_scene(self.seed_of(index), self.cfg)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        scene = self.scene(index)
        texts = captions(scene)
        return {
            "id": f"{self.split}-{index:06d}",
            "seed": scene.seed,
            "image": render_scene(scene, self.cfg.image_size),
            "caption": texts[0],
            "captions": texts,
            "qa": qa_pairs(scene, self.cfg),
            "refs": referring_expressions(scene),
            "scene": scene,
        }

    def __repr__(self) -> str:
        return f"ShapesWorld(split={self.split!r}, size={self.size}, image_size={self.cfg.image_size})"
