"""Vision -> LLM connectors. ``build_connector("vlap", vision_dim=..., llm_dim=...)``."""

from .base import (
    Connector,
    ConnectorConfig,
    build_connector,
    connector_kinds,
    load_connector,
    load_weights_into,
    register_connector,
)
from .linear import LinearConnector, LinearConnectorConfig
from .vlap import VLAPConfig, VLAPConnector

__all__ = [
    "Connector",
    "ConnectorConfig",
    "LinearConnector",
    "LinearConnectorConfig",
    "VLAPConfig",
    "VLAPConnector",
    "build_connector",
    "connector_kinds",
    "load_connector",
    "load_weights_into",
    "register_connector",
]
