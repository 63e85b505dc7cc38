"""The LiMBeR / MAGMA baseline: one linear layer from vision tokens into the LLM's input space,
trained with the captioning loss only."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .base import Connector, ConnectorConfig


@dataclass
class LinearConnectorConfig(ConnectorConfig):
    bias: bool = True


class LinearConnector(Connector):
    kind = "linear"
    config_class = LinearConnectorConfig

    def __init__(self, config: LinearConnectorConfig) -> None:
        super().__init__(config)
        self.proj = nn.Linear(config.vision_dim, config.llm_dim, bias=config.bias)

    def forward(self, features: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(B, N, vision_dim) -> (B, N, llm_dim), the mask unchanged."""
        return self.proj(features), mask
