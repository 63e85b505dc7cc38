"""NeTI: a neural space-time mapper for personalization (Alaluf et al., "A Neural Space-Time Representation
for Text-to-Image Personalization", SIGGRAPH Asia 2023).

A concept token (``<S*>``) gets a different input embedding for every denoising timestep t and every
cross-attention layer l of the UNet. :class:`NeTIMapper` computes it:

    (t, l) -> random Fourier features [sin(Wx); cos(Wx)] / norm   (2 * 1024 = 2048-d; W ~ N(0, diag(s_t, s_l)),
                                                                    sigma_t 0.03, sigma_l 2.0, x = (t, l))
           -> Linear(2048, 160)   weights = the encodings of 10 time anchors x the layers (a kernel layer)
           -> Linear(160, 128) -> LayerNorm -> LeakyReLU -> Linear(128, 128) -> LayerNorm -> LeakyReLU
           -> nested dropout (training: with probability 0.5 zero dims k..127, k ~ U[0, 128) per row;
              inference: a truncation index trades fidelity for editability)
           -> Linear(128, 2d)    = token embedding (d) + textual bypass (d), re-scaled to the norm of the
                                   super-category word's embedding

Injection (:class:`NeTIPatch`, keyed by the UNet's cross-attention processor paths, no call counting):
at every denoising step the text encoder runs once, batched over the cross-attention layers, with the
mapper's token at the concept position; before its final LayerNorm the concept position gets the bypass
``h + 0.2 * (b / |b|) * |h|``. Each cross-attention layer takes its keys from the plain per-layer states
and its values from the bypassed ones. The timestep comes from the denoising context (the pipeline's
scheduler, or the UNet call), so it works on current diffusers pipelines and on mmkit's pixel pipeline.

    mapper, _ = load_adapter("outputs/neti-cross/final")
    with patch(pipe, NeTIPatch(mapper, truncation=16)):
        image = pipe("a blue <S*>").images[0]

Official code and paper differ in one place, behind a switch (``NeTIConfig.rescale``): the official
mapper re-scales its whole output (token and bypass, 2d values) to the super-category norm
(``"output"``, the default, what the published numbers come from); the paper describes re-scaling the
token embedding (``"token"``: the token half alone gets the norm, the bypass is re-scaled later anyway).
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..adapters import Adapter, AdapterConfig, register_adapter
from .context import unet_call_inputs
from .patch import Patch, PatchTarget
from .processors import MmkitAttnProcessor

RESCALE = ("output", "token")


@dataclass
class NeTIConfig(AdapterConfig):
    token_dim: int = 768  # the text encoder's hidden size (CLIP ViT-L/14: 768 in SD 1.x)
    num_layers: int = 16  # cross-attention layers of the UNet it serves (SD 1.x: 16)
    layers: tuple[str, ...] = ()  # their processor paths, in the order of the layer index (empty: not recorded)
    placeholder: str = "<S*>"
    super_category: str = "object"  # one-token word: initial embedding of the concept and the output norm
    norm_scale: float | None = None  # the super-category embedding's norm (set by the training recipe)
    rescale: str = "output"  # "output" (official code: the whole 2d output) or "token" (the paper's wording)
    num_frequencies: int = 1024
    sigma_t: float = 0.03
    sigma_l: float = 2.0
    time_anchors: int = 10
    num_train_timesteps: int = 1000
    hidden_dim: int = 128
    output_bypass: bool = True
    bypass_scale: float = 0.2
    nested_dropout: float = 0.5
    encoding_seed: int = 0  # seed of the random Fourier matrix W (saved with the weights anyway)

    def __post_init__(self) -> None:
        for name in ("token_dim", "num_layers", "num_frequencies", "time_anchors", "num_train_timesteps", "hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"NeTIConfig.{name} must be >= 1, got {getattr(self, name)}")
        self.layers = tuple(self.layers)
        if self.layers and len(self.layers) != self.num_layers:
            raise ValueError(f"NeTIConfig: {len(self.layers)} layer paths for num_layers={self.num_layers}")
        if self.rescale not in RESCALE:
            raise ValueError(f"NeTIConfig.rescale must be one of {RESCALE}, got {self.rescale!r}")
        if not 0.0 <= self.nested_dropout <= 1.0:
            raise ValueError(f"NeTIConfig.nested_dropout is a probability, got {self.nested_dropout}")
        if self.norm_scale is not None and self.norm_scale <= 0:
            raise ValueError(f"NeTIConfig.norm_scale must be > 0 (or null), got {self.norm_scale}")
        if not self.placeholder or any(c.isspace() for c in self.placeholder):
            raise ValueError(f"NeTIConfig.placeholder must be one word without spaces, got {self.placeholder!r}")
        if self.time_anchors > self.num_train_timesteps:
            raise ValueError(f"NeTIConfig.time_anchors ({self.time_anchors}) > num_train_timesteps")


class NeTIMapper(Adapter):
    """(timestep, layer index) -> the concept's token embedding (and textual bypass) for that UNet layer."""

    kind = "neti"
    family = "diffusion_mapper"
    config_class = NeTIConfig
    layer_dependent = True  # a different embedding per cross-attention layer

    def __init__(self, config: NeTIConfig) -> None:
        super().__init__(config)
        c = config
        g = torch.Generator().manual_seed(c.encoding_seed)
        w = torch.randn(c.num_frequencies, 2, generator=g)  # (F, 2): columns scaled by sigma_t, sigma_l
        w[:, 0] *= c.sigma_t
        w[:, 1] *= c.sigma_l
        self.register_buffer("frequencies", w)
        anchors = c.time_anchors * c.num_layers
        self.input_layer = nn.Linear(2 * c.num_frequencies, anchors)
        step = c.num_train_timesteps // c.time_anchors
        t = torch.arange(0, c.num_train_timesteps, step)[: c.time_anchors].float()
        t, layer = t.repeat_interleave(c.num_layers), torch.arange(c.num_layers).float().repeat(c.time_anchors)
        with torch.no_grad():  # first layer = the encodings of the (time anchor, layer) grid, time-major
            self.input_layer.weight.copy_(self.encode(t, layer))
        self.net = nn.Sequential(
            nn.Linear(anchors, c.hidden_dim), nn.LayerNorm(c.hidden_dim), nn.LeakyReLU(),
            nn.Linear(c.hidden_dim, c.hidden_dim), nn.LayerNorm(c.hidden_dim), nn.LeakyReLU(),
        )
        self.output_layer = nn.Linear(c.hidden_dim, c.token_dim * (2 if c.output_bypass else 1))

    def encode(self, timesteps: Tensor, layers: Tensor) -> Tensor:
        """Random Fourier features of (t, l): (N,), (N,) -> (N, 2F), unit norm per row."""
        x = torch.stack([timesteps.float(), layers.float()], dim=-1).to(self.frequencies.device)  # (N, 2)
        z = x @ self.frequencies.T  # (N, F)
        v = torch.cat([z.sin(), z.cos()], dim=-1)  # (N, 2F)
        return v / v.norm(dim=-1, keepdim=True)

    def code(self, timesteps: Tensor, layers: Tensor, truncation: int | None = None) -> Tensor:
        """The 128-d code before the output layer, nested dropout / truncation applied: (N,), (N,) -> (N, hidden)."""
        h = self.net(self.input_layer(self.encode(timesteps, layers)))  # (N, hidden)
        dims = torch.arange(h.shape[-1], device=h.device)
        if self.training and self.config.nested_dropout > 0:
            # one coin per batch (as the official code), then a cut per row; tensor ops only (no host sync)
            coin = torch.rand((), device=h.device) < self.config.nested_dropout
            cut = torch.randint(0, h.shape[-1], (h.shape[0], 1), device=h.device)
            h = h * ((dims < cut) | ~coin)
        if truncation is not None:
            h = h * (dims < truncation)
        return h

    def forward(self, timesteps: Tensor, layers: Tensor, truncation: int | None = None) -> tuple[Tensor, Tensor | None]:
        """timesteps (N,), layer indices (N,) -> token embeddings (N, d) and bypass vectors (N, d) or None."""
        c = self.config
        if truncation is not None and not 0 <= truncation <= c.hidden_dim:
            raise ValueError(f"truncation must be in [0, {c.hidden_dim}] (the code's dims), got {truncation}")
        out = self.output_layer(self.code(timesteps, layers, truncation))  # (N, d or 2d)
        token, bypass = (out[:, : c.token_dim], out[:, c.token_dim:]) if c.output_bypass else (out, None)
        if c.norm_scale is not None:
            if c.rescale == "output":
                scale = c.norm_scale / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                token, bypass = token * scale, (bypass * scale if bypass is not None else None)
            else:
                token = F.normalize(token, dim=-1) * c.norm_scale
        return token, bypass


