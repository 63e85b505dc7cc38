"""mmkit: small trainable adapters on frozen vision, audio, language and diffusion models.

``import mmkit`` stays light: submodules (and torch-heavy dependencies) load when first used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "ops", "nn", "testing", "config", "data", "encoders", "llm", "connectors", "losses", "models", "training", "eval",
    "adapters", "assets", "diffusion", "hub", "registry", "text_encoders", "weights", "heads",
)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"mmkit.{name}")
    raise AttributeError(f"module 'mmkit' has no attribute {name!r}")
