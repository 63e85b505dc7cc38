"""FAVOR's causal Q-Former (Sun et al., 2023): sliding windows of frame tokens -> query tokens for the LLM.

A clip arrives as frame tokens, ``tokens_per_frame`` per frame (visual tokens, with the frame's audio
frames alongside; see :mod:`mmkit.data.av_sync`), (B, T * tokens_per_frame, D) with a (B, N) mask of the
real ones. It is cut into non-overlapping windows of ``frames_per_window`` frames (the last one padded and
masked) and every window of the batch goes through one batched Q-Former call:

- learned query tokens (``num_queries``, N(0, 0.02)) -> LayerNorm -> per layer: query self-attention;
  before each cross-attention, the *causal* part: a masked self-attention over the window's tokens with a
  per-frame block mask (``encoder_attention="past"``: a frame sees itself and earlier frames, as the paper
  describes; ``"future"``: itself and later frames, what the official code's ``triu`` builds; ``"none"``:
  no encoder attention, plain BLIP-2); then cross-attention of the queries to the window's tokens; FFN.
  As in the official code, each layer's causal attention reads the window's tokens as they entered the
  Q-Former and feeds only that layer's cross-attention (``encoder_attention_carry=True``: each layer reads the
  previous layer's output instead, as mmkit did before 2026-11-30). ``encoder_attention_init="identity"``
  (mmkit's switch, not FAVOR's) starts that block's output projection at zero, so at initialisation the
  causal part passes the window tokens through its LayerNorm only (the plain BLIP-2 Q-Former, when window
  positions have normalised them already) and training grows the mixing from there; ``"bert"`` (default)
  initialises it like every other block.
  Attention blocks are BERT-style (post-norm residual). Window tokens get learned per-position embeddings
  and a LayerNorm first (``window_positions``).
- ``Linear(hidden -> llm_dim)`` out: ``num_queries`` tokens per window go to the LLM, so a clip's token
  count depends on its length; the output mask marks each clip's real windows.

Every attention runs through :func:`mmkit.ops.attention`; the whole forward uses static shapes and no host
reads (padded windows are computed and masked, not skipped). ``load_blip2_qformer`` copies a transformers
``Blip2QFormerModel`` (BLIP-2 / InstructBLIP) state dict into the query self-attention, cross-attention and
FFN, which is how FAVOR is initialised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import attention, block_causal, key_padding
from .base import AuxiliaryLosses, Connector, ConnectorConfig, LossContext

ENCODER_ATTENTION = ("past", "future", "none")
ENCODER_ATTENTION_INIT = ("bert", "identity")
DIVERSITY_ON = ("queries", "tokens")


@dataclass
class QFormerConfig(ConnectorConfig):
    """FAVOR's defaults. ``vision_dim`` is the width of a frame token (visual and audio features together)."""

    num_queries: int = 32
    hidden_size: int = 768
    num_layers: int = 2
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_every: int = 1
    encoder_heads: int = 12
    tokens_per_frame: int = 32
    frames_per_window: int = 10
    encoder_attention: str = "past"
    encoder_attention_carry: bool = False
    encoder_attention_init: str = "bert"
    window_positions: bool = True
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    diversity_weight: float = 0.01
    diversity_on: str = "queries"

    def __post_init__(self) -> None:
        if self.diversity_on not in DIVERSITY_ON:
            raise ValueError(f"QFormerConfig.diversity_on must be one of {DIVERSITY_ON}, got {self.diversity_on!r}")
        if self.encoder_attention not in ENCODER_ATTENTION:
            raise ValueError(f"QFormerConfig.encoder_attention must be one of {ENCODER_ATTENTION}, "
                             f"got {self.encoder_attention!r}")
        if self.encoder_attention_init not in ENCODER_ATTENTION_INIT:
            raise ValueError(f"QFormerConfig.encoder_attention_init must be one of {ENCODER_ATTENTION_INIT}, "
                             f"got {self.encoder_attention_init!r}")
        if self.encoder_attention == "none" and self.encoder_attention_init != "bert":
            raise ValueError(f"QFormerConfig.encoder_attention_init={self.encoder_attention_init!r} starts the "
                             "causal encoder attention, and encoder_attention='none' has none; use 'past' or 'future'")
        for name in ("num_queries", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "cross_attention_every", "encoder_heads", "tokens_per_frame", "frames_per_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"QFormerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"QFormerConfig: num_heads {self.num_heads} must divide hidden_size {self.hidden_size}")
        if self.vision_dim and self.encoder_attention != "none" and self.vision_dim % self.encoder_heads:
            raise ValueError(f"QFormerConfig: encoder_heads {self.encoder_heads} must divide the frame token width "
                             f"vision_dim {self.vision_dim}")