@dataclass
class TextualInversionConfig(AdapterConfig):
    token_dim: int = 768
    placeholder: str = "<S*>"
    super_category: str = "object"  # the training recipe starts the embedding from this word's
    num_layers: int = 0  # one embedding for every layer and timestep: fits any UNet (0)
    bypass_scale: float = 0.2  # unused (no bypass); kept so the patch reads one set of fields
    layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.token_dim < 1:
            raise ValueError(f"TextualInversionConfig.token_dim must be >= 1, got {self.token_dim}")
        if not self.placeholder or any(c.isspace() for c in self.placeholder):
            raise ValueError(f"placeholder must be one word without spaces, got {self.placeholder!r}")
        self.layers = tuple(self.layers)


class TextualInversion(Adapter):
    """Plain textual inversion (Gal et al. 2023): one learned embedding for the concept at every timestep and
    layer, no bypass; NeTI's baseline, served by the same :class:`NeTIPatch`."""

    kind = "textual_inversion"
    family = "diffusion_mapper"
    config_class = TextualInversionConfig
    layer_dependent = False  # one embedding: the text encoder runs once, not once per layer

    def __init__(self, config: TextualInversionConfig) -> None:
        super().__init__(config)
        self.embedding = nn.Parameter(torch.randn(config.token_dim) * 0.02)  # the recipe copies the word's in

    def forward(self, timesteps: Tensor, layers: Tensor, truncation: int | None = None) -> tuple[Tensor, None]:
        """timesteps (N,), layers (N,) -> the embedding repeated (N, d); no bypass. ``truncation`` is ignored."""
        return self.embedding.expand(timesteps.shape[0], -1), None


