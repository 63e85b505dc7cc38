"""SAM's mask decoder with point prompts plus extra sparse embeddings (LISA's / READ's ``<SEG>`` prompt).

transformers' ``SamModel`` takes points, boxes and masks; LISA and READ add the projected ``<SEG>`` state as
one more sparse token next to the points. ``decode_masks`` does exactly what ``SamModel.forward`` does with
``image_embeddings=`` (prompt encoder, image-wide positional embeddings, mask decoder) and appends the
extra tokens to the sparse prompt, so with no extra token it equals ``SamModel`` itself::

    emb = sam_image_embeddings(sam, pixel_values)                   # (B, 256, 64, 64) for SAM ViT-B..H
    logits, iou = decode_masks(sam, emb, coords, labels, extra=seg_prompt)  # (B, 1, 256, 256), (B, 1)
    masks = upscale_masks(logits, (H, W)) > 0
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..assets import ASSET_PREFIX, resolve_asset


@torch.no_grad()
def sam_image_embeddings(sam, pixel_values: Tensor) -> Tensor:
    """The frozen image encoder: (B, 3, S, S) normalised pixels at SAM's input size -> (B, C, s, s)."""
    return sam.get_image_embeddings(pixel_values)


def sam_input_size(sam) -> int:
    """The side of the square image SAM's prompt coordinates refer to (1024 for the released models)."""
    return int(sam.config.prompt_encoder_config.image_size)


def decode_masks(
    sam,
    image_embeddings: Tensor,
    coords: Tensor | None,
    labels: Tensor | None,
    *,
    boxes: Tensor | None = None,
    extra: Tensor | None = None,
    multimask_output: bool = False,
) -> tuple[Tensor, Tensor]:
    """Low-resolution mask logits from SAM's mask decoder.

    image_embeddings: (B, C, s, s); coords: (B, P, 2) pixel (x, y) in SAM's input frame (see
    :func:`sam_input_size`) or None; labels: (B, P) long (1 positive, 0 negative, -1 not a point, -10 padding);
    boxes: (B, 4) x0, y0, x1, y1 in the same frame, or None; extra: (B, C) or (B, E, C) sparse tokens appended after the points (the ``<SEG>`` prompt), or None.
    Returns mask logits (B, M, 4s, 4s) (M = 1, or 3 with ``multimask_output``) and IoU predictions (B, M).
    """
    b = image_embeddings.shape[0]
    if coords is not None and labels is None:
        raise ValueError("decode_masks: point coordinates need labels (1 positive, 0 negative, -1 not a point)")
    if coords is None and boxes is None and extra is None:
        raise ValueError("decode_masks needs point prompts, a box or extra sparse tokens (any of them, or several)")
    positions = sam.get_image_wide_positional_embeddings().repeat(b, 1, 1, 1)
    sparse, dense = sam.prompt_encoder(
        input_points=None if coords is None else coords[:, None],  # (B, 1, P, 2): one mask per image
        input_labels=None if labels is None else labels[:, None],
        input_boxes=None if boxes is None else boxes[:, None],  # (B, 1, 4)
        input_masks=None,
    )
    if extra is not None:
        tokens = (extra[:, None] if extra.dim() == 2 else extra)[:, None]  # (B, 1, E, C)
        tokens = tokens.to(dense.dtype)
        sparse = tokens if sparse is None else torch.cat([sparse, tokens], dim=2)
    masks, iou = sam.mask_decoder(
        image_embeddings=image_embeddings,
        image_positional_embeddings=positions,
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask_output,
    )
    return masks[:, 0], iou[:, 0]


def upscale_masks(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, M, h, w) low-resolution logits -> (B, M, H, W) (bilinear, as SAM's post-processing for a square
    image that filled SAM's input)."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def resolve_sam(name: str) -> str:
    """A local SAM folder as an absolute path (bundles must not depend on the working directory); a shipped
    ``"asset:..."`` name or a hub id as is."""
    if name.startswith(ASSET_PREFIX):
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else str(name)


def load_sam(name: str, dtype: torch.dtype = torch.float32):
    """A ``SamModel`` by folder or hub id, in ``dtype`` whatever its files hold (fp16 checkpoints, like the shipped
    ShapesWorld SAM, are up-cast: mmkit keeps frozen models in fp32 and leaves lower precision to autocast)."""
    from transformers import SamModel

    try:
        return SamModel.from_pretrained(resolve_asset(resolve_sam(name)), dtype=dtype).eval()
    except (OSError, ValueError) as err:
        raise ValueError(f"SAM {name!r}: no SAM checkpoint there ({str(err).splitlines()[0]}); train one "
                         "with recipes/segment/pretrain_sam.py or name a SamModel folder / hub id") from None
