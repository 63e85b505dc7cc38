"""Modules built on :mod:`mmkit.ops`."""

from .attention import AttentionProcessor, CrossAttention
from .fourier import FourierFeatures, grid_sincos
from .transformer import MLP, TransformerBlock

__all__ = ["MLP", "AttentionProcessor", "CrossAttention", "FourierFeatures", "TransformerBlock", "grid_sincos"]
