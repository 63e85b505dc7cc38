"""A fused attention forward kernel in Triton, for GPUs.

One program computes a (BLOCK_M, Dv) tile of output for one (batch, head): it streams key/value
blocks, keeps a running max and sum (online softmax, base-2 exponentials), adds an additive bias,
applies padding / causal / window / per-frame masks computed from indices, and skips key blocks that
the structured mask hides entirely. Tensors are read in the (B, L, H, D) boundary layout through
their strides: no permute, no copy; grouped-query heads map query head h to kv head h // (H / Hkv).

On a machine without a GPU the same kernel runs in Triton's interpreter when ``TRITON_INTERPRET=1``
is set before the kernel is first built; the tests use that, at small shapes, for correctness.
Forward only: calls that need gradients are refused (use ``sdpa`` for training).
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch
from torch import Tensor

from .base import AttentionBackend, AttentionCall

_KERNELS: dict[bool, object] = {}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def attn_fwd(
        Q, K, V, Out, KP, BIAS, DENSE,
        sqb, sqm, sqh, sqd,
        skb, skn, skh, skd,
        svb, svn, svh, svd,
        sob, som, soh, sod,
        skpb, skpn,
        sbb, sbh, sbm, sbn,
        sdb, sdh, sdm, sdn,
        H, groups, Lq, Lk, D, Dv, qk_scale, LK_BUCKET,
        offset, win_left, win_right, frame_q, frame_k,
        HAS_KP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DENSE: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, FRAME: tl.constexpr,
        IEEE: tl.constexpr, DOT_FP32: tl.constexpr,
        D1: tl.constexpr, D2: tl.constexpr, DV1: tl.constexpr, DV2: tl.constexpr,
        HAS_D2: tl.constexpr, HAS_DV2: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        LOG2E: tl.constexpr = 1.4426950408889634
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        hk = h // groups

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        # A head dim that is not a power of two is read as two power-of-two chunks (40 = 32 + 16,
        # 80 = 64 + 16, 160 = 128 + 32), so little of each tile is padding.
        offs_d1 = tl.arange(0, D1)
        offs_d2 = D1 + tl.arange(0, D2)
        offs_dv1 = tl.arange(0, DV1)
        offs_dv2 = DV1 + tl.arange(0, DV2)
        row_ok = offs_m < Lq
        q_base = Q + b * sqb + h * sqh + offs_m[:, None] * sqm
        q1 = tl.load(q_base + offs_d1[None, :] * sqd, mask=row_ok[:, None] & (offs_d1[None, :] < D), other=0.0)
        if DOT_FP32:
            q1 = q1.to(tl.float32)
        if HAS_D2:
            q2 = tl.load(q_base + offs_d2[None, :] * sqd, mask=row_ok[:, None] & (offs_d2[None, :] < D), other=0.0)
            if DOT_FP32:
                q2 = q2.to(tl.float32)

        # The range of keys any row of this tile can see; blocks outside it are never loaded.
        m_first = pid_m * BLOCK_M
        m_last = tl.minimum(m_first + BLOCK_M, Lq) - 1
        lo = 0
        hi = Lk
        if CAUSAL:
            hi = tl.minimum(hi, m_last + offset + 1)
        if HAS_WR:
            hi = tl.minimum(hi, m_last + offset + win_right + 1)
        if HAS_WL:
            lo = tl.maximum(lo, m_first + offset - win_left)
        if FRAME == 1:
            hi = tl.minimum(hi, (m_last // frame_q + 1) * frame_k)
        if FRAME == 2:
            lo = tl.maximum(lo, (m_first // frame_q) * frame_k)
        lo = (lo // BLOCK_N) * BLOCK_N

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_M, DV1], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_M, DV2], dtype=tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < Lk
            k_base = K + b * skb + hk * skh + offs_n[None, :] * skn
            k1 = tl.load(k_base + offs_d1[:, None] * skd, mask=col_ok[None, :] & (offs_d1[:, None] < D), other=0.0)
            if DOT_FP32:
                k1 = k1.to(tl.float32)
            if IEEE:
                s = tl.dot(q1, k1, input_precision="ieee")
            else:
                s = tl.dot(q1, k1)
            if HAS_D2:
                k2 = tl.load(k_base + offs_d2[:, None] * skd, mask=col_ok[None, :] & (offs_d2[:, None] < D), other=0.0)
                if DOT_FP32:
                    k2 = k2.to(tl.float32)
                if IEEE:
                    s += tl.dot(q2, k2, input_precision="ieee")
                else:
                    s += tl.dot(q2, k2)
            s = s * qk_scale  # (BLOCK_M, BLOCK_N), log2 domain
            keep = row_ok[:, None] & col_ok[None, :]
            if HAS_BIAS:
                bias = tl.load(
                    BIAS + b * sbb + h * sbh + offs_m[:, None] * sbm + offs_n[None, :] * sbn,
                    mask=keep, other=0.0,
                )
                s = s + bias.to(tl.float32) * LOG2E
            if HAS_KP:
                kp = tl.load(KP + b * skpb + offs_n * skpn, mask=col_ok, other=0)
                keep = keep & (kp != 0)[None, :]
            if HAS_DENSE:
                dn = tl.load(
                    DENSE + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_n[None, :] * sdn,
                    mask=keep, other=0,
                )
                keep = keep & (dn != 0)
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + offset)
            if HAS_WL:
                keep = keep & (offs_n[None, :] >= offs_m[:, None] + offset - win_left)
            if HAS_WR:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + offset + win_right)
            if FRAME == 1:
                keep = keep & ((offs_n[None, :] // frame_k) <= (offs_m[:, None] // frame_q))
            if FRAME == 2:
                keep = keep & ((offs_n[None, :] // frame_k) >= (offs_m[:, None] // frame_q))
            s = tl.where(keep, s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with nothing visible so far keeps m = -inf; shift by 0 there to avoid inf - inf.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_shift[:, None])
            alpha = tl.math.exp2(m_i - m_shift)
            l_i = l_i * alpha + tl.sum(p, 1)
            v_base = V + b * svb + hk * svh + offs_n[:, None] * svn
            v1 = tl.load(v_base + offs_dv1[None, :] * svd, mask=col_ok[:, None] & (offs_dv1[None, :] < Dv), other=0.0)
            if DOT_FP32:
                v1 = v1.to(tl.float32)
            if IEEE:
                acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1, input_precision="ieee")
            else:
                acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1)
            if HAS_DV2:
                v2 = tl.load(v_base + offs_dv2[None, :] * svd, mask=col_ok[:, None] & (offs_dv2[None, :] < Dv),
                             other=0.0)
                if DOT_FP32:
                    v2 = v2.to(tl.float32)
                if IEEE:
                    acc2 = acc2 * alpha[:, None] + tl.dot(p.to(v2.dtype), v2, input_precision="ieee")
                else:
                    acc2 = acc2 * alpha[:, None] + tl.dot(p.to(v2.dtype), v2)
            m_i = m_new

        norm = tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows that saw no key stay 0
        o_base = Out + b * sob + h * soh + offs_m[:, None] * som
        tl.store(o_base + offs_dv1[None, :] * sod, (acc1 / norm).to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_dv1[None, :] < Dv))
        if HAS_DV2:
            tl.store(o_base + offs_dv2[None, :] * sod, (acc2 / norm).to(Out.dtype.element_ty),
                     mask=row_ok[:, None] & (offs_dv2[None, :] < Dv))

    return attn_fwd


def _kernel():
    """The kernel for this mode: plain under the interpreter, autotuned over :data:`CUDA_CONFIGS` on a GPU."""
    mode = interpret_mode()
    if mode not in _KERNELS:
        kernel = _build_kernel()
        if not mode:
            import triton

            configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                       for bm, bn, w, st in CUDA_CONFIGS]
            kernel = triton.autotune(configs=configs, key=["D", "Dv", "LK_BUCKET"])(kernel)
        _KERNELS[mode] = kernel
    return _KERNELS[mode]


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (n - 1).bit_length())


def head_dim_chunks(d: int) -> tuple[int, int]:
    """Two power-of-two tile widths (>= 16 each, or 0 for the second) covering head dim ``d`` with the least
    padding: 40 -> (32, 16), 64 -> (64, 0), 80 -> (64, 16), 160 -> (128, 32), 8 -> (16, 0)."""
    if d <= 16:
        return 16, 0
    first = 1 << (d.bit_length() - 1)  # the largest power of two <= d
    rest = d - first
    if rest == 0:
        return first, 0
    second = _pow2(rest)
    if second >= first:  # e.g. 24 -> (16, 16): one tile of 32 pads the same
        return _pow2(d), 0
    return first, second


# Autotuned on CUDA per (head dims, key length bucket): the usual Hopper / Ampere choices.
CUDA_CONFIGS = (  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    (128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 2), (64, 128, 4, 3), (128, 32, 4, 4),
)
INTERPRETER_BLOCKS = (16, 16)  # the CPU interpreter: small tiles, no tuning


def _strides4(t: Tensor | None) -> tuple[int, int, int, int]:
    return (0, 0, 0, 0) if t is None else tuple(t.stride())


class TritonBackend(AttentionBackend):
    name = "triton"
    summary = "mmkit's fused Triton forward kernel (GPU; CPU only under TRITON_INTERPRET=1)"

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install 'mmkit[triton]')"
        if not torch.cuda.is_available() and not interpret_mode():
            return "needs a CUDA GPU (or TRITON_INTERPRET=1 for the slow CPU interpreter)"
        return None

    def rejects(self, call: AttentionCall) -> list[str]:
        why = []
        if call.device.type == "cpu" and not interpret_mode():
            why.append("cpu tensors need TRITON_INTERPRET=1")
        elif call.device.type not in ("cpu", "cuda"):
            why.append(f"device {call.device.type} is not supported")
        if call.dtype not in _DTYPES:
            why.append(f"dtype {call.dtype} (accepted: float32, float16, bfloat16)")
        if call.needs_grad:
            why.append("forward only: inputs require grad (use sdpa for training)")
        if call.dropout_p > 0:
            why.append("dropout is not implemented")
        if call.probs_hook is not None:
            why.append("probs_hook needs the materialised probabilities")
        if max(call.head_dim, call.value_dim) > _MAX_HEAD_DIM:
            why.append(f"head dim {max(call.head_dim, call.value_dim)} > {_MAX_HEAD_DIM}")
        return why

    def kernel(self, call: AttentionCall) -> str:
        return "triton-interpreter" if call.device.type == "cpu" else "triton-fused"

    def run(self, call: AttentionCall) -> Tensor:
        q, k, v = call.q, call.k, call.v
        B, Lq, H, D = q.shape
        Lk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
        out = torch.empty((B, Lq, H, Dv), dtype=q.dtype, device=q.device)
        m = call.mask
        kp = bias = dense = None
        causal = False
        window = None
        frame = None
        direction = "past"
        if m is not None:
            causal, window, frame, direction = m.causal, m.window, m.frame_tokens, m.direction
            if m.key_padding is not None:
                if m.key_padding.shape != (B, Lk) and m.key_padding.shape != (1, Lk):
                    raise ValueError(f"key_padding {tuple(m.key_padding.shape)} must be ({B}, {Lk})")
                kp = m.key_padding.to(device=q.device, dtype=torch.uint8).expand(B, Lk)
            if m.bias is not None:
                bias = _expand4(m.bias, B, H, Lq, Lk).to(q.device)
            if m.dense is not None:
                dense = _expand4(m.dense, B, H, Lq, Lk).to(device=q.device, dtype=torch.uint8)
        wl, wr = window if window is not None else (None, None)
        d1, d2 = head_dim_chunks(D)
        dv1, dv2 = head_dim_chunks(Dv)
        tuned = not interpret_mode()
        blocks = {} if tuned else dict(zip(("BLOCK_M", "BLOCK_N"), INTERPRETER_BLOCKS))

        def grid(meta):
            return (math.ceil(Lq / meta["BLOCK_M"]), B * H)

        _kernel()[grid](
            q, k, v, out,
            kp if kp is not None else q, bias if bias is not None else q, dense if dense is not None else q,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *(kp.stride() if kp is not None else (0, 0)),
            *_strides4(bias), *_strides4(dense),
            H, H // Hkv, Lq, Lk, D, Dv, call.scale * 1.4426950408889634, _pow2(Lk, 64),
            Lk - Lq, wl or 0, wr or 0, frame[0] if frame else 1, frame[1] if frame else 1,
            HAS_KP=kp is not None, HAS_BIAS=bias is not None, HAS_DENSE=dense is not None,
            CAUSAL=bool(causal), HAS_WL=wl is not None, HAS_WR=wr is not None,
            FRAME=0 if frame is None else (1 if direction == "past" else 2),
            IEEE=q.dtype == torch.float32,
            # Triton's CPU interpreter computes tl.dot on bfloat16 operands wrongly (numpy has no
            # bfloat16); there the dots take fp32 operands. GPUs keep native low-precision dots.
            DOT_FP32=q.dtype == torch.bfloat16 and not q.is_cuda,
            D1=d1, D2=d2 or 16, DV1=dv1, DV2=dv2 or 16, HAS_D2=d2 > 0, HAS_DV2=dv2 > 0, **blocks,
        )
        return out


def _expand4(t: Tensor, B: int, H: int, Lq: int, Lk: int) -> Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t.expand(B, H, Lq, Lk)