for _cls in (NeTIMapper, TextualInversion):
    register_adapter(_cls)
CONCEPT_ADAPTERS = (NeTIMapper, TextualInversion)


# ---------------------------------------------------------------------- the text encoder side
def _final_norm_candidates(model: nn.Module) -> list[tuple[str, Any]]:
    text_model = getattr(model, "text_model", model)
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layer", None)
    return [
        ("final_layer_norm or text_model.final_layer_norm (CLIPTextModel / CLIPTextModelWithProjection)",
         getattr(text_model, "final_layer_norm", None)),
        ("encoder.final_layer_norm (T5EncoderModel)", getattr(encoder, "final_layer_norm", None)),
        ("encoder.layer[-1].output.LayerNorm (BertModel and other post-LN encoders)",
         getattr(getattr(layers[-1], "output", None), "LayerNorm", None) if layers is not None and len(layers) else None),
    ]


def final_norm(text_encoder: nn.Module) -> nn.Module:
    """The text encoder's last normalisation, whose input NeTI's bypass is added to."""
    for _, module in _final_norm_candidates(text_encoder):
        if isinstance(module, nn.Module):
            return module
    accepted = "; ".join(name for name, _ in _final_norm_candidates(nn.Module()))
    raise ValueError(f"NeTI cannot find the final layer norm of {type(text_encoder).__name__}; accepted: {accepted}")


