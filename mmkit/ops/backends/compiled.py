"""``torch.compile(flex_attention)``: structured masks as block sparsity.

flex_attention skips whole key blocks that a mask hides, so sparse structures (sliding windows,
per-frame blocks, causal) cost only what they keep; SDPA with a dense mask pays for every block. On
our CPUs it is slower than SDPA for full attention and compiles for ~30 s per new shape, so it is
opt-in (``backend="compiled"``); ``benchmarks/attention.py`` measures where it pays off.
On CPU flex_attention is inference-only: calls that need gradients are refused.
"""

from __future__ import annotations

import shutil
import weakref
from collections import OrderedDict

import torch
from torch import Tensor

from ..masks import AttentionMask
from .base import AttentionBackend, AttentionCall

_COMPILED = None
_BLOCK_MASKS: OrderedDict[tuple, tuple] = OrderedDict()  # key -> (weakrefs of the mask's tensors, block mask)
_BLOCK_MASK_CACHE_SIZE = 16
# Dynamo allows 8 compiled variants of flex_attention per process and then silently runs an
# unfused fallback. Our calls raise the limit and make hitting it an error instead.
_RECOMPILE_LIMIT = 64


def _flex():
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        # Static shapes: inductor's CPU template for flex_attention fails to build with dynamic ones
        # (torch 2.14: C++ error 'cur_kvSplitSize4 was not declared'); each new shape compiles once.
        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED


def _structure_params(mask: AttentionMask, Lq: int, Lk: int, device: torch.device) -> Tensor:
    """Every index-computable mask as the values of one int64 vector, so one compiled predicate
    serves causal, windows and frame blocks alike (changing the values does not recompile)."""
    wl, wr = mask.window if mask.window is not None else (None, None)
    fq, fk = mask.frame_tokens if mask.frame_tokens is not None else (1, 1)
    values = [
        int(mask.causal), int(wl is not None), wl or 0, int(wr is not None), wr or 0,
        int(mask.frame_tokens is not None), fq, fk, int(mask.direction == "future"), Lk - Lq,
    ]
    return torch.tensor(values, dtype=torch.int64, device=device)


def _block_mask(mask: AttentionMask, batch: int, heads: int, Lq: int, Lk: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    # Built once per (structure, tensors, shape, device) and reused: a block mask costs a kernel launch per
    # key block to build. Tensor-backed parts (padding, dense) are keyed by the tensor's identity and
    # version, so the same padding tensor reuses its block mask and an in-place change rebuilds it.
    tensors = tuple(t for t in (mask.key_padding, mask.dense) if t is not None)
    key = (mask.causal, mask.window, mask.frame_tokens, mask.direction, batch, heads if mask.dense is not None else 0,
           Lq, Lk, str(device), *((id(t), t._version, tuple(t.shape)) for t in tensors))
    cached = _BLOCK_MASKS.get(key)
    if cached is not None and all(ref() is t for ref, t in zip(cached[0], tensors)):
        _BLOCK_MASKS.move_to_end(key)
        return cached[1]
    P = _structure_params(mask, Lq, Lk, device)
    kp = mask.key_padding if mask.key_padding is not None else torch.ones(1, Lk, dtype=torch.bool, device=device)
    kp = kp.to(device).expand(batch, Lk).contiguous()  # one layout, so padding never forces a recompile
    dense = None
    if mask.dense is not None:
        dense = mask.dense.to(device)
        while dense.dim() < 4:
            dense = dense.unsqueeze(0)
        dense = dense.expand(batch, heads, Lq, Lk)

    def mask_mod(b, h, q_idx, kv_idx):
        pos = q_idx + P[9]  # bottom-right aligned query position
        keep = kp[b, kv_idx]
        keep = keep & ((kv_idx <= pos) | (P[0] == 0))
        keep = keep & ((kv_idx >= pos - P[2]) | (P[1] == 0))
        keep = keep & ((kv_idx <= pos + P[4]) | (P[3] == 0))
        fq = torch.div(q_idx, P[6], rounding_mode="floor")
        fk = torch.div(kv_idx, P[7], rounding_mode="floor")
        frame_ok = torch.where(P[8] == 0, fk <= fq, fk >= fq)
        keep = keep & (frame_ok | (P[5] == 0))
        if dense is not None:
            keep = keep & dense[b, h, q_idx, kv_idx]
        return keep

    bm = create_block_mask(mask_mod, batch, heads if dense is not None else None, Lq, Lk, device=device)
    _BLOCK_MASKS[key] = (tuple(weakref.ref(t) for t in tensors), bm)
    if len(_BLOCK_MASKS) > _BLOCK_MASK_CACHE_SIZE:
        _BLOCK_MASKS.popitem(last=False)
    return bm


class CompiledBackend(AttentionBackend):
    name = "compiled"
    summary = ("torch.compile(flex_attention): block-sparse structured masks (inference on CPU); pays for sparse "
               "structure (windows, frame blocks, long causal) on a GPU, compiles once per shape; for full or "
               "padding-only attention sdpa is faster")

    def unavailable(self) -> str | None:
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError:
            return f"torch {torch.__version__} has no flex_attention (needs >= 2.5)"
        if not torch.cuda.is_available() and shutil.which("g++") is None and shutil.which("c++") is None:
            return "torch.compile on CPU needs a C++ compiler (g++) on PATH"
        return None

    def rejects(self, call: AttentionCall) -> list[str]:
        why = []
        if call.device.type == "cpu" and call.needs_grad:
            why.append("flex_attention has no backward on CPU: inputs require grad")
        if call.dropout_p > 0:
            why.append("dropout is not supported by flex_attention")
        if call.probs_hook is not None:
            why.append("probs_hook needs the materialised probabilities")
        if call.head_dim < 16 or call.value_dim < 16:
            why.append(f"head dims {call.head_dim}/{call.value_dim} < 16")
        return why

    def kernel(self, call: AttentionCall) -> str:
        return "flex_attention (compiled, block-sparse)" if call.mask is not None else "flex_attention (compiled)"

    def run(self, call: AttentionCall) -> Tensor:
        q = call.q.transpose(1, 2)  # (B, H, Lq, D)
        k = call.k.transpose(1, 2)  # (B, Hkv, Lk, D)
        v = call.v.transpose(1, 2)  # (B, Hkv, Lk, Dv)
        m = call.mask
        block_mask = score_mod = None
        if m is not None:
            if m.has_structure or m.dense is not None:
                block_mask = _block_mask(m, call.batch, call.heads, call.len_q, call.len_k, call.device)
            if m.bias is not None:
                bias = m.bias
                while bias.dim() < 4:
                    bias = bias.unsqueeze(0)
                bias = bias.expand(call.batch, call.heads, call.len_q, call.len_k)

                def score_mod(score, b, h, q_idx, kv_idx):
                    return score + bias[b, h, q_idx, kv_idx].to(score.dtype)

        import torch._dynamo

        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
            out = _flex()(
                q, k, v, score_mod=score_mod, block_mask=block_mask, scale=call.scale,
                enable_gqa=call.kv_heads != call.heads,
            )  # (B, H, Lq, Dv)
        return out.transpose(1, 2)
