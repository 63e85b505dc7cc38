"""Vision -> LLM connectors. ``build_connector("vlap", vision_dim=..., llm_dim=...)``; the contract is in ``base``."""

from .base import (
    AuxiliaryLosses,
    Connector,
    ConnectorConfig,
    LossContext,
    build_connector,
    connector_kinds,
    load_connector,
    load_weights_into,
    masked_mean,
    register_connector,
)
from .linear import LinearConnector, LinearConnectorConfig
from .mean_frames import MeanFramesConfig, MeanFramesConnector
from .qformer import QFormerConfig, QFormerConnector
from .vlap import VLAPConfig, VLAPConnector

# The built-in kinds, registered here explicitly (a plug-in calls register_connector the same way).
register_connector(LinearConnector)
register_connector(VLAPConnector)
register_connector(QFormerConnector)
register_connector(MeanFramesConnector)

__all__ = [
    "AuxiliaryLosses",
    "Connector",
    "ConnectorConfig",
    "LossContext",
    "LinearConnector",
    "LinearConnectorConfig",
    "MeanFramesConfig",
    "MeanFramesConnector",
    "QFormerConfig",
    "QFormerConnector",
    "VLAPConfig",
    "VLAPConnector",
    "build_connector",
    "connector_kinds",
    "load_connector",
    "load_weights_into",
    "masked_mean",
    "register_connector",
]