class ConceptEncoder:
    """Runs a frozen text encoder with the concept token replaced per layer, and applies the bypass.

    ``placeholder_id``: the concept token's id (may lie beyond the embedding table: it is looked up as
    ``base_id``, the super-category word, and then overwritten). Calls never leave hooks behind.
    """

    def __init__(self, text_encoder: nn.Module, placeholder_id: int, base_id: int, bypass_scale: float = 0.2) -> None:
        self.text_encoder = text_encoder
        self.placeholder_id, self.base_id, self.bypass_scale = int(placeholder_id), int(base_id), bypass_scale
        self.embeddings = text_encoder.get_input_embeddings()
        self.norm = final_norm(text_encoder)

    def lookup_ids(self, input_ids: Tensor) -> Tensor:
        """The ids the embedding table sees: the concept looked up as its super-category word."""
        return torch.where(input_ids == self.placeholder_id, torch.full_like(input_ids, self.base_id), input_ids)

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None, tokens: Tensor,
                 bypass: Tensor | None) -> tuple[Tensor, Tensor]:
        """input_ids (N, L) with the concept somewhere (or nowhere), tokens (N, d), bypass (N, d) or None ->
        (keys context (N, L, d): the plain final states, values context (N, L, d): with the bypass)."""
        at = (input_ids == self.placeholder_id)[..., None]  # (N, L, 1)
        captured: dict[str, Tensor] = {}

        def put_tokens(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            return torch.where(at, tokens[:, None, :].to(output.dtype), output)  # (N, L, d)

        def add_bypass(module: nn.Module, args: tuple, output: Tensor) -> None:
            h = args[0]  # (N, L, d) the final norm's input
            b = bypass / bypass.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (N, d)
            shifted = h + torch.where(at, self.bypass_scale * b[:, None, :].to(h.dtype) * h.norm(dim=-1, keepdim=True), 0.0)
            captured["values"] = module.forward(shifted)  # forward(), not __call__: no hooks re-entered

        handles = [self.embeddings.register_forward_hook(put_tokens)]
        if bypass is not None:
            handles.append(self.norm.register_forward_hook(add_bypass))
        try:
            kwargs = {"attention_mask": attention_mask} if attention_mask is not None else {}
            out = self.text_encoder(input_ids=self.lookup_ids(input_ids), **kwargs)
        finally:
            for h in handles:
                h.remove()
        keys = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return keys, captured.get("values", keys)


# ---------------------------------------------------------------------- UNet side
def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Processor paths of the UNet's cross-attention layers in the order a forward runs them (down blocks, mid
    block, up blocks: the official code's IN01 ... MID ... OUT11), which is NeTI's layer index."""
    from .patch import select_layers

    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(select_layers(unet, kind="cross"), key=lambda path: rank.get(path.split(".")[0], 3))


class NeTIRuntime:
    """What the NeTI processors read during one UNet forward: per-layer key / value contexts
    (num_layers, B, L, d) for the batch's rows and which rows take them (the others attend to the UNet's own
    ``encoder_hidden_states``), or None (then every row does)."""

    def __init__(self) -> None:
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.use: Tensor | None = None  # (B,) bool: rows that take NeTI's contexts (None: every row)
        self.per_prompt: tuple[Tensor, Tensor, Tensor] | None = None  # (n, P, L, d) x2, has-concept (P,)


class NeTIAttnProcessor(MmkitAttnProcessor):
    """Cross-attention whose keys and values come from NeTI's contexts for layer ``index``."""

    def __init__(self, runtime: NeTIRuntime, index: int, backend: str | None = None) -> None:
        super().__init__(backend)
        self.runtime, self.index = runtime, index

    def attend(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None,
               attention_mask: Tensor | None) -> Tensor:
        keys, values, use = self.runtime.keys, self.runtime.values, self.runtime.use
        if encoder_hidden_states is None or keys is None:
            return super().attend(attn, hidden_states, encoder_hidden_states, attention_mask)
        dtype = hidden_states.dtype
        k, v = keys[self.index].to(dtype), values[self.index].to(dtype)  # (B, L, d)
        if use is not None:  # the other rows: the states the UNet was given (after any other patch's pre-hook)
            k = torch.where(use[:, None, None], k, encoder_hidden_states)
            v = torch.where(use[:, None, None], v, encoder_hidden_states)
        return self.attend_to(attn, hidden_states, k, v, attention_mask, cross=True)

    def __repr__(self) -> str:
        return f"NeTIAttnProcessor(layer={self.index}, backend={self.backend!r})"


