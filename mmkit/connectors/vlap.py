"""VLAP (Park et al., ICLR 2024): a linear connector trained with optimal-transport assignment prediction.

The visual tokens and the caption are both assigned to the frozen LLM's *word embeddings* (all of them,
L2-normalised, as prototypes) by Sinkhorn-Knopp; each modality then predicts the other's assignment
(swapped prediction). Total loss ``map_weight * L_map + L_cap`` (0.1 in the paper). See METHODS.md s1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..losses.assignment import prototype_scores, sinkhorn, swapped_prediction_loss
from .base import Connector, ConnectorConfig, register_connector

PRIORS = ("frequency", "uniform")


@dataclass
class VLAPConfig(ConnectorConfig):
    bias: bool = True
    map_weight: float = 0.1
    eps: float = 0.01
    sinkhorn_iterations: int = 3
    tau: float = 0.01
    prior: str = "frequency"
    prior_temperature: float = 0.25


@register_connector
class VLAPConnector(Connector):
    kind = "vlap"
    config_class = VLAPConfig
    needs_text_features = True

    def __init__(self, config: VLAPConfig) -> None:
        super().__init__(config)
        if config.prior not in PRIORS:
            raise ValueError(f"VLAPConfig.prior must be one of {PRIORS}, got {config.prior!r}")
        self.proj = nn.Linear(config.vision_dim, config.llm_dim, bias=config.bias)
        # Prototype marginal for Sinkhorn (word-frequency prior); set from the training captions.
        self.register_buffer("prior", torch.empty(0), persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, N, vision_dim) -> (B, N, llm_dim)."""
        return self.proj(tokens)

    def set_prior(self, prior: Tensor | None) -> None:
        """Install the (V,) word-frequency marginal (see ``mmkit.losses.word_frequency_prior``)."""
        self.prior = torch.empty(0) if prior is None else prior.detach().float()

    def codes(self, image_embeds: Tensor, text_features: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor]:
        """Assignment logits (B, V) of the mean visual embedding and of the text representation."""
        code_v = prototype_scores(image_embeds.mean(dim=1), prototypes)
        code_t = prototype_scores(text_features, prototypes)
        return code_v, code_t

    def assign(self, codes: Tensor) -> Tensor:
        """Sinkhorn assignment (B, V) of (B, V) codes under the configured prototype marginal (no grad)."""
        cfg = self.config
        marginal = None
        if cfg.prior == "frequency":
            if self.prior.numel() != codes.shape[1]:
                raise ValueError(
                    f"VLAP prior='frequency' needs set_prior() with a ({codes.shape[1]},) word-frequency "
                    f"marginal from the training captions (got {tuple(self.prior.shape)}); or use prior='uniform'"
                )
            marginal = self.prior.to(codes.device)
        return sinkhorn(codes.detach(), eps=cfg.eps, iterations=cfg.sinkhorn_iterations, prototype_marginal=marginal)

    def auxiliary_loss(self, image_embeds: Tensor, text_features: Tensor, prototypes: Tensor) -> dict[str, Tensor]:
        """{"map_loss": L_map, "weighted": map_weight * L_map}; image_embeds (B, N, d), text_features (B, d)."""
        code_v, code_t = self.codes(image_embeds, text_features, prototypes.detach())
        map_loss = swapped_prediction_loss(code_v, code_t, self.assign(code_v), self.assign(code_t), tau=self.config.tau)
        return {"map_loss": map_loss, "weighted": self.config.map_weight * map_loss}
