"""Structured attention masks.

An :class:`AttentionMask` describes which keys each query may see (and an optional additive bias)
without materialising an (Lq, Lk) matrix until a backend needs one. Backends read the structure:
SDPA gets ``is_causal`` or a dense tensor, flex_attention gets an index predicate and block sparsity,
the triton kernel gets the parameters and skips blocks that are fully masked.

Conventions (all backends follow them, the tests hold them to it):
- ``True`` in a boolean mask means *attend*; additive biases are added to ``q.k * scale``.
- ``causal`` is bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + (Lk - Lq)``.
- A query row that sees no key at all returns zeros.

Build masks with the helpers and combine them with ``&``::

    mask = key_padding(lengths, 9) & block_causal(32, direction="past") & additive_bias(b)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_DIRECTIONS = ("past", "future")


@dataclass(frozen=True, eq=False)
class AttentionMask:
    """Which keys a query may see, plus an optional additive bias.

    Fields (all optional; an empty mask means full attention):
        key_padding: (B, Lk) bool, True for real keys.
        causal: bottom-right aligned causal mask.
        window: (left, right) sliding window around the (bottom-right aligned) diagonal: query i sees
            key j iff ``i' - left <= j <= i' + right`` with ``i' = i + Lk - Lq``. ``None`` on a side = unbounded.
        frame_tokens: (q_tokens_per_frame, k_tokens_per_frame): per-frame block mask; query i is in
            frame ``i // tq``, key j in frame ``j // tk``; ``direction="past"`` lets a frame see itself and
            earlier frames, ``"future"`` itself and later ones.
        bias: additive float tensor broadcastable to (B, H, Lq, Lk).
        dense: bool tensor broadcastable to (B, H, Lq, Lk), True = attend.
    """

    key_padding: Tensor | None = None
    causal: bool = False
    window: tuple[int | None, int | None] | None = None
    frame_tokens: tuple[int, int] | None = None
    direction: str = "past"
    bias: Tensor | None = None
    dense: Tensor | None = None

    def __post_init__(self) -> None:
        if self.direction not in _DIRECTIONS:
            raise ValueError(f"direction must be one of {_DIRECTIONS}, got {self.direction!r}")
        if self.key_padding is not None and (self.key_padding.dtype != torch.bool or self.key_padding.dim() != 2):
            raise ValueError(
                f"key_padding must be a (B, Lk) bool tensor (True = real key), got "
                f"{tuple(self.key_padding.shape)} {self.key_padding.dtype}"
            )
        if self.dense is not None and self.dense.dtype != torch.bool:
            raise ValueError(f"dense mask must be bool (True = attend), got {self.dense.dtype}; use bias= for floats")
        if self.bias is not None and not self.bias.is_floating_point():
            raise ValueError(f"bias must be a floating tensor, got {self.bias.dtype}; use dense= for bool masks")
        if self.frame_tokens is not None and min(self.frame_tokens) < 1:
            raise ValueError(f"frame_tokens must be positive, got {self.frame_tokens}")

    # ------------------------------------------------------------------ combination
    def __and__(self, other: AttentionMask) -> AttentionMask:
        if not isinstance(other, AttentionMask):
            return NotImplemented
        if self.window is not None and other.window is not None:
            raise ValueError("cannot combine two sliding windows; build one window(left, right) instead")
        if self.frame_tokens is not None and other.frame_tokens is not None:
            raise ValueError("cannot combine two per-frame block masks")
        kp = _and_optional(self.key_padding, other.key_padding)
        dense = _and_optional(self.dense, other.dense)
        if self.bias is None or other.bias is None:
            bias = self.bias if other.bias is None else other.bias
        else:
            bias = self.bias + other.bias
        frame_src = self if self.frame_tokens is not None else other
        return AttentionMask(
            key_padding=kp,
            causal=self.causal or other.causal,
            window=self.window if self.window is not None else other.window,
            frame_tokens=frame_src.frame_tokens,
            direction=frame_src.direction,
            bias=bias,
            dense=dense,
        )

    # ------------------------------------------------------------------ inspection
    @property
    def is_empty(self) -> bool:
        return not (self.has_structure or self.bias is not None or self.dense is not None)

    @property
    def has_structure(self) -> bool:
        """True when the index-computable part (padding, causal, window, frames) is non-trivial."""
        return (
            self.key_padding is not None or self.causal or self.window is not None or self.frame_tokens is not None
        )

    @property
    def only_causal(self) -> bool:
        return self.causal and not (
            self.key_padding is not None
            or self.window is not None
            or self.frame_tokens is not None
            or self.bias is not None
            or self.dense is not None
        )

    def describe(self) -> str:
        parts = []
        if self.key_padding is not None:
            parts.append("key_padding")
        if self.causal:
            parts.append("causal")
        if self.window is not None:
            parts.append(f"window{self.window}")
        if self.frame_tokens is not None:
            parts.append(f"block_causal{self.frame_tokens}/{self.direction}")
        if self.bias is not None:
            parts.append("bias" + ("(grad)" if self.bias.requires_grad else ""))
        if self.dense is not None:
            parts.append("dense")
        return "+".join(parts) or "none"

    # ------------------------------------------------------------------ evaluation
    def allowed(self, b: Tensor, q_idx: Tensor, kv_idx: Tensor, Lq: int, Lk: int) -> Tensor:
        """The index-computable keep predicate, evaluated on broadcastable index tensors.

        Used both to materialise a dense mask and as flex_attention's ``mask_mod``. ``dense`` and
        ``bias`` are not part of it.
        """
        keep = torch.ones_like(q_idx, dtype=torch.bool) & torch.ones_like(kv_idx, dtype=torch.bool)
        offset = Lk - Lq
        if self.causal:
            keep = keep & (kv_idx <= q_idx + offset)
        if self.window is not None:
            left, right = self.window
            if left is not None:
                keep = keep & (kv_idx >= q_idx + offset - left)
            if right is not None:
                keep = keep & (kv_idx <= q_idx + offset + right)
        if self.frame_tokens is not None:
            tq, tk = self.frame_tokens
            fq = torch.div(q_idx, tq, rounding_mode="floor")
            fk = torch.div(kv_idx, tk, rounding_mode="floor")
            keep = keep & ((fk <= fq) if self.direction == "past" else (fk >= fq))
        if self.key_padding is not None:
            keep = keep & self.key_padding[b, kv_idx]
        return keep

    def keep_tensor(self, batch: int, Lq: int, Lk: int, device: torch.device | str) -> Tensor | None:
        """Boolean keep mask broadcastable to (B, H, Lq, Lk), or None when everything is visible.

        The index-computable part (causal, window, frames) is built once per (structure, Lq, Lk, device)
        and cached; key padding is a (B, 1, 1, Lk) view of the given tensor; nothing is rebuilt per call.
        """
        if not self.has_structure and self.dense is None:
            return None
        keep: Tensor | None = _structure_keep(self.causal, self.window, self.frame_tokens, self.direction, Lq, Lk,
                                              torch.device(device))
        if self.key_padding is not None:
            _check_padding(self.key_padding, batch, Lk)
            padding = self.key_padding.to(device)[:, None, None, :]  # (B, 1, 1, Lk)
            keep = padding if keep is None else keep & padding
        if self.dense is not None:
            dense = _as_4d(self.dense, "dense").to(device)
            keep = dense if keep is None else keep & dense
        return keep

    def may_have_empty_rows(self, Lq: int, Lk: int) -> bool:
        """Whether some query can see no key at all under this mask (then backends zero those rows)."""
        if self.key_padding is not None or self.dense is not None or self.window is not None:
            return True
        if self.causal and Lq > Lk:
            return True
        return self.frame_tokens is not None and self.direction == "future"

    def additive(
        self, batch: int, Lq: int, Lk: int, dtype: torch.dtype, device: torch.device | str,
        keep: Tensor | None = None,
    ) -> Tensor | None:
        """Float mask broadcastable to (B, H, Lq, Lk): bias plus -inf where a key is hidden (``keep``: this
        mask's :meth:`keep_tensor` when the caller already has it)."""
        keep = self.keep_tensor(batch, Lq, Lk, device) if keep is None else keep
        bias = None if self.bias is None else _as_4d(self.bias, "bias").to(device=device, dtype=dtype)
        if keep is None:
            return bias
        if bias is None:
            return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, float("-inf"))
        return torch.where(keep, bias, float("-inf"))


