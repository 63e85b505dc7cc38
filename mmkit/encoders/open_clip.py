"""open_clip image towers as frozen encoders: ``open_clip:ARCH@PRETRAINED``.

``PRETRAINED`` is one of open_clip's tags for ARCH (``open_clip.list_pretrained_tags_by_model``), a local
checkpoint file (read with ``weights_only=True``), or ``none`` for random init from the architecture's
config. Only the image tower is kept; the text tower is dropped after loading.

What comes out (the tower's last block, via open_clip's ``forward_intermediates``):

* tokens (B, P + h*w, D): the final-norm (``ln_post``) output of the last transformer block, prefix
  tokens first (P = 1, the CLS token, for open_clip's own ViTs), then the h x w patch tokens row by row.
  D is the tower width (768 for ViT-B-32), not the joint embedding width. For ResNet / timm-trunk towers
  the tokens are the last feature map flattened (no prefix). With ``token_grid`` only the patch grid,
  pooled to g x g, is kept.
* pooled (B, D): the normed CLS token for towers that pool by CLS (``pool_type == 'tok'``), else the
  mean of the patch tokens.
* image_embeds (B, E): the model's image embedding (what ``CLIP.encode_image`` returns, unnormalised).

Preprocessing is open_clip's own eval transform for that model and tag (resize, center crop, normalise).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..hub import hub_offline
from .base import EncoderOutput, EncoderSpec, VisionEncoder, check_pixels, close_names, tokens_from_map

logger = logging.getLogger("mmkit.encoders")


class OpenClipEncoder(VisionEncoder):
    """A frozen open_clip image tower (``model.visual``)."""

    token_layout = (
        "prefix (CLS) then patches, after ln_post; pooled: CLS (or patch mean); image_embeds: projected"
    )

    def __init__(
        self,
        visual: torch.nn.Module,
        transform,
        *,
        spec: str,
        image_size: tuple[int, int],
        token_grid: int | None = None,
    ):
        super().__init__(visual, spec=spec, image_size=image_size, token_grid=token_grid)
        self.transform = transform  # open_clip eval transform: PIL RGB -> (3, H, W)
        trunk = getattr(visual, "trunk", None)  # timm-trunk towers
        self._has_prefix = hasattr(visual, "class_embedding") or getattr(trunk, "num_prefix_tokens", 0) > 0
        self._cls_pooled = (
            getattr(visual, "pool_type", None) == "tok" or getattr(trunk, "global_pool", None) == "token"
        )

    def _preprocess_rgb(self, images) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in images])  # (B, 3, H, W)

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        """pixel_values (B, 3, H, W) -> tokens (B, N, D), pooled (B, D), image_embeds (B, E)."""
        out = self.backbone.forward_intermediates(
            check_pixels(self, pixel_values),
            indices=1,
            normalize_intermediates=True,
            output_fmt="NCHW",
            output_extra_tokens=self._has_prefix,
        )
        feature_map = out["image_intermediates"][-1]  # (B, D, h, w)
        prefixes = out.get("image_intermediates_prefix")
        prefix = prefixes[-1] if prefixes else None  # (B, P, D)
        tokens = tokens_from_map(feature_map, prefix, self.token_grid)
        if self._cls_pooled and prefix is not None:
            pooled = prefix[:, 0]  # (B, D)
        else:
            pooled = feature_map.mean(dim=(2, 3))  # (B, D)
        return EncoderOutput(tokens=tokens, pooled=pooled, image_embeds=out.get("image_features"))


def _check_pretrained(spec: EncoderSpec, open_clip) -> str | None:
    """Validate the part after '@'; returns what to pass as ``pretrained`` (None = random init)."""
    tags = open_clip.list_pretrained_tags_by_model(spec.name)
    shown = ", ".join(tags) if tags else "(no published tags for this architecture)"
    if spec.pretrained is None:
        raise ValueError(
            f"encoder spec '{spec}' names no weights. Accepted form: open_clip:ARCH@PRETRAINED, with "
            f"PRETRAINED one of: {shown}; a checkpoint file; or 'none' for random init "
            f"(e.g. 'open_clip:{spec.name}@{tags[0] if tags else 'none'}')."
        )
    if spec.pretrained.lower() == "none":
        return None
    if spec.pretrained in tags or Path(spec.pretrained).expanduser().is_file():
        return spec.pretrained
    raise ValueError(
        f"encoder spec '{spec}': {spec.pretrained!r} is neither an open_clip tag for {spec.name} nor an "
        f"existing checkpoint file.{close_names(spec.pretrained, tags)} Tags for {spec.name}: {shown}; or 'none'."
    )


def load(
    spec: EncoderSpec, *, token_grid: int | None, image_size: tuple[int, int] | None, dtype: torch.dtype
) -> OpenClipEncoder:
    """Backend loader for ``open_clip:ARCH@PRETRAINED`` (called by :func:`mmkit.encoders.load_encoder`)."""
    import open_clip

    if spec.name not in open_clip.list_models():
        raise ValueError(
            f"encoder spec '{spec}': open_clip has no architecture {spec.name!r}."
            f"{close_names(spec.name, open_clip.list_models())} Accepted form: open_clip:ARCH@PRETRAINED; "
            "open_clip.list_models() lists architectures, open_clip.add_model_config(path) adds your own."
        )
    pretrained = _check_pretrained(spec, open_clip)
    try:
        model, _, transform = open_clip.create_model_and_transforms(
            spec.name,
            pretrained=pretrained,
            force_image_size=image_size,
            pretrained_text=False,  # the text tower is dropped; never fetch its base weights
            weights_only=True,
        )
    except RuntimeError as err:
        if pretrained is not None and "download" in str(err).lower():
            where = (
                "HF_HUB_OFFLINE is set and they are not in the local cache"
                if hub_offline()
                else "the download failed"
            )
            raise RuntimeError(
                f"encoder spec '{spec}': pretrained weights unavailable ({where}). Pass a local checkpoint "
                f"file after '@', or use 'open_clip:{spec.name}@none' for random init. ({err})"
            ) from None
        raise
    visual = model.visual.to(dtype)
    del model  # drops the text tower
    size = getattr(visual, "preprocess_cfg", {}).get("size") or visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return OpenClipEncoder(visual, transform, spec=str(spec), image_size=size, token_grid=token_grid)
