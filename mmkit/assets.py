"""Paths of the models shipped in the repository's ``assets/`` folder (made by mmkit's own recipes)."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_CONNECTOR = ASSETS / "connectors" / "shapes-vlap"  # VLAP connector, EfficientNet-Lite0 -> SmolLM2-135M
DEFAULT_VIDEO_MODEL = ASSETS / "connectors" / "shapes-video-qa"  # causal Q-Former on ShapesWorld clips
DEFAULT_SEG_MODEL = ASSETS / "segment" / "shapes-read"  # READ on ShapesWorld referring expressions
DEFAULT_T2I_MODEL = ASSETS / "t2i" / "shapes"  # ShapesWorld pixel-space text-to-image pipeline
