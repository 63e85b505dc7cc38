"""One protocol for frozen vision encoders, the spec strings that name them, and ``load_encoder``.

A spec names a backend and a model::

    open_clip:ViT-B-32@openai     open_clip architecture @ pretrained tag (or a checkpoint file, or "none")
    hf:openai/clip-vit-base-patch32   a transformers vision tower (hub id, cached offline, or a local folder)
    timm:tf_efficientnet_lite0    a timm model with its pretrained weights; "timm:NAME@none" = random init

``load_encoder(spec)`` returns a :class:`VisionEncoder`: a frozen ``nn.Module`` that turns images into
tokens (B, N, D) and a pooled vector (B, D). What "tokens" and "pooled" are for each backend is written in
that backend's module docstring and in :attr:`VisionEncoder.token_layout`.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import StrictConfig
from ..registry import Registry

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    ImageInput = Image.Image | str | Path | np.ndarray | bytes

logger = logging.getLogger("mmkit.encoders")


@dataclass
class EncoderOutput:
    """What every encoder returns.

    tokens: (B, N, D) token features, N = ``encoder.num_tokens``, D = ``encoder.dim``.
    pooled: (B, D) one vector per image, in the same D-wide space as the tokens.
    image_embeds: (B, E) the model's own projected image embedding when it has one (CLIP-style
        contrastive models: E = the joint image-text width), else None.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor
    image_embeds: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # (B, N) real tokens, for inputs of different lengths (clips); None = all


@dataclass
class EncoderConfig(StrictConfig):
    """Serialisable arguments of :func:`load_encoder`: ``load_encoder(**cfg.to_dict())``."""

    spec: str = ""
    token_grid: int | None = None
    image_size: int | None = None
    dtype: str = "float32"


