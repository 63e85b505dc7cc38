"""The vision -> LLM connector contract, shared by every connector (linear, VLAP, the causal Q-Former, ...).

A connector is an :class:`~mmkit.adapters.Adapter` of family ``"connector"``:

- ``forward(features, mask=None) -> (tokens, mask)``: frozen encoder tokens (B, N, Dv) with an optional
  (B, N) bool mask (True = a real token) -> LLM input embeddings (B, M, D) and their (B, M) mask, or None
  when every sample has all M tokens (a connector may give samples different token counts, e.g. one
  window of queries per 5 s of video: the mask marks each sample's real tokens);
- ``prepare(llm=, texts=)``: called once before training with the frozen LLM and the training texts
  (VLAP counts word frequencies there);
- ``losses(tokens, mask, context)``: the method's own objective next to the captioning loss, as
  :class:`AuxiliaryLosses` (the weighted total that is added, and the terms that are logged), or None.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

from ..adapters import (
    Adapter,
    AdapterConfig,
    adapter_kinds,
    build_adapter,
    load_adapter,
    load_adapter_weights,
    register_adapter,
)

if TYPE_CHECKING:
    from ..llm.frozen import FrozenLM


@dataclass
class ConnectorConfig(AdapterConfig):
    vision_dim: int = 0
    llm_dim: int = 0


@dataclass
class LossContext:
    """What a connector's objective may use besides its own outputs: the frozen LLM and, per sample, the
    caption paired with the image (None where the sample has none, e.g. a VQA example)."""

    llm: FrozenLM
    texts: Sequence[str | None] | None = None


@dataclass
class AuxiliaryLosses:
    """``total`` is added to the training loss (already weighted); ``logged`` terms go to ``log.jsonl``."""

    total: Tensor
    logged: dict[str, Tensor]


class Connector(Adapter):
    """Maps frozen vision tokens (B, N, Dv) to LLM input embeddings (B, M, Dl); see the module docstring."""

    family = "connector"
    config_class = ConnectorConfig

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__(config)
        if config.vision_dim <= 0 or config.llm_dim <= 0:
            raise ValueError(f"{type(self).__name__}: vision_dim and llm_dim must be positive, got {config}")

    def forward(self, features: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens

    @classmethod
    def example_config(cls, vision_dim: int, llm_dim: int) -> dict:
        """Config keywords of a small instance, for the generic tests every registered connector gets."""
        return {"vision_dim": vision_dim, "llm_dim": llm_dim}

    def prepare(self, *, llm: FrozenLM, texts: Sequence[str]) -> None:
        """Set up what the objective needs from the training data (default: nothing)."""

    def losses(self, tokens: Tensor, mask: Tensor | None, context: LossContext) -> AuxiliaryLosses | None:
        """The connector's own objective on its outputs ``tokens`` (B, M, D) (default: none)."""
        return None

    def init_from_checkpoint(self, source: str | os.PathLike) -> list[str]:
        """Start from another project's pretrained weights (a file, model folder or hub name; recipes'
        ``model.connector_init``). Returns the names of tensors left as initialised. Default: not supported."""
        raise ValueError(f"connector kind {self.kind!r} cannot start from a pretrained checkpoint "
                         f"(model.connector_init); kinds that can: {', '.join(initialisable_kinds()) or 'none'}")

    def save(self, directory: str | os.PathLike, *, metadata: dict | None = None) -> Path:
        return self.save_adapter(directory, metadata=metadata)


def masked_mean(tokens: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the token axis of (B, M, D) ``tokens``, counting only ``mask`` (B, M) True positions."""
    if mask is None:
        return tokens.mean(dim=1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)  # (B, M, 1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def register_connector(cls: type[Connector], *, replace: bool = False) -> type[Connector]:
    """Make ``cls`` buildable and loadable by its ``kind``; a kind already taken raises."""
    if not issubclass(cls, Connector):
        raise TypeError(f"{cls.__name__} is not a Connector")
    return register_adapter(cls, replace=replace)


def initialisable_kinds() -> list[str]:
    """Connector kinds that override :meth:`Connector.init_from_checkpoint`."""
    from ..adapters import ADAPTERS

    return [k for k in connector_kinds() if ADAPTERS.get(k).init_from_checkpoint is not Connector.init_from_checkpoint]


def connector_kinds() -> list[str]:
    return adapter_kinds("connector")


def build_connector(kind: str, **config) -> Connector:
    """A freshly initialised connector of ``kind`` ('linear', 'vlap', ...) from config keywords."""
    return build_adapter(kind, family="connector", **config)


def check_connector_options(kind: str, options: dict) -> None:
    """Fail now on an unknown kind or option (before the sizes are known, e.g. before minutes of feature caching)."""
    from ..adapters import ADAPTERS

    cls = ADAPTERS.get(kind, among=connector_kinds(), what="connector kind")
    cls.config_class.from_dict({**options, "vision_dim": 0, "llm_dim": 0})


def check_connector_init(kind: str, source: str) -> None:
    """Fail now when ``kind`` cannot start from a checkpoint, or ``source`` is neither a path nor (online) a hub name."""
    from ..hub import hub_offline

    if kind not in initialisable_kinds():
        raise ValueError(f"model.connector_init: connector kind {kind!r} cannot start from a pretrained checkpoint; "
                         f"kinds that can: {', '.join(initialisable_kinds()) or 'none'}")
    if not Path(source).exists() and (hub_offline() or str(source).count("/") != 1):
        raise ValueError(f"model.connector_init: no file or folder {source!r}" +
                         (" (HF_HUB_OFFLINE=1, so hub names cannot be fetched)" if hub_offline() else ""))


def load_connector(directory: str | os.PathLike) -> tuple[Connector, dict]:
    """(connector, metadata) from an adapter folder (or a legacy ``connector.json`` folder). Never unpickles."""
    return load_adapter(directory, family="connector")


load_weights_into = load_adapter_weights
