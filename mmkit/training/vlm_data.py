"""Batches for the vision->LLM recipes: examples (see :mod:`mmkit.data.sources`) paired with cached features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..data.sources import Example


class ExampleDataset(Dataset):
    """Pairs examples with image features: item -> {"features": (N, D), "prompt", "target", "align"}."""

    def __init__(self, examples: Sequence[Example], features: Tensor) -> None:
        self.examples = list(examples)
        self.features = features

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, j: int) -> dict:
        ex = self.examples[j]
        return {"features": self.features[ex.index], "prompt": ex.prompt, "target": ex.target, "align": ex.align}


def collate(items: list[dict]) -> dict:
    return {
        "features": torch.stack([it["features"] for it in items]),
        "prompt": [it["prompt"] for it in items],
        "target": [it["target"] for it in items],
        "align": [it["align"] for it in items],
    }