class VisionEncoder(nn.Module):
    """A frozen image encoder: ``encode(images) -> EncoderOutput(tokens (B, N, D), pooled (B, D))``.

    Subclasses wrap one backend. The backbone is frozen at construction (no parameter requires grad) and
    stays in eval mode: ``train()`` is overridden so dropout/batch-norm never switch to training
    behaviour when a parent module is put in training mode. Gradients still flow to the *input* of
    ``forward`` (useful for attribution or attacks); ``encode`` runs under ``torch.no_grad()``.

    Attributes:
        spec: the spec string this encoder was loaded from.
        image_size: (H, W) that ``preprocess`` produces and ``forward`` expects.
        token_grid: if set, the spatial map is adaptive-average-pooled to ``g x g`` tokens (prefix
            tokens such as CLS are then dropped; ``pooled`` is unchanged).
        dim: D, token width. num_tokens: N at ``image_size``. Both are measured with one dry forward
            at ``image_size`` on first access, then cached.
        token_layout: one line saying what the tokens and pooled vector are for this backend.
    """

    token_layout: str = ""

    def __init__(
        self,
        backbone: nn.Module,
        *,
        spec: str,
        image_size: tuple[int, int],
        token_grid: int | None = None,
    ):
        super().__init__()
        if token_grid is not None and (not isinstance(token_grid, int) or token_grid < 1):
            raise ValueError(f"token_grid must be a positive int or None, got {token_grid!r}")
        self.backbone = backbone
        self.spec = spec
        self.image_size = image_size
        self.token_grid = token_grid
        self._probed: tuple[int, int] | None = None  # (N, D)
        self.backbone.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> VisionEncoder:
        """Frozen: always stays in eval mode, whatever ``mode`` says (so ``model.train()`` is safe)."""
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dim(self) -> int:
        """D: width of every token and of ``pooled``."""
        return self._probe()[1]

    @property
    def num_tokens(self) -> int:
        """N: tokens per image at ``image_size`` (``token_grid ** 2`` when a token grid is set)."""
        if self.token_grid is not None:
            return self.token_grid**2
        return self._probe()[0]

    def _probe(self) -> tuple[int, int]:
        if self._probed is None:
            pixels = torch.zeros(1, 3, *self.image_size, dtype=self.dtype, device=self.device)
            with torch.no_grad():
                tokens = self.forward(pixels).tokens  # (1, N, D)
            self._probed = (tokens.shape[1], tokens.shape[2])
        return self._probed

    def preprocess(self, images: Sequence[ImageInput] | ImageInput) -> torch.Tensor:
        """Images (PIL images of any mode, paths, numpy arrays, file bytes) -> pixel_values (B, 3, H, W) float32.

        Uses the model's own resizing, cropping and normalisation. Every input first goes through
        :func:`mmkit.data.images.load_image` (any mode -> RGB, full decode, clear errors).
        A single image (not in a list) gives B = 1.
        """
        import numpy as np
        from PIL import Image

        from ..data.images import load_image

        if isinstance(images, (str, Path, Image.Image, np.ndarray, bytes)):
            images = [images]
        rgb = [load_image(image) for image in images]
        if not rgb:
            raise ValueError("preprocess got an empty list of images; pass at least one")
        return self._preprocess_rgb(rgb)

    def _preprocess_rgb(self, images: list[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def view_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The part of a ``width`` x ``height`` image that ``preprocess`` keeps, as (x0, y0, x1, y1) in the
        image's pixels (pixel i spans [i, i + 1)): what the token grid covers (e.g. timm's centre crop keeps
        the middle 87.5%; CLIP's the middle square). Measured, not read from a config, so it holds for every
        backend: colour ramps along x and y go through ``preprocess`` and black / white images undo its
        per-channel normalisation. Accurate to about 1/256 of the side (8-bit ramps); cached per size."""
        import numpy as np
        from PIL import Image

        cache = self.__dict__.setdefault("_view_boxes", {})
        if (width, height) not in cache:
            x = np.broadcast_to(np.linspace(0.0, 255.0, width)[None, :], (height, width))
            y = np.broadcast_to(np.linspace(0.0, 255.0, height)[:, None], (height, width))
            ramp = Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).round().astype(np.uint8))
            black, white, seen = self._preprocess_rgb([Image.new("RGB", (width, height), c) for c in
                                                       ((0, 0, 0), (255, 255, 255))] + [ramp]).double()
            u = (seen[0] - black[0]) / (white[0] - black[0]) * (width - 1)  # (h, w): source x of each pixel centre
            v = (seen[1] - black[1]) / (white[1] - black[1]) * (height - 1)
            x0, x1 = _edges(u.median(dim=0).values)  # per output column, then a line through the middle half
            y0, y1 = _edges(v.median(dim=1).values)
            cache[width, height] = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))
        return cache[width, height]

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        """pixel_values (B, 3, H, W) as made by ``preprocess`` -> EncoderOutput (tokens (B, N, D), pooled (B, D))."""
        raise NotImplementedError

    def encode(self, images: Sequence[ImageInput] | ImageInput) -> EncoderOutput:
        """``forward(preprocess(images))`` under ``torch.no_grad()``, on the encoder's device and dtype."""
        pixel_values = self.preprocess(images).to(device=self.device, dtype=self.dtype)
        with torch.no_grad():
            return self.forward(pixel_values)

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, image_size={self.image_size}, token_grid={self.token_grid}"


def _edges(centres: torch.Tensor) -> tuple[float, float]:
    """Source coordinates of the output pixels' centres (S,) -> the outer edges of the first and last output pixels
    (pixel i spans [i, i + 1)). A line fitted through the middle half: resizing maps output to source linearly,
    while the border pixels of a ramp are clamped or blurred."""
    n = centres.shape[0]
    j = torch.arange(n, dtype=torch.float64)
    mid = slice(n // 4, max(n - n // 4, n // 4 + 2))
    slope, intercept = torch.linalg.lstsq(torch.stack([j[mid], torch.ones_like(j[mid])], 1),
                                          centres[mid].double()[:, None]).solution[:, 0].tolist()
    return intercept - 0.5 * slope + 0.5, intercept + (n - 0.5) * slope + 0.5


def check_pixels(encoder: VisionEncoder, pixel_values: torch.Tensor) -> torch.Tensor:
    """Validate (B, 3, H, W) and cast to the encoder's dtype/device."""
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(
            f"{encoder.spec}: pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}; "
            f"make them with encoder.preprocess(images)"
        )
    return pixel_values.to(device=encoder.device, dtype=encoder.dtype)


def tokens_from_map(
    feature_map: torch.Tensor, prefix: torch.Tensor | None, token_grid: int | None
) -> torch.Tensor:
    """feature_map (B, D, h, w), prefix (B, P, D) or None -> tokens (B, N, D).

    Without ``token_grid``: N = P + h*w (prefix first, then the map row by row). With it: the map is
    adaptive-average-pooled to g x g and N = g*g (prefix dropped, so N is the same for every backend).
    """
    if token_grid is not None:
        feature_map = nn.functional.adaptive_avg_pool2d(feature_map, token_grid)  # (B, D, g, g)
    tokens = feature_map.flatten(2).transpose(1, 2)  # (B, h*w, D)
    if prefix is not None and token_grid is None:
        tokens = torch.cat([prefix, tokens], dim=1)  # (B, P + h*w, D)
    return tokens


def split_prefix(tokens: torch.Tensor, grid: tuple[int, int], spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, P + h*w, D) of a ViT -> prefix (B, P, D), feature_map (B, D, h, w)."""
    h, w = grid
    prefix_len = tokens.shape[1] - h * w
    if prefix_len < 0:
        raise ValueError(
            f"{spec}: {tokens.shape[1]} tokens cannot hold a {h}x{w} patch grid; cannot apply token_grid"
        )
    patches = tokens[:, prefix_len:]  # (B, h*w, D)
    feature_map = patches.transpose(1, 2).unflatten(2, (h, w))  # (B, D, h, w)
    return tokens[:, :prefix_len], feature_map


# ---------------------------------------------------------------------------------------------------
# Spec parsing and the backend registry


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed spec: ``backend:name[@pretrained]``. ``pretrained`` is None when no ``@`` was given."""

    backend: str
    name: str
    pretrained: str | None = None

    def __str__(self) -> str:
        return f"{self.backend}:{self.name}" + (f"@{self.pretrained}" if self.pretrained is not None else "")


@dataclass(frozen=True)
class EncoderFamily:
    """How to load the specs of one prefix. ``loader(spec, token_grid=, image_size=, dtype=) -> VisionEncoder``."""

    form: str
    example: str
    loader: str | Callable[..., VisionEncoder]  # "module:function" imported on first use
    split_at: bool = True  # whether "@" separates name and pretrained


ENCODER_FAMILIES: Registry[EncoderFamily] = Registry("encoder family")
ENCODER_FAMILIES.register(
    "open_clip", EncoderFamily("open_clip:ARCH@PRETRAINED", "open_clip:ViT-B-32@openai", "mmkit.encoders.open_clip:load")
)
ENCODER_FAMILIES.register(
    "hf", EncoderFamily("hf:REPO_OR_PATH", "hf:openai/clip-vit-base-patch32", "mmkit.encoders.hf:load", split_at=False)
)
ENCODER_FAMILIES.register(
    "timm", EncoderFamily("timm:NAME[@none]", "timm:tf_efficientnet_lite0", "mmkit.encoders.timm:load")
)
ENCODER_FAMILIES.register(
    "av", EncoderFamily("av:IMAGE_SPEC+AUDIO", "av:timm:tf_efficientnet_lite0+openai/whisper-tiny.en",
                        "mmkit.encoders.av:load", split_at=False)
)


def register_encoder_family(prefix: str, family: EncoderFamily, *, replace: bool = False) -> None:
    """Add a spec prefix, e.g. for an in-house encoder: ``register_encoder_family("mine", EncoderFamily(...))``."""
    if not prefix.isidentifier():
        raise ValueError(f"encoder family prefix must be an identifier like 'open_clip', got {prefix!r}")
    ENCODER_FAMILIES.register(prefix, family, replace=replace)


def accepted_forms() -> str:
    return ", ".join(f"{f.form} (e.g. {f.example})" for _, f in ENCODER_FAMILIES.items())


def parse_spec(spec: str) -> EncoderSpec:
    """``"timm:resnet18@none"`` -> EncoderSpec("timm", "resnet18", "none"). Raises ValueError on unknown prefixes."""
    if not isinstance(spec, str):
        raise TypeError(
            f"encoder spec must be a str like 'timm:tf_efficientnet_lite0', got {type(spec).__name__}"
        )
    prefix, colon, rest = spec.partition(":")
    prefix = prefix.strip()
    if not colon or prefix not in ENCODER_FAMILIES or not rest.strip():
        known_prefix = colon and prefix in ENCODER_FAMILIES
        close = (
            []
            if known_prefix or not colon
            else difflib.get_close_matches(prefix, list(ENCODER_FAMILIES), n=1, cutoff=0.5)
        )
        hint = f" Did you mean '{close[0]}:{rest}'?" if close else ""
        what = "has no model name" if known_prefix else "has no known backend prefix"
        raise ValueError(f"encoder spec {spec!r} {what}. Accepted forms: {accepted_forms()}.{hint}")
    rest = rest.strip()
    if not ENCODER_FAMILIES.get(prefix).split_at:
        return EncoderSpec(prefix, rest)
    name, at, pretrained = rest.partition("@")
    if at and not pretrained:
        raise ValueError(
            f"encoder spec {spec!r} ends with '@'; give a pretrained tag after it or 'none' for random init"
        )
    return EncoderSpec(prefix, name.strip(), pretrained.strip() if at else None)


def close_names(name: str, candidates: Sequence[str], n: int = 5) -> str:
    """' Close names: a, b, c.' (or '') - used by the backends' unknown-name errors."""
    lowered = {c.lower(): c for c in candidates}
    found = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
    return f" Close names: {', '.join(lowered[f] for f in found)}." if found else ""


def as_image_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return size  # type: ignore[return-value]


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(
            f"dtype must be a floating torch.dtype or its name ('float32', 'bfloat16'), got {dtype!r}"
        )
    return resolved


def load_encoder(
    spec: str,
    *,
    token_grid: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> VisionEncoder:
    """Load a frozen vision encoder by spec (see the module docstring for the accepted forms).

    token_grid: pool the spatial token map to ``g x g`` tokens (N = g*g).
    image_size: input size (int or (H, W)) instead of the model's default; preprocessing follows.
    dtype: parameter dtype (fp32 is the right default on CPU).
    Never downloads when ``HF_HUB_OFFLINE=1``.
    """
    parsed = parse_spec(spec)
    loader = ENCODER_FAMILIES.get(parsed.backend).loader
    if isinstance(loader, str):
        module_name, _, function_name = loader.partition(":")
        loader = getattr(importlib.import_module(module_name), function_name)
    start = time.perf_counter()
    encoder = loader(
        parsed, token_grid=token_grid, image_size=as_image_size(image_size), dtype=as_dtype(dtype)
    )
    logger.info("loaded %s in %.2f s", spec, time.perf_counter() - start)
    return encoder


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
