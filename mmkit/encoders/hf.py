"""transformers vision towers as frozen encoders: ``hf:REPO_OR_PATH``.

REPO_OR_PATH is a local ``save_pretrained`` folder, or a hub id that is already in the local cache (with
``HF_HUB_OFFLINE=1`` nothing is downloaded). The folder needs the model's ``config.json`` + weights and an
image-processor config (``preprocessor_config.json``); preprocessing is ``AutoImageProcessor`` from the
same place.

Which model class: ``CLIPVisionModel`` for CLIP (a full ``CLIPModel`` checkpoint loads just its vision
tower), ``SiglipVisionModel`` for SigLIP (likewise), else ``AutoModel`` - anything whose output has
``last_hidden_state`` (and ideally ``pooler_output``).

What comes out:

* CLIP: tokens = ``last_hidden_state`` (B, 1 + h*w, D), the last encoder layer's output *before*
  ``post_layernorm``, CLS first; pooled = ``pooler_output`` = ``post_layernorm(CLS)`` (B, D).
* SigLIP: tokens = ``last_hidden_state`` (B, h*w, D) after ``post_layernorm``, no CLS; pooled = the
  attention-pooling head's output (B, D).
* Other ViT-like models: tokens = ``last_hidden_state``; pooled = ``pooler_output`` if it is (B, D),
  else the token mean. CNNs whose ``last_hidden_state`` is a map (B, C, h, w): tokens = the map flattened.
* With ``token_grid``: the patch grid (from ``config.patch_size``) pooled to g x g; prefix tokens dropped.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

import torch

from ..hub import hub_offline
from .base import EncoderOutput, EncoderSpec, VisionEncoder, check_pixels, split_prefix, tokens_from_map

# config.model_type -> transformers class holding just the vision tower.
VISION_TOWERS: dict[str, str] = {
    "clip": "CLIPVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
}


class HFVisionEncoder(VisionEncoder):
    """A frozen transformers vision model plus its image processor."""

    token_layout = "last_hidden_state (CLIP: CLS + patches, pre post_layernorm); pooled: pooler_output"

    def __init__(
        self,
        model: torch.nn.Module,
        processor,
        *,
        spec: str,
        image_size: tuple[int, int],
        token_grid: int | None = None,
        processor_kwargs: dict | None = None,
        interpolate_pos_encoding: bool = False,
    ):
        super().__init__(model, spec=spec, image_size=image_size, token_grid=token_grid)
        self.processor = processor
        self.processor_kwargs = dict(processor_kwargs or {})  # size overrides passed on every call
        self._forward_kwargs = {"interpolate_pos_encoding": True} if interpolate_pos_encoding else {}
        patch = getattr(getattr(model, "config", None), "patch_size", None)
        self._patch_grid = (
            (image_size[0] // patch, image_size[1] // patch) if isinstance(patch, int) else None
        )

    def _preprocess_rgb(self, images) -> torch.Tensor:
        return process(self.processor, images, self.processor_kwargs)  # (B, 3, H, W)

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        """pixel_values (B, 3, H, W) -> tokens (B, N, D), pooled (B, D)."""
        out = self.backbone(pixel_values=check_pixels(self, pixel_values), **self._forward_kwargs)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            raise TypeError(f"{self.spec}: {type(self.backbone).__name__} output has no last_hidden_state")
        pooler = getattr(out, "pooler_output", None)
        if hidden.ndim == 4:  # CNN feature map (B, C, h, w)
            tokens = tokens_from_map(hidden, None, self.token_grid)
            all_tokens = hidden.flatten(2).transpose(1, 2)  # (B, h*w, C)
        else:  # (B, N, D)
            all_tokens = hidden
            tokens = hidden if self.token_grid is None else self._grid_tokens(hidden)
        if pooler is not None and pooler.ndim > 2:
            pooler = pooler.flatten(1)  # e.g. ResNetModel's (B, C, 1, 1)
        if pooler is None or pooler.shape != (hidden.shape[0], all_tokens.shape[-1]):
            pooler = all_tokens.mean(dim=1)  # (B, D)
        return EncoderOutput(tokens=tokens, pooled=pooler)

    def _grid_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._patch_grid is None:
            raise ValueError(
                f"{self.spec}: token_grid needs config.patch_size, which this model lacks; use token_grid=None"
            )
        _, feature_map = split_prefix(hidden, self._patch_grid, self.spec)
        return tokens_from_map(feature_map, None, self.token_grid)


def process(processor, images, processor_kwargs: dict) -> torch.Tensor:
    """Run an image processor -> pixel_values (B, 3, H, W) float32."""
    return processor(images=list(images), return_tensors="pt", **processor_kwargs)["pixel_values"].float()


def _size_overrides(processor, image_size: tuple[int, int]) -> dict:
    """Processor call kwargs that make it output (H, W) = image_size."""
    height, width = image_size
    size = getattr(processor, "size", None)
    kwargs = {}
    if getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None) is not None:
        kwargs["crop_size"] = {"height": height, "width": width}
        if size is not None and getattr(size, "shortest_edge", None):
            kwargs["size"] = {"shortest_edge": min(height, width)}
        else:
            kwargs["size"] = {"height": height, "width": width}
    else:
        kwargs["size"] = {"height": height, "width": width}
    return kwargs


def _output_size(processor, processor_kwargs: dict, spec: str) -> tuple[int, int]:
    """The (H, W) the processor produces, checked on two dummy images of different aspect ratios."""
    from PIL import Image

    shapes = {
        tuple(process(processor, [Image.new("RGB", size)], processor_kwargs).shape[-2:])
        for size in ((320, 240), (200, 290))
    }
    if len(shapes) != 1:
        raise ValueError(
            f"encoder spec '{spec}': the image processor's output size depends on the input's aspect ratio "
            f"({sorted(shapes)}), so images cannot be batched; pass image_size=SIZE to fix it"
        )
    return shapes.pop()


@contextlib.contextmanager
def _quiet_transformers():
    # Loading a vision tower out of a full CLIP/SigLIP checkpoint reports every unused text weight.
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def load(
    spec: EncoderSpec, *, token_grid: int | None, image_size: tuple[int, int] | None, dtype: torch.dtype
) -> HFVisionEncoder:
    """Backend loader for ``hf:REPO_OR_PATH`` (called by :func:`mmkit.encoders.load_encoder`)."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor

    source = spec.name
    path = Path(source).expanduser()
    if path.is_dir():
        source = str(path)
    elif path.exists():
        raise ValueError(
            f"encoder spec '{spec}': {source!r} is a file; pass the save_pretrained folder that holds it"
        )
    elif source.startswith((".", "/", "~")):
        raise ValueError(
            f"encoder spec '{spec}': no such folder {source!r}; pass a save_pretrained folder or a hub id"
        )
    offline_note = " (HF_HUB_OFFLINE is set, so only the local cache is searched)" if hub_offline() else ""
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"encoder spec '{spec}': no model config found for {source!r}{offline_note}. Accepted form: "
            f"hf:REPO_OR_PATH with a folder holding config.json + weights + preprocessor_config.json, or a "
            f"cached hub id. ({err})"
        ) from None
    class_name = VISION_TOWERS.get(config.model_type, "AutoModel")
    model_class = getattr(transformers, class_name)
    with _quiet_transformers():
        model = model_class.from_pretrained(source, dtype=dtype)
    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"encoder spec '{spec}': no image processor config for {source!r}{offline_note}; save one next to "
            f"the model with processor.save_pretrained(path). ({err})"
        ) from None

    processor_kwargs = _size_overrides(processor, image_size) if image_size is not None else {}
    final_size = _output_size(processor, processor_kwargs, str(spec))
    native = getattr(getattr(config, "vision_config", config), "image_size", None)
    native = (native, native) if isinstance(native, int) else native
    accepts_interpolation = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
    interpolate = native is not None and tuple(native) != final_size and accepts_interpolation
    return HFVisionEncoder(
        model,
        processor,
        spec=str(spec),
        image_size=final_size,
        token_grid=token_grid,
        processor_kwargs=processor_kwargs,
        interpolate_pos_encoding=interpolate,
    )
