"""Frozen vision encoders behind one protocol: ``load_encoder(spec) -> VisionEncoder``.

    encoder = load_encoder("timm:tf_efficientnet_lite0", token_grid=3)
    out = encoder.encode(["cat.jpg", pil_image])  # out.tokens (2, 9, 1280), out.pooled (2, 1280)

Specs: ``open_clip:ARCH@PRETRAINED`` (``@none`` = random init), ``hf:REPO_OR_PATH``, ``timm:NAME[@none]``.
Families (open_clip, transformers, timm) are imported only when a spec that needs them is loaded.
"""

from __future__ import annotations

from .base import (
    ENCODER_FAMILIES,
    EncoderConfig,
    EncoderFamily,
    EncoderOutput,
    EncoderSpec,
    VisionEncoder,
    accepted_forms,
    load_encoder,
    parse_spec,
    register_encoder_family,
)

__all__ = [
    "ENCODER_FAMILIES",
    "EncoderConfig",
    "EncoderFamily",
    "EncoderOutput",
    "EncoderSpec",
    "VisionEncoder",
    "accepted_forms",
    "load_encoder",
    "parse_spec",
    "register_encoder_family",
]
