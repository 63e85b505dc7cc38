"""diffusers attention processors that compute attention with :func:`mmkit.ops.attention`.

:class:`MmkitAttnProcessor` is a drop-in for diffusers' ``AttnProcessor2_0``: same call signature,
same handling of spatial norm, 4-D (B, C, H, W) inputs, group norm, cross-attention norm, attention
masks, q/k norms, residual connection and ``rescale_output_factor``; only the attention itself runs
through mmkit's dispatch, so every mmkit backend (``backend="sdpa" | "eager" | ...``) works inside an
unmodified ``UNet2DConditionModel``.

Subclasses change the attention between the projections by overriding :meth:`MmkitAttnProcessor.attend`
(token merging and agent attention do, in :mod:`mmkit.diffusion.tome` / :mod:`mmkit.diffusion.agent_sd`).
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor, nn

from ..ops import attention
from ..ops.dispatch import get_backend


def check_call_extras(who: str, args: tuple, kwargs: dict) -> None:
    """diffusers passes a deprecated ``scale`` to some processors: warn and ignore it, as diffusers does.

    Anything else is an error instead of a silently dropped argument.
    """
    extra = dict(kwargs)
    extra.pop("scale", None)
    if args or "scale" in kwargs:
        warnings.warn(
            f"{who}: the `scale` argument is deprecated in diffusers and ignored; pass LoRA scales through "
            "the pipeline's cross_attention_kwargs",
            FutureWarning,
            stacklevel=3,
        )
    if extra:
        raise TypeError(
            f"{who} got unexpected arguments {sorted(extra)}; it accepts attn, hidden_states, "
            "encoder_hidden_states, attention_mask and temb"
        )


class MmkitAttnProcessor:
    """``AttnProcessor2_0`` with the attention computed by ``mmkit.ops.attention(..., backend=backend)``.

    Call: ``processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None)``
    with ``hidden_states`` (B, L, C) or (B, C, H, W), ``encoder_hidden_states`` (B, M, C_enc) for
    cross-attention, ``attention_mask`` as diffusers prepares it (additive, (B, M) or (B, 1, M) ...).
    Returns the layer output shaped like ``hidden_states`` (channels = the layer's output dim).

    The softmax scale is ``attn.scale`` (head_dim ** -0.5 unless the layer was built with
    ``scale_qk=False``; ``AttnProcessor2_0`` ignores that flag, this processor honours it).
    """

    def __init__(self, backend: str | None = None) -> None:
        if backend is not None:
            get_backend(backend)  # fail at construction on a typo, listing the registered backends
        self.backend = backend

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor:
        check_call_extras(type(self).__name__, args, kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            B, C, H, W = hidden_states.shape
            hidden_states = hidden_states.view(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)  # (B, L, C)

        out = self.attend(attn, hidden_states, encoder_hidden_states, attention_mask)  # (B, L, C_out)

        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(B, -1, H, W)  # (B, C_out, H, W)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def attend(
        self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None, attention_mask: Tensor | None
    ) -> Tensor:
        """Projections, attention, output projection: (B, L, C) -> (B, L, C_out).

        ``hidden_states`` are the layer's tokens after any group norm; keys and values come from
        ``encoder_hidden_states`` (cross-attention, normed when ``attn.norm_cross``) or from
        ``hidden_states`` (self-attention).
        """
        if encoder_hidden_states is None:
            return self.attend_to(attn, hidden_states, hidden_states, None, attention_mask)
        return self.attend_to(attn, hidden_states, encoder_hidden_states, None, attention_mask, cross=True)

    def attend_to(
        self, attn: nn.Module, hidden_states: Tensor, context: Tensor, value_context: Tensor | None,
        attention_mask: Tensor | None, *, cross: bool = False,
    ) -> Tensor:
        """Attention of ``hidden_states`` (B, L, C) to ``context`` (B, M, C_ctx) -> (B, L, C_out); values from
        ``value_context`` when given. ``cross``: the contexts are text states (normed when ``attn.norm_cross``)."""
        B = hidden_states.shape[0]
        if cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
            if value_context is not None:
                value_context = attn.norm_encoder_hidden_states(value_context)
        q, k, v = project_qkv(attn, hidden_states, context, value_context)  # (B, L, H, D), (B, M, Hkv, D), (B, M, Hkv, Dv)
        mask = None
        if attention_mask is not None:
            prepared = attn.prepare_attention_mask(attention_mask, k.shape[1], B)  # (B*H, 1 or L, M)
            mask = prepared.view(B, attn.heads, -1, prepared.shape[-1])  # (B, H, 1 or L, M)
        out = attention(q, k, v, mask=mask, scale=attn.scale, backend=self.backend)  # (B, L, H, Dv)
        return project_out(attn, out.flatten(2).to(q.dtype))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r})"


def project_qkv(
    attn: nn.Module, x: Tensor, context: Tensor, value_context: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Query from x (B, L, C), key/value from context (B, M, C_ctx), split into heads, q/k norms applied.

    ``value_context`` (B, M, C_ctx): values from it instead of ``context`` (NeTI's textual bypass).
    Returns q (B, L, H, D), k (B, M, Hkv, D), v (B, M, Hkv, Dv); Hkv = H unless the layer has fewer kv heads.
    """
    q = attn.to_q(x).unflatten(-1, (attn.heads, -1))  # (B, L, H, D)
    head_dim = q.shape[-1]
    k = attn.to_k(context).unflatten(-1, (-1, head_dim))  # (B, M, Hkv, D)
    v = attn.to_v(context if value_context is None else value_context)
    v = v.unflatten(-1, (k.shape[2], -1))  # (B, M, Hkv, Dv)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k, v


def project_out(attn: nn.Module, out: Tensor) -> Tensor:
    """Output projection and its dropout: (B, L, H*Dv) -> (B, L, C_out)."""
    out = attn.to_out[0](out)
    return attn.to_out[1](out)


__all__ = ["MmkitAttnProcessor", "check_call_extras", "project_out", "project_qkv"]