class BertAttention(nn.Module):
    """BERT-style attention block: q/k/v projections, :func:`mmkit.ops.attention`, dense, dropout, LayerNorm(+x).

    Module names follow BERT / BLIP-2 (``attention.query`` ..., ``output.dense``, ``output.LayerNorm``) so their
    state dicts load directly.
    """

    def __init__(self, dim: int, heads: int, *, kv_dim: int | None = None, eps: float, dropout: float,
                 attention_dropout: float) -> None:
        super().__init__()
        self.heads, self.attention_dropout = heads, attention_dropout
        self.attention = nn.Module()
        self.attention.query = nn.Linear(dim, dim)
        self.attention.key = nn.Linear(kv_dim or dim, dim)
        self.attention.value = nn.Linear(kv_dim or dim, dim)
        self.output = nn.Module()
        self.output.dense = nn.Linear(dim, dim)
        self.output.LayerNorm = nn.LayerNorm(dim, eps=eps)
        self.output.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor | None = None, mask=None) -> Tensor:
        """x (B, L, dim); context (B, M, kv_dim) for cross-attention (else x); mask for the core -> (B, L, dim)."""
        context = x if context is None else context
        a = self.attention
        q = a.query(x).unflatten(-1, (self.heads, -1))  # (B, L, H, D)
        k = a.key(context).unflatten(-1, (self.heads, -1))  # (B, M, H, D)
        v = a.value(context).unflatten(-1, (self.heads, -1))  # (B, M, H, D)
        out = attention(q, k, v, mask=mask, dropout_p=self.attention_dropout if self.training else 0.0)
        out = self.output.dropout(self.output.dense(out.flatten(2)))
        return self.output.LayerNorm(out + x)


class QFormerLayer(nn.Module):
    """Query self-attention, [causal encoder attention, cross-attention], FFN (BLIP-2's query branch)."""

    def __init__(self, cfg: QFormerConfig, cross: bool) -> None:
        super().__init__()
        common = dict(eps=cfg.layer_norm_eps, dropout=cfg.hidden_dropout, attention_dropout=cfg.attention_dropout)
        self.attention = BertAttention(cfg.hidden_size, cfg.num_heads, **common)
        self.has_cross_attention, self.carry = cross, cfg.encoder_attention_carry
        if cross:
            self.crossattention = BertAttention(cfg.hidden_size, cfg.num_heads, kv_dim=cfg.vision_dim, **common)
            if cfg.encoder_attention != "none":
                self.encoder_attention = BertAttention(cfg.vision_dim, cfg.encoder_heads, **common)
                if cfg.encoder_attention_init == "identity":  # out = LayerNorm(0 + window) at the start
                    nn.init.zeros_(self.encoder_attention.output.dense.weight)
                    nn.init.zeros_(self.encoder_attention.output.dense.bias)
        self.intermediate_query = nn.Module()
        self.intermediate_query.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output_query = nn.Module()
        self.output_query.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.output_query.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.output_query.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, queries: Tensor, window: Tensor, encoder_mask, cross_mask) -> tuple[Tensor, Tensor]:
        """queries (W, Q, hidden), window (W, M, D) -> both updated."""
        queries = self.attention(queries)
        mixed = window
        if self.has_cross_attention:
            if hasattr(self, "encoder_attention"):
                mixed = self.encoder_attention(window, mask=encoder_mask)  # the causal part
            queries = self.crossattention(queries, mixed, mask=cross_mask)
        hidden = F.gelu(self.intermediate_query.dense(queries))
        out = self.output_query.dropout(self.output_query.dense(hidden))
        return self.output_query.LayerNorm(out + queries), (mixed if self.carry else window)