class _Undo:
    """A handle whose ``remove()`` runs ``fn`` once (what a patch returns for a non-hook change)."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def remove(self) -> None:
        fn, self.fn = self.fn, None
        if fn is not None:
            fn()


class NeTIPatch(Patch):
    """Personalize a pipeline with a trained :class:`NeTIMapper`.

    mapper: the mapper, a folder saved by it (``load_adapter``), or None for a fresh one sized from the UNet
    (untrained). text_encoder / tokenizer: default to the pipeline's. truncation: nested-dropout truncation
    index at inference (None: all 128 dims). auto: follow the pipeline (record the prompts of each run from the
    text encoder's calls, compute the contexts at every step); False for training loops, which call
    :meth:`condition` themselves. cache_size: (prompt, timestep) contexts kept (each num_layers x prompts x L x d
    x 2 values), so sampling the same prompt again does not re-run the mapper and the text encoder.

    Prompt rows: with classifier-free guidance the pipeline's batch is ``[negative, positive]`` (diffusers' order,
    and mmkit's pixel pipeline); the positive prompts are the first text-encoder call of a run, each repeated
    ``num_images_per_prompt`` times. Rows whose prompt has no concept token, and the negative half, keep the
    pipeline's own context. Patch the pipeline, not its UNet: whether a batch is guided is read from it.
    """

    hook_graphs = 1  # the pre-hook that lays the contexts out over the batch rows compiles as its own graph

    def __init__(self, mapper: NeTIMapper | str | None = None, *, text_encoder: nn.Module | None = None,
                 tokenizer: Any = None, truncation: int | None = None, auto: bool = True, cache_size: int = 64,
                 backend: str | None = None) -> None:
        if isinstance(mapper, str):
            from ..adapters import load_adapter

            mapper, _ = load_adapter(mapper, family="diffusion_mapper")
        if mapper is not None and not isinstance(mapper, CONCEPT_ADAPTERS):
            raise TypeError("NeTIPatch needs a NeTIMapper or TextualInversion adapter, a folder saved by one, or None; "
                            f"got {type(mapper).__name__}")
        if truncation is not None and (not isinstance(truncation, int) or truncation < 0):
            raise ValueError(f"truncation must be a non-negative int or None, got {truncation!r}")
        self.mapper, self.text_encoder, self.tokenizer = mapper, text_encoder, tokenizer
        self.truncation, self.auto, self.cache_size, self.backend = truncation, auto, int(cache_size), backend
        self.runtime = NeTIRuntime()
        self.encoder: ConceptEncoder | None = None
        self._cache: OrderedDict = OrderedDict()
        self._pending: list[tuple[Tensor, Tensor | None]] = []
        self._run: tuple | None = None  # (cache key, ids, mask, has-concept) of the sampling run in progress
        self._timesteps: Tensor | None = None
        self._last_step: int | None = None
        self._recording = True

    def describe(self) -> str:
        placeholder = self.mapper.config.placeholder if self.mapper is not None else "<S*>"
        return f"NeTIPatch({placeholder}, truncation={self.truncation})"

    def check_prompts(self, prompts: list[str]) -> None:
        token = self.mapper.config.placeholder if self.mapper is not None else "<S*>"
        if not any(token in p for p in prompts):
            raise ValueError(f"{self.describe()}: no prompt names the concept; write its token {token!r} where the "
                             f"concept goes, e.g. 'a photo of a {token}' (prompts: {prompts[:3]})")

    # ------------------------------------------------------------------ layers
    def processors(self, target: PatchTarget) -> dict[str, Any]:
        paths = cross_attention_layers(target.model)
        if not paths:
            raise ValueError(f"{self.describe()}: {type(target.model).__name__} has no cross-attention layer")
        width = getattr(getattr(target.model, "config", None), "cross_attention_dim", None)
        if self.mapper is None:
            self.mapper = NeTIMapper(NeTIConfig(token_dim=int(width), num_layers=len(paths), layers=tuple(paths)))
            self.mapper.to(next(target.model.parameters()).device)
        c = self.mapper.config
        self.num_layers = len(paths)
        if c.num_layers and c.num_layers != len(paths):
            raise ValueError(
                f"this NeTI mapper was trained for a UNet with {c.num_layers} cross-attention layers, but "
                f"{type(target.model).__name__} has {len(paths)} ({paths[0]} ...); use a mapper trained for this UNet")
        if isinstance(width, int) and width != c.token_dim:
            raise ValueError(f"this NeTI mapper makes {c.token_dim}-d token embeddings, but the UNet's cross-attention "
                             f"takes {width}-d text states (cross_attention_dim); use a mapper trained for this UNet")
        if c.layers and tuple(c.layers) != tuple(paths):
            warnings.warn(f"{self.describe()}: the UNet's cross-attention layer paths differ from those the mapper was "
                          "trained for; layers are matched by their order", stacklevel=3)
        return {path: NeTIAttnProcessor(self.runtime, i, self.backend) for i, path in enumerate(paths)}

    # ------------------------------------------------------------------ text side
    def _setup_text(self, target: PatchTarget) -> list:
        c = self.mapper.config
        text_encoder = self.text_encoder or getattr(target.source, "text_encoder", None)
        tokenizer = self.tokenizer or getattr(target.source, "tokenizer", None)
        if text_encoder is None or tokenizer is None:
            if self.auto and target.source is not None:
                raise ValueError(f"{self.describe()} needs the pipeline's text_encoder and tokenizer (or pass them)")
            return []
        hidden = getattr(getattr(text_encoder, "config", None), "hidden_size", c.token_dim)
        if hidden != c.token_dim:
            raise ValueError(f"this NeTI mapper makes {c.token_dim}-d token embeddings, but the text encoder "
                             f"{type(text_encoder).__name__} has hidden size {hidden}")
        base = tokenizer(c.super_category, add_special_tokens=False)["input_ids"]
        if len(base) != 1:
            raise ValueError(f"the super-category word {c.super_category!r} must be one token of this tokenizer, "
                             f"it is {len(base)}")
        handles: list = []
        if c.placeholder not in tokenizer.get_vocab():
            saved = copy.deepcopy(tokenizer.__dict__)
            tokenizer.add_tokens([c.placeholder])

            def restore() -> None:
                tokenizer.__dict__.clear()
                tokenizer.__dict__.update(saved)

            handles.append(_Undo(restore))
        placeholder_id = tokenizer.convert_tokens_to_ids(c.placeholder)
        self.encoder = ConceptEncoder(text_encoder, placeholder_id, base[0], c.bypass_scale)

        def lookup(module: nn.Module, args: tuple) -> tuple | None:  # the concept's id is looked up as its word's
            return (self.encoder.lookup_ids(args[0]), *args[1:]) if args and isinstance(args[0], Tensor) else None

        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self._recording:
                return
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            if isinstance(ids, Tensor) and ids.dim() == 2 and len(self._pending) < 16:  # a run's first calls
                self._pending.append((ids.detach(), mask.detach() if isinstance(mask, Tensor) else None))

        handles.append(self.encoder.embeddings.register_forward_pre_hook(lookup))
        handles.append(text_encoder.register_forward_pre_hook(record, with_kwargs=True))
        return handles

    def placeholder_id(self) -> int:
        if self.encoder is None:
            raise RuntimeError(f"{self.describe()} is not applied with a text encoder")
        return self.encoder.placeholder_id

    def contexts(self, input_ids: Tensor, attention_mask: Tensor | None, timesteps: Tensor | float,
                 mapper: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        """Per-layer contexts: input_ids (P, L), timesteps scalar or (P,) -> keys, values (num_layers, P, L, d).
        ``mapper``: call this module instead of ``self.mapper`` (a training loop's DDP-wrapped copy of it)."""
        if self.encoder is None:
            raise RuntimeError(f"{self.describe()} is not applied with a text encoder (patch a pipeline, or pass "
                               "text_encoder= and tokenizer=)")
        n, P = self.num_layers, input_ids.shape[0]
        runs = n if getattr(self.mapper, "layer_dependent", True) else 1  # TI: one pass serves every layer
        device = input_ids.device
        t = torch.as_tensor(timesteps, dtype=torch.float32, device=device).reshape(-1).expand(P)  # (P,)
        layers = torch.arange(runs, device=device).repeat_interleave(P)  # (runs*P,) layer-major
        token, bypass = (mapper or self.mapper)(t.repeat(runs), layers, self.truncation)  # (runs*P, d)
        mask = attention_mask.repeat(runs, 1) if attention_mask is not None else None
        self._recording = False
        try:
            keys, values = self.encoder(input_ids.repeat(runs, 1), mask, token, bypass)  # (runs*P, L, d)
        finally:
            self._recording = True
        keys, values = keys.unflatten(0, (runs, P)), values.unflatten(0, (runs, P))
        return (keys, values) if runs == n else (keys.expand(n, -1, -1, -1), values.expand(n, -1, -1, -1))

    def condition(self, input_ids: Tensor, attention_mask: Tensor | None, timesteps: Tensor,
                  mapper: nn.Module | None = None) -> Tensor:
        """For training loops (``auto=False``): set the contexts of the next UNet call, one row per prompt with
        its own timestep; returns the plain context (P, L, d) for the UNet's ``encoder_hidden_states``.
        ``mapper``: the module the loop trains (e.g. DDP-wrapped), called instead of ``self.mapper``."""
        keys, values = self.contexts(input_ids, attention_mask, timesteps, mapper)
        self.runtime.keys, self.runtime.values, self.runtime.use = keys, values, None
        return keys[0]

    def _contexts_cached(self, prompts_key: tuple, ids: Tensor, mask: Tensor | None, t: float) -> tuple[Tensor, Tensor]:
        key = (prompts_key, round(t, 4), self.truncation)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        training = self.mapper.training
        self.mapper.eval()  # sampling: no nested dropout, whatever mode the mapper was left in
        try:
            with torch.no_grad():
                value = self.contexts(ids, mask, t)
        finally:
            self.mapper.train(training)
        if self.cache_size > 0:
            self._cache[key] = value
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return value

    # ------------------------------------------------------------------ following the pipeline
    def _on_step(self, target: PatchTarget, step: int | None) -> None:
        if step is None:  # a run starts (set_timesteps) or the context was reset
            self._last_step = None
            return
        if self._last_step is None or step <= self._last_step:  # a new sampling run: its prompts were just encoded
            self._start_run(target)
        self._last_step = step
        t = None
        if self._timesteps is not None and 0 <= step < len(self._timesteps):
            t = float(self._timesteps[step])  # a CPU copy made when the run started: no device read per step
        elif self._timesteps is None and target.context.timestep is not None:  # no scheduler: the observed one
            t = target.context.timestep
        if self._run is None or t is None:  # (also past the schedule's end: nothing left to compute)
            self.runtime.per_prompt = None
            return
        prompts_key, ids, mask, has = self._run
        keys, values = self._contexts_cached(prompts_key, ids, mask, t)
        self.runtime.per_prompt = (keys, values, has)

    def _start_run(self, target: PatchTarget) -> None:
        """Adopt the run's prompts (its first text-encoder call) and do its host work once: the cache key, which
        prompts name the concept, the schedule's timesteps on the CPU."""
        prompts = self._pending[0] if self._pending else None
        self._pending.clear()
        timesteps = getattr(target.scheduler, "timesteps", None)
        self._timesteps = None if timesteps is None else torch.as_tensor(timesteps).detach().cpu()
        self._run = None
        if prompts is None or self.encoder is None:
            return
        ids, mask = prompts
        has = (ids == self.encoder.placeholder_id).any(dim=1)  # (P,)
        if not bool(has.any()):  # no prompt names the concept: the pipeline's own context everywhere
            token = self.mapper.config.placeholder
            warnings.warn(f"{self.describe()}: no prompt of this run names the concept, so the images are the base "
                          f"model's; write {token!r} where the concept goes, e.g. 'a photo of a {token}'", stacklevel=2)
            return
        key = (ids.cpu().numpy().tobytes(), None if mask is None else mask.cpu().numpy().tobytes(), tuple(ids.shape))
        self._run = (key, ids, mask, has)

    def hooks(self, target: PatchTarget) -> list:
        self._cache.clear()  # contexts of an earlier application (another pipeline, an older mapper) are stale
        self._pending.clear()
        self._run, self._last_step = None, None
        handles = self._setup_text(target)
        if not self.auto:
            return handles
        target.context.subscribe(lambda step: self._on_step(target, step))

        def lay_out(module: nn.Module, args: tuple, kwargs: dict) -> None:
            """Spread the per-prompt contexts over the UNet batch's rows (tensor ops only); other patches' text
            transforms (CLP / WiCLP of the same patch() call) are applied to them as to the UNet's own states."""
            per_prompt = self.runtime.per_prompt
            _, timestep, states = unet_call_inputs(args, kwargs)
            if per_prompt is None or not isinstance(states, Tensor) or states.dim() != 3:
                self.runtime.keys = self.runtime.values = self.runtime.use = None
                return None
            keys, values, has = per_prompt  # (n, P, L, d) x2, (P,)
            n, R, P = keys.shape[0], states.shape[0], keys.shape[1]
            start = R // 2 if target.guided else 0
            if (R - start) % P or states.shape[1] != keys.shape[2]:
                raise ValueError(f"{self.describe()}: the UNet batch has {R} rows of {states.shape[1]} tokens, which "
                                 f"does not fit {P} prompts of {keys.shape[2]} tokens (with or without guidance)")
            r = (R - start) // P
            if timestep is not None:
                timestep = torch.as_tensor(timestep, device=states.device).reshape(-1)
                timestep = timestep[start:].repeat(n) if timestep.numel() == R else timestep  # per flattened row
            head = states[:start].to(keys.dtype).unsqueeze(0).expand(n, -1, -1, -1)  # (n, start, L, d), never read
            laid = []
            for ctx in (keys, values):
                mine = ctx.repeat_interleave(r, dim=1)  # (n, R - start, L, d)
                for transform in target.text_transforms:
                    mine = transform(mine.flatten(0, 1), timestep).unflatten(0, (n, R - start))
                laid.append(torch.cat([head, mine], dim=1))  # (n, R, L, d)
            self.runtime.keys, self.runtime.values = laid
            self.runtime.use = torch.cat([torch.zeros(start, dtype=torch.bool, device=has.device),
                                          has.repeat_interleave(r)])  # (R,)
            return None

        handles.append(target.model.register_forward_pre_hook(lay_out, with_kwargs=True))
        return handles


__all__ = [
    "CONCEPT_ADAPTERS",
    "ConceptEncoder",
    "NeTIAttnProcessor",
    "NeTIConfig",
    "NeTIMapper",
    "NeTIPatch",
    "NeTIRuntime",
    "TextualInversion",
    "TextualInversionConfig",
    "final_norm",
]
