"""VLAP (Park et al., ICLR 2024): a linear connector trained with optimal-transport assignment prediction.

The visual tokens and the caption are both assigned to the frozen LLM's *word embeddings* (all of them,
L2-normalised, as prototypes) by Sinkhorn-Knopp; each modality then predicts the other's assignment
(swapped prediction). Total loss ``map_weight * L_map + L_cap`` (0.1 in the paper). See METHODS.md s1.

Two readings of the assignment step (``VLAPConfig.assignment``), with codes ``s`` (B, K), ``eps`` and
``n = sinkhorn_iterations``, prior ``p`` (the word-frequency marginal, or uniform):

- ``"prior_weighted"`` (default): what the official code (park-jungin/vlap ``train.py``) runs, since its
  ``forward`` fixes ``Ns = 1`` and ``distributed_sinkhorn`` takes its (B, K) branch. Each sample on its own:
  ``q[b] = softmax(s[b] / eps + n * log p)``; no mass is shared across the batch.
- ``"balanced"``: the paper's "word-frequency-aware transportation polytope", textbook Sinkhorn-Knopp:
  ``Q = diag(u) exp(s^T / eps) diag(w)`` with prototype rows projected to ``p`` and sample columns to
  ``1/B`` in turn, ``n`` times (``mmkit.losses.sinkhorn``), so each prototype's mass is split over the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..losses.assignment import (
    prior_weighted_assignment,
    prototype_scores,
    sinkhorn,
    swapped_prediction_loss,
    word_frequency_prior,
)
from .base import AuxiliaryLosses, Connector, ConnectorConfig, LossContext, masked_mean

if TYPE_CHECKING:
    from ..llm.frozen import FrozenLM

PRIORS = ("frequency", "uniform")
# assignment reading -> function(scores (B, K), eps=, iterations=, prototype_marginal=) -> (B, K)
ASSIGNMENTS = {"prior_weighted": prior_weighted_assignment, "balanced": sinkhorn}


@dataclass
class VLAPConfig(ConnectorConfig):
    bias: bool = True
    map_weight: float = 0.1
    eps: float = 0.01
    sinkhorn_iterations: int = 3
    tau: float = 0.01
    prior: str = "frequency"
    prior_temperature: float = 0.25
    assignment: str = "prior_weighted"


class VLAPConnector(Connector):
    kind = "vlap"
    config_class = VLAPConfig
    data_buffers = ("prior",)
    readings = tuple(ASSIGNMENTS)  # the readings of the assignment step ``assign(reading=...)`` accepts

    def __init__(self, config: VLAPConfig) -> None:
        super().__init__(config)
        if config.prior not in PRIORS:
            raise ValueError(f"VLAPConfig.prior must be one of {PRIORS}, got {config.prior!r}")
        if config.assignment not in ASSIGNMENTS:
            raise ValueError(f"VLAPConfig.assignment must be one of {tuple(ASSIGNMENTS)}, got {config.assignment!r}")
        if config.sinkhorn_iterations < 1:
            raise ValueError(f"VLAPConfig.sinkhorn_iterations must be >= 1, got {config.sinkhorn_iterations}")
        self.proj = nn.Linear(config.vision_dim, config.llm_dim, bias=config.bias)
        # Prototype marginal (V,) (word-frequency prior), set from the training captions and saved with the
        # weights so that evaluation assigns as training did; empty until set_prior() or a load.
        self.register_buffer("prior", torch.empty(0))

    def forward(self, features: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(B, N, vision_dim) -> (B, N, llm_dim), the mask unchanged."""
        return self.proj(features), mask

    def prepare(self, *, llm: FrozenLM, texts: Sequence[str]) -> None:
        """With ``prior="frequency"``: count the training captions' tokens into the prototype prior."""
        if self.config.prior == "frequency":
            ids = [llm.caption_token_ids(t) for t in texts]
            self.set_prior(word_frequency_prior(ids, llm.vocab_size, temperature=self.config.prior_temperature))

    def set_prior(self, prior: Tensor | None) -> None:
        """Install the (V,) word-frequency marginal (see ``mmkit.losses.word_frequency_prior``)."""
        self.prior = torch.empty(0) if prior is None else prior.detach().float()

    @property
    def prior_missing(self) -> bool:
        """True when the config asks for the word-frequency prior and none is set (or was saved)."""
        return self.config.prior == "frequency" and self.prior.numel() == 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        saved = state_dict.get(prefix + "prior")
        if saved is not None:  # the prior's size comes from the file (the LLM's vocabulary)
            self.prior = torch.empty_like(saved, device=self.prior.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def codes(self, image_embeds: Tensor, text_features: Tensor, prototypes: Tensor,
              mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Assignment logits (B, V) of the mean visual embedding (over ``mask``) and of the text representation."""
        code_v = prototype_scores(masked_mean(image_embeds, mask), prototypes)
        code_t = prototype_scores(text_features, prototypes)
        return code_v, code_t

    def assign(self, codes: Tensor, *, reading: str | None = None) -> Tensor:
        """Assignment targets (B, V) of (B, V) codes under the configured reading and prior (no grad).

        ``reading`` overrides ``config.assignment`` (diagnostics compare both). ``"balanced"`` couples the
        samples of ``codes`` (the transport is over this batch); ``"prior_weighted"`` treats each row on its own.
        """
        cfg = self.config
        reading = cfg.assignment if reading is None else reading
        if reading not in ASSIGNMENTS:
            raise ValueError(f"reading must be one of {tuple(ASSIGNMENTS)}, got {reading!r}")
        marginal = None
        if cfg.prior == "frequency":
            if self.prior_missing or self.prior.numel() != codes.shape[1]:
                raise ValueError(
                    f"VLAP prior='frequency' needs set_prior() with a ({codes.shape[1]},) word-frequency "
                    f"marginal from the training captions (got {tuple(self.prior.shape)}); or use prior='uniform'"
                )
            marginal = self.prior.to(codes.device)
        return ASSIGNMENTS[reading](
            codes.detach(), eps=cfg.eps, iterations=cfg.sinkhorn_iterations, prototype_marginal=marginal
        )

    @classmethod
    def upgrade_saved_config(cls, config: dict) -> dict:
        """Connectors saved before ``assignment`` existed were all trained with the balanced reading."""
        return config if "assignment" in config else {**config, "assignment": "balanced"}

    def map_loss(self, image_embeds: Tensor, text_features: Tensor, prototypes: Tensor,
                 mask: Tensor | None = None) -> Tensor:
        """L_map (unweighted): image_embeds (B, N, d) with an optional (B, N) mask, text_features (B, d),
        prototypes (V, d), detached."""
        code_v, code_t = self.codes(image_embeds, text_features, prototypes.detach(), mask)
        return swapped_prediction_loss(code_v, code_t, self.assign(code_v), self.assign(code_t), tau=self.config.tau)

    def losses(self, tokens: Tensor, mask: Tensor | None, context: LossContext) -> AuxiliaryLosses | None:
        """``map_weight * L_map`` over the samples that have a caption (None when fewer than two do: the
        balanced reading transports over a batch)."""
        texts = context.texts
        keep = [i for i, t in enumerate(texts or []) if t]
        if len(keep) < 2:
            return None
        text_features = context.llm.text_features([texts[i] for i in keep])
        map_loss = self.map_loss(tokens[keep], text_features, context.llm.word_embeddings(),
                                 None if mask is None else mask[keep])
        return AuxiliaryLosses(total=self.config.map_weight * map_loss, logged={"map_loss": map_loss})
