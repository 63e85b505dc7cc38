"""Test kit shipped with mmkit: tiny real-class builders and the oracle assert."""

from .asserts import assert_oracle_rule, max_abs_error
from .tiny import (
    save_tiny_vlm_parts,
    tiny_clip_text,
    tiny_clip_vision,
    tiny_llama,
    tiny_open_clip,
    tiny_qformer,
    tiny_sam,
    tiny_tokenizer,
    tiny_unet,
)

__all__ = [
    "assert_oracle_rule",
    "max_abs_error",
    "save_tiny_vlm_parts",
    "tiny_clip_text",
    "tiny_clip_vision",
    "tiny_llama",
    "tiny_open_clip",
    "tiny_qformer",
    "tiny_sam",
    "tiny_tokenizer",
    "tiny_unet",
]