_STRUCTURE_CACHE: dict[tuple, Tensor | None] = {}
_STRUCTURE_CACHE_SIZE = 64


def _structure_keep(
    causal: bool, window: tuple | None, frames: tuple | None, direction: str, Lq: int, Lk: int, device: torch.device
) -> Tensor | None:
    """(1, 1, Lq, Lk) bool keep of the index-computable structure (None without one), cached."""
    if not causal and window is None and frames is None:
        return None
    key = (causal, window, frames, direction, Lq, Lk, device)
    found = _STRUCTURE_CACHE.get(key)
    if found is None:
        q_idx = torch.arange(Lq, device=device).view(1, 1, Lq, 1)
        kv_idx = torch.arange(Lk, device=device).view(1, 1, 1, Lk)
        shape = AttentionMask(causal=causal, window=window, frame_tokens=frames, direction=direction)
        found = shape.allowed(torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device), q_idx, kv_idx, Lq, Lk)
        if len(_STRUCTURE_CACHE) >= _STRUCTURE_CACHE_SIZE:
            _STRUCTURE_CACHE.pop(next(iter(_STRUCTURE_CACHE)))
        _STRUCTURE_CACHE[key] = found
    return found


def _and_optional(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def _as_4d(t: Tensor, what: str) -> Tensor:
    if t.dim() > 4:
        raise ValueError(f"{what} mask must be broadcastable to (B, H, Lq, Lk), got {tuple(t.shape)}")
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _check_padding(kp: Tensor, batch: int, Lk: int) -> None:
    if kp.shape[1] != Lk or kp.shape[0] not in (1, batch):
        raise ValueError(f"key_padding has shape {tuple(kp.shape)}; expected ({batch}, {Lk}) = (B, Lk)")


# ---------------------------------------------------------------------- constructors
def key_padding(keep_or_lengths: Tensor, num_keys: int | None = None) -> AttentionMask:
    """Key padding from a (B, Lk) bool tensor (True = real key) or (B,) integer lengths + ``num_keys``."""
    t = keep_or_lengths
    if t.dtype == torch.bool:
        return AttentionMask(key_padding=t)
    if t.dim() != 1 or t.is_floating_point():
        raise ValueError(f"key_padding expects (B, Lk) bool or (B,) integer lengths, got {tuple(t.shape)} {t.dtype}")
    if num_keys is None:
        raise ValueError("key_padding(lengths, num_keys): num_keys (Lk) is required with integer lengths")
    keep = torch.arange(num_keys, device=t.device).unsqueeze(0) < t.unsqueeze(1)
    return AttentionMask(key_padding=keep)


def causal() -> AttentionMask:
    """Bottom-right aligned causal mask."""
    return AttentionMask(causal=True)


def sliding_window(left: int | None, right: int | None = 0) -> AttentionMask:
    """Query i' (bottom-right aligned) sees keys in [i' - left, i' + right]; None = unbounded on that side."""
    for side, val in (("left", left), ("right", right)):
        if val is not None and val < 0:
            raise ValueError(f"sliding_window: {side} must be >= 0 or None, got {val}")
    return AttentionMask(window=(left, right))


def block_causal(tokens_per_frame: int | tuple[int, int], direction: str = "past") -> AttentionMask:
    """Per-frame block mask: all tokens of a frame share visibility (FAVOR's causal Q-Former).

    ``tokens_per_frame`` is one int (queries and keys are the same frame tokens) or (tq, tk).
    ``direction="past"``: frame f sees frames <= f (the paper); ``"future"``: frames >= f (the official
    code's ``triu``).
    """
    if isinstance(tokens_per_frame, int):
        tokens_per_frame = (tokens_per_frame, tokens_per_frame)
    return AttentionMask(frame_tokens=tuple(tokens_per_frame), direction=direction)


def additive_bias(bias: Tensor) -> AttentionMask:
    """Additive bias broadcastable to (B, H, Lq, Lk)."""
    return AttentionMask(bias=bias)


def as_mask(mask: AttentionMask | Tensor | None, causal_flag: bool = False) -> AttentionMask | None:
    """Normalise what ``attention(mask=...)`` accepts: None, an AttentionMask, a bool or float tensor."""
    if isinstance(mask, Tensor):
        mask = AttentionMask(dense=mask) if mask.dtype == torch.bool else AttentionMask(bias=mask)
    elif mask is not None and not isinstance(mask, AttentionMask):
        raise TypeError(
            f"mask must be None, an AttentionMask, a bool tensor (True = attend) or a float tensor "
            f"(additive); got {type(mask).__name__}"
        )
    if causal_flag:
        mask = AttentionMask(causal=True) if mask is None else mask & AttentionMask(causal=True)
    if mask is not None and mask.is_empty:
        return None
    return mask

