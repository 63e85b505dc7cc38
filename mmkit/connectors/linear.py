"""The LiMBeR / MAGMA baseline: one linear layer from vision tokens into the LLM's input space,
trained with the captioning loss only.

``positions`` (default 0: none) adds a learned position embedding per token of a square token grid to the
outputs, started from 2-D sine-cosine codes centred and scaled to ``position_std`` per channel. A ViT's
tokens (CLIP's, which LLaVA / LISA feed their LLM) carry learned position embeddings in their values; a
CNN's pooled grid (EfficientNet's) carries only what zero padding leaks into it, and the LLM sees token order
only through its rotary attention scores, which never enter the values. With explicit positions, the state of
a token that attended to an object can also hold where that object is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import Connector, ConnectorConfig


@dataclass
class LinearConnectorConfig(ConnectorConfig):
    bias: bool = True
    positions: int = 0  # tokens of the square grid that get a learned position embedding (0: none)
    position_std: float = 0.1  # per-channel std over the grid of the 2-D sine-cosine start (each channel mean 0)

    def __post_init__(self) -> None:
        if self.position_std < 0:
            raise ValueError(f"LinearConnectorConfig.position_std must be >= 0, got {self.position_std}")
        if self.positions < 0 or math.isqrt(self.positions) ** 2 != self.positions:
            raise ValueError(f"LinearConnectorConfig.positions must be 0 or the token count of a square grid (49 for "
                             f"7 x 7), got {self.positions}")


class LinearConnector(Connector):
    kind = "linear"
    config_class = LinearConnectorConfig

    def __init__(self, config: LinearConnectorConfig) -> None:
        super().__init__(config)
        self.proj = nn.Linear(config.vision_dim, config.llm_dim, bias=config.bias)
        if config.positions:
            from ..nn import grid_sincos

            side = math.isqrt(config.positions)
            codes = grid_sincos(side, side, config.llm_dim)  # (N, llm_dim), channels in [-1, 1]
            codes = codes - codes.mean(0)  # only the part that differs between positions
            spread = codes.std(0)  # (llm_dim,); zero for the padding channels and on a 1 x 1 grid
            codes = torch.where(spread > 1e-6, codes / spread.clamp_min(1e-6), torch.zeros_like(codes))
            self.position = nn.Parameter(codes * config.position_std)

    def forward(self, features: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(B, N, vision_dim) -> (B, N, llm_dim) (+ the position embeddings), the mask unchanged."""
        out = self.proj(features)
        if self.config.positions:
            if features.shape[1] != self.config.positions:
                raise ValueError(f"this linear connector has position embeddings for {self.config.positions} tokens "
                                 f"(a square grid); got {features.shape[1]} tokens per image. Use the encoder and "
                                 "token grid it was trained with, or a connector built with positions=0")
            if mask is not None:
                raise ValueError("a linear connector with positions places tokens on one square grid per image; it "
                                 "does not take masked (padded, ragged) token sequences")
            out = out + self.position
        return out, mask