class QFormerConnector(Connector):
    """FAVOR's causal Q-Former connector; see the module docstring. ``forward(features, mask)`` with features
    (B, T * tokens_per_frame, vision_dim) -> tokens (B, windows * num_queries, llm_dim) and their mask."""

    kind = "qformer"
    config_class = QFormerConfig
    init_fields = ("encoder_attention_init",)

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__(config)
        cfg = config
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.hidden_size) * 0.02)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        window_tokens = cfg.frames_per_window * cfg.tokens_per_frame
        if cfg.window_positions:
            self.window_position = nn.Embedding(window_tokens, cfg.vision_dim)
            nn.init.normal_(self.window_position.weight, std=0.02)
            self.window_norm = nn.LayerNorm(cfg.vision_dim, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, cross=i % cfg.cross_attention_every == 0) for i in range(cfg.num_layers)
        )
        self.proj = nn.Linear(cfg.hidden_size, cfg.llm_dim)

    @classmethod
    def upgrade_saved_config(cls, config: dict) -> dict:
        """Q-Formers saved before ``encoder_attention_carry`` existed carried the window states layer to layer;
        those saved before ``diversity_on`` existed took the diversity loss on the projected LLM tokens."""
        defaults = {"encoder_attention_carry": True, "diversity_on": "tokens"}
        return {**{k: v for k, v in defaults.items() if k not in config}, **config}

    @classmethod
    def example_config(cls, vision_dim: int, llm_dim: int) -> dict:
        """A small instance for tests (the defaults are FAVOR's full size)."""
        return dict(vision_dim=vision_dim, llm_dim=llm_dim, num_queries=4, hidden_size=16, num_heads=2,
                    intermediate_size=24, encoder_heads=2, tokens_per_frame=3, frames_per_window=2,
                    hidden_dropout=0.0, attention_dropout=0.0)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        frames = math.ceil(num_input_tokens / self.config.tokens_per_frame)
        return math.ceil(frames / self.config.frames_per_window) * self.config.num_queries

    # ------------------------------------------------------------------ windows
    def windows(self, features: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, int]:
        """(B, N, D) frame tokens -> windows (B * nW, frames_per_window * tokens_per_frame, D), their token mask
        and nW (the last window of every clip padded; all clips padded to the longest)."""
        cfg = self.config
        B, N, D = features.shape
        tpf, fpw = cfg.tokens_per_frame, cfg.frames_per_window
        if N % tpf:
            raise ValueError(f"a clip must hold whole frames of tokens_per_frame={tpf} tokens; got {N} tokens")
        if mask is None:
            mask = torch.ones(B, N, dtype=torch.bool, device=features.device)
        frames = N // tpf
        n_windows = max(1, math.ceil(frames / fpw))
        pad = n_windows * fpw * tpf - N
        if pad:
            features = F.pad(features, (0, 0, 0, pad))
            mask = F.pad(mask, (0, pad), value=False)
        size = fpw * tpf
        return features.reshape(B * n_windows, size, D), mask.reshape(B * n_windows, size), n_windows

    def forward(self, features: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        cfg = self.config
        B = features.shape[0]
        window, window_mask, n_windows = self.windows(features, mask)  # (W, M, D), (W, M)
        states = self.query_states(window, window_mask)  # (W, Q, hidden)
        if cfg.diversity_weight and cfg.diversity_on == "queries":
            # read (once) by losses() for this batch; a forward with grad on whose losses() is never called keeps
            # this batch's graph alive until the next forward replaces it (one batch at most)
            self._diversity_states = states
        tokens = self.proj(states)  # (W, Q, llm_dim)
        real = window_mask.any(dim=1)  # (W,) windows holding at least one real frame token
        out_mask = real[:, None].expand(-1, cfg.num_queries).reshape(B, n_windows * cfg.num_queries)
        return tokens.reshape(B, n_windows * cfg.num_queries, -1), out_mask

    def query_states(self, window: Tensor, window_mask: Tensor | None = None) -> Tensor:
        """The Q-Former itself: windows (W, M, D) with a (W, M) token mask -> query states (W, Q, hidden)."""
        cfg = self.config
        if cfg.window_positions:
            window = self.window_norm(window + self.window_position.weight[: window.shape[1]])
        if window_mask is None:
            window_mask = torch.ones(window.shape[:2], dtype=torch.bool, device=window.device)
        padding = key_padding(window_mask)
        encoder_mask = None
        if cfg.encoder_attention != "none":
            encoder_mask = padding & block_causal(cfg.tokens_per_frame, direction=cfg.encoder_attention)
        queries = self.dropout(self.layernorm(self.query_tokens.expand(window.shape[0], -1, -1)))  # (W, Q, hidden)
        for layer in self.layers:
            queries, window = layer(queries, window, encoder_mask, padding)
        return queries

    # ------------------------------------------------------------------ objective
    def losses(self, tokens: Tensor, mask: Tensor | None, context: LossContext) -> AuxiliaryLosses | None:
        """Diversity loss: the mean pairwise cosine similarity of each real window's query outputs (lower = the
        queries read different things), weighted by ``diversity_weight``. ``diversity_on="queries"`` (default,
        as the official code's ``calc_diversity_loss`` on the Q-Former's last hidden state) takes it on the
        query states of the latest forward (kept on the module until this call reads them; the shapes must
        agree with ``tokens``); ``"tokens"`` on the projected LLM tokens ``tokens``. In float32."""
        if not self.config.diversity_weight:
            return None
        Q = self.config.num_queries
        if self.config.diversity_on == "queries":
            states = self.__dict__.pop("_diversity_states", None)
            if states is None:
                raise RuntimeError("QFormerConnector.losses with diversity_on='queries' needs a forward "
                                   "pass first (it reads that pass's query states)")
            if states.shape[0] * Q != tokens.shape[0] * tokens.shape[1]:
                raise RuntimeError(f"QFormerConnector.losses got tokens {tuple(tokens.shape)} but the latest forward "
                                   f"made {states.shape[0]} windows of {Q} queries: call losses() on the tokens of "
                                   "the forward just before it")
            tokens = states.float()
        z = F.normalize(tokens.float().reshape(-1, Q, tokens.shape[-1]), dim=-1)  # (W, Q, d)
        sim = z @ z.transpose(1, 2)  # (W, Q, Q)
        off_diagonal = (sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(1)) / max(Q * (Q - 1), 1)  # (W,)
        if mask is not None:
            real = mask.reshape(-1, Q)[:, 0].to(off_diagonal.dtype)
            diversity = (off_diagonal * real).sum() / real.sum().clamp_min(1.0)
        else:
            diversity = off_diagonal.mean()
        return AuxiliaryLosses(total=self.config.diversity_weight * diversity, logged={"diversity_loss": diversity})

    # ------------------------------------------------------------------ BLIP-2 initialisation
    def init_from_checkpoint(self, source) -> list[str]:
        """A BLIP-2 / InstructBLIP checkpoint (safetensors or weights-only torch file, model folder, or hub name
        such as ``Salesforce/blip2-opt-2.7b``: only the shards with Q-Former keys are read) or a saved
        ``Blip2QFormerModel``; see :meth:`load_blip2_qformer`."""
        from ..weights import read_state_dict

        state = read_state_dict(source, prefixes=("qformer.", "query_tokens", "encoder.layer.", "layernorm."))
        try:
            return self.load_blip2_qformer(state)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def load_blip2_qformer(self, source, *, query_tokens: Tensor | None = None) -> list[str]:
        """Copy a ``Blip2QFormerModel`` (or its state dict; a whole BLIP-2 state dict's ``qformer.`` part and
        ``query_tokens`` are recognised) into the query self-attention, cross-attention, FFN and query LayerNorm.
        Returns the names of this connector's tensors that stay as initialised (the causal encoder attention,
        the window positions, the output projection). Sizes that differ raise, naming both."""
        state = source.state_dict() if isinstance(source, nn.Module) else dict(source)
        if any(k.startswith("qformer.") for k in state):
            if query_tokens is None and "query_tokens" in state:
                query_tokens = state["query_tokens"]
            state = {k.removeprefix("qformer."): v for k, v in state.items() if k.startswith("qformer.")}
        ours = self.state_dict()
        mapped: dict[str, Tensor] = {}
        for key, value in state.items():
            name = key.replace("encoder.layer.", "layers.", 1)
            if name in ours:  # (BLIP-2's text branch, intermediate / output, has no counterpart: FAVOR reads no text)
                mapped[name] = value
        if query_tokens is not None:
            mapped["query_tokens"] = query_tokens.reshape(1, *query_tokens.shape[-2:])
        wrong = {k: (tuple(v.shape), tuple(ours[k].shape)) for k, v in mapped.items() if v.shape != ours[k].shape}
        if wrong:
            raise ValueError(f"the BLIP-2 Q-Former does not fit this QFormerConfig (checkpoint shape, ours): {wrong}; "
                             f"set hidden_size / num_heads / intermediate_size / vision_dim / num_queries to match")
        if not any(k.startswith("layers.") for k in mapped):
            raise ValueError(f"no Q-Former layer weights found in the given state dict (keys like {list(state)[:3]})")
        with torch.no_grad():
            for k, v in mapped.items():
                ours[k].copy_(v)
        return sorted(set(ours) - set(mapped))


__all__ = ["BertAttention", "QFormerConfig", "QFormerConnector", "QFormerLayer"]
