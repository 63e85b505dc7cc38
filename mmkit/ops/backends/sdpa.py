"""torch's ``scaled_dot_product_attention``: the default backend.

On CPU, torch has one fused kernel (``_scaled_dot_product_flash_attention_for_cpu``), a tiled online
softmax that never materialises the (Lq, Lk) matrix. torch silently falls back to the unfused math
path for some inputs; :meth:`SdpaBackend.kernel` says which path a call takes, so ``mmkit info``,
``mmkit.ops.explain`` and the debug log can report it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import AttentionBackend, AttentionCall


class SdpaBackend(AttentionBackend):
    name = "sdpa"
    summary = "torch.nn.functional.scaled_dot_product_attention (fused flash kernel on CPU and CUDA)"

    def rejects(self, call: AttentionCall) -> list[str]:
        if call.probs_hook is not None:
            return ["probs_hook needs the materialised probabilities (use backend='eager')"]
        return []

    def kernel(self, call: AttentionCall) -> str:
        why_math = []
        if call.dropout_p > 0:
            why_math.append("dropout>0")
        if call.head_dim != call.value_dim:
            why_math.append("q/k and v head dims differ")
        if call.mask is not None and call.mask.bias is not None and call.mask.bias.requires_grad:
            why_math.append("mask requires grad")
        if call.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            why_math.append(f"dtype {call.dtype}")
        if call.device.type == "cpu" and call.dtype == torch.float16:
            why_math.append("fp16 on cpu")
        if why_math:
            return "math (" + ", ".join(why_math) + ")"
        return "flash"

    def run(self, call: AttentionCall) -> Tensor:
        # Strided views, no copies: the CPU flash kernel reads them as fast as contiguous tensors
        # (benchmarks/attention.py), and copies would triple the extra memory of a call.
        q = call.q.transpose(1, 2)  # (B, H, Lq, D)
        k = call.k.transpose(1, 2)  # (B, Hkv, Lk, D)
        v = call.v.transpose(1, 2)  # (B, Hkv, Lk, Dv)
        mask = call.mask
        attn_mask = keep = None
        is_causal = False
        if mask is not None:
            if mask.only_causal and call.len_q == call.len_k:
                is_causal = True  # top-left == bottom-right when square: no mask tensor at all
            else:
                keep = mask.keep_tensor(call.batch, call.len_q, call.len_k, call.device)  # (B|1, 1, Lq, Lk)
                attn_mask = keep
                if mask.bias is not None:
                    attn_mask = mask.additive(call.batch, call.len_q, call.len_k, q.dtype, call.device, keep=keep)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=call.dropout_p,
            is_causal=is_causal,
            scale=call.scale,
            enable_gqa=call.kv_heads != call.heads,
        )  # (B, H, Lq, Dv)
        if keep is not None and mask.may_have_empty_rows(call.len_q, call.len_k):
            out = zero_empty_rows(out, keep)
        return out.transpose(1, 2)


def zero_empty_rows(out: Tensor, keep: Tensor) -> Tensor:
    """Set the rows of out (B, H, Lq, Dv) whose keep (B|1, 1|H, Lq, Lk) row is all False to zeros: the
    contract of :func:`mmkit.ops.attention`, whatever a kernel returns there (NaN, or an average of V)."""
    return out.masked_fill(~keep.any(dim=-1, keepdim=True), 0.0)
