"""``attention()``: the one function every mmkit module calls."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends.base import AttentionCall, expand_kv_heads
from .dispatch import automatic_backend, logger, report, select
from .masks import AttentionMask, as_mask


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: AttentionMask | Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
    probs_hook: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Scaled dot-product attention in the (B, L, H, D) layout.

    Args:
        q: (B, Lq, H, D) queries.
        k: (B, Lk, Hkv, D) keys; ``H % Hkv == 0`` (grouped-query attention when Hkv < H).
        v: (B, Lk, Hkv, Dv) values; Dv may differ from D.
        mask: an :class:`~mmkit.ops.masks.AttentionMask`, a bool tensor (True = attend) or a float
            tensor (additive), broadcastable to (B, H, Lq, Lk).
        causal: bottom-right aligned causal masking (combined with ``mask``).
        scale: multiplies ``q.k``; default ``D ** -0.5``.
        dropout_p: dropout on the attention probabilities (pass 0.0 at inference).
        backend: name of a registered backend; see :mod:`mmkit.ops.dispatch` for the default choice.
        probs_hook: called on the (B, H, Lq, Lk) probabilities, returns replacements (eager only).

    Returns:
        (B, Lq, H, Dv). A query that sees no key gets zeros.
    """
    if mask is None and backend is None and probs_hook is None and automatic_backend() == "sdpa" \
            and (torch.compiler.is_compiling() or not logger.isEnabledFor(logging.DEBUG)):  # full path logs
        out = _sdpa_direct(q, k, v, causal, scale, dropout_p)
        if out is not None:
            return out
    call = make_call(q, k, v, mask=mask, causal=causal, scale=scale, dropout_p=dropout_p, probs_hook=probs_hook)
    return select(call, backend).run(call)


def _sdpa_direct(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None, dropout_p: float) -> Tensor | None:
    """The common call (no mask object, automatic backend) straight to torch's SDPA: what the sdpa backend
    would run, without building an :class:`AttentionCall`. None when the call needs the full path (a
    non-square causal mask, or inputs SDPA refuses, so that the full path can say what is wrong)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or (causal and q.shape[1] != k.shape[1]):
        return None
    if not 0.0 <= dropout_p < 1.0:
        return None
    try:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, is_causal=causal,
            scale=scale, enable_gqa=q.shape[2] != k.shape[2],
        )  # (B, H, Lq, Dv)
    except RuntimeError:
        return None
    return out.transpose(1, 2)


def attention_scores(
    q: Tensor,
    k: Tensor,
    *,
    scale: float | None = None,
    mask: AttentionMask | Tensor | None = None,
    causal: bool = False,
) -> Tensor:
    """Raw scores ``q @ k^T * scale`` (+ bias), no softmax: (B, H, Lq, Lk).

    q: (B, Lq, H, D); k: (B, Lk, Hkv, D). Positions a mask hides are ``-inf``. READ's similarity map
    and VLAP's assignment logits are such scores.
    """
    _check_qk(q, k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kk = expand_kv_heads(k, q.shape[2])
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale  # (B, H, Lq, Lk)
    m = as_mask(mask, causal)
    if m is not None:
        if m.bias is not None:
            scores = scores + m.bias.to(scores.dtype)
        keep = m.keep_tensor(q.shape[0], q.shape[1], k.shape[1], q.device)
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
    return scores


def explain(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: AttentionMask | Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> str:
    """Which backend and kernel ``attention()`` would use for these arguments, and why not the others."""
    call = make_call(q, k, v, mask=mask, causal=causal, scale=scale, dropout_p=dropout_p, probs_hook=None)
    lines = [call.describe()]
    try:
        chosen = select(call, backend)
        lines.append(f"-> {chosen.name} ({chosen.kernel(call)})")
    except RuntimeError as err:
        lines.append(f"-> error: {err}")
    lines += [f"   {name}: {status}" for name, status in report(call)]
    return "\n".join(lines)


def _check_qk(q: Tensor, k: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"attention expects 4-D (B, L, H, D) tensors, got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch B and head dim D")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads H={q.shape[2]} must be a multiple of key/value heads Hkv={k.shape[2]}")


def make_call(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: AttentionMask | Tensor | None,
    causal: bool,
    scale: float | None,
    dropout_p: float,
    probs_hook: Callable[[Tensor], Tensor] | None,
) -> AttentionCall:
    _check_qk(q, k)
    if v.dim() != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} must be (B, Lk, Hkv, Dv) matching k {tuple(k.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return AttentionCall(
        q=q, k=k, v=v, mask=as_mask(mask, causal), scale=float(scale), dropout_p=float(dropout_p),
        probs_hook=probs_hook,
    )
