"""Agent attention (Han et al., ECCV 2024): softmax attention through a small set of agent tokens.

    O = softmax(Q A^T s2 + B2) softmax(A K^T s + B1) V  + shortcut * V + DWC(V)

Two chained :func:`~mmkit.ops.attention` calls through n agents cost O(N n d) instead of O(N^2 d):
first the agents gather from the keys/values ("agent aggregation"), then every query reads from the
agents ("agent broadcast"). ``s2 = s ** agent_scale_exponent``: AgentSD uses 0.3, which softens the
second softmax; plain Agent Attention uses 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import attention
from .dispatch import automatic_backend


def pool_agents(q: Tensor, num_agents: int, grid: tuple[int, int] | None = None) -> Tensor:
    """Agents as adaptive-average-pooled queries.

    q: (B, N, H, D) -> (B, n, H, D). With ``grid=(h, w)`` (h * w == N) the queries are pooled as an
    image to a sqrt(n) x sqrt(n) grid (n must be a square); without it, along the sequence.
    """
    B, N, H, D = q.shape
    if grid is not None:
        h, w = grid
        if h * w != N:
            raise ValueError(f"grid {grid} has {h * w} cells but the sequence has N={N} tokens")
        side = math.isqrt(num_agents)
        if side * side != num_agents:
            raise ValueError(f"num_agents={num_agents} must be a perfect square to pool a 2-D grid")
        img = q.reshape(B, h, w, H * D).permute(0, 3, 1, 2)  # (B, H*D, h, w)
        pooled = F.adaptive_avg_pool2d(img, (side, side))  # (B, H*D, side, side)
        return pooled.flatten(2).transpose(1, 2).reshape(B, num_agents, H, D)
    seq = q.reshape(B, N, H * D).transpose(1, 2)  # (B, H*D, N)
    pooled = F.adaptive_avg_pool1d(seq, num_agents)  # (B, H*D, n)
    return pooled.transpose(1, 2).reshape(B, num_agents, H, D)


def depthwise_conv_values(v: Tensor, weight: Tensor, bias: Tensor | None, grid: tuple[int, int]) -> Tensor:
    """Depthwise 2-D convolution of the values laid out on their image grid.

    v: (B, N, H, Dv) with N = h * w; weight: (H * Dv, 1, kh, kw); bias: (H * Dv,) -> (B, N, H, Dv).
    """
    B, N, H, Dv = v.shape
    h, w = grid
    if h * w != N:
        raise ValueError(f"grid {grid} has {h * w} cells but the values have N={N} tokens")
    img = v.reshape(B, h, w, H * Dv).permute(0, 3, 1, 2)  # (B, C, h, w)
    kh, kw = weight.shape[-2:]
    out = F.conv2d(img, weight, bias, padding=(kh // 2, kw // 2), groups=H * Dv)  # (B, C, h, w)
    return out.permute(0, 2, 3, 1).reshape(B, N, H, Dv)


def agent_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    agents: Tensor | None = None,
    num_agents: int = 49,
    grid: tuple[int, int] | None = None,
    agent_bias: Tensor | None = None,
    query_bias: Tensor | None = None,
    scale: float | None = None,
    agent_scale_exponent: float = 1.0,
    shortcut: float = 0.0,
    dwc_weight: Tensor | None = None,
    dwc_bias: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Agent attention through ``n`` agent tokens.

    Args:
        q: (B, N, H, D); k: (B, M, Hkv, D); v: (B, M, Hkv, Dv).
        agents: (B, n, H, D) agent tokens; when None they are pooled from ``q`` (see :func:`pool_agents`).
        num_agents: n when pooling (49 in the paper).
        grid: (h, w) image layout of the tokens, for 2-D pooling and the depthwise conv.
        agent_bias: B1, added to the agent->key scores, broadcastable to (B, H, n, M).
        query_bias: B2, added to the query->agent scores, broadcastable to (B, H, N, n).
        scale: s for the first softmax; default D ** -0.5.
        agent_scale_exponent: the second softmax uses ``s ** agent_scale_exponent`` (AgentSD: 0.3).
        shortcut: adds ``shortcut * V`` (AgentSD: 0.075); needs M == N and Hkv == H.
        dwc_weight, dwc_bias: depthwise conv on V, weight (H * Dv, 1, kh, kw); needs ``grid``.
        backend: attention backend for both calls.

    Returns:
        (B, N, H, Dv).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if agents is None:
        agents = pool_agents(q, num_agents, grid)  # (B, n, H, D)
    if agent_bias is None and query_bias is None and backend is None and q.dim() == 4 and k.shape[2] == q.shape[2] \
            and automatic_backend() == "sdpa":
        out = _two_sdpa_calls(q, k, v, agents, scale, scale**agent_scale_exponent)  # (B, N, H, Dv)
    else:
        # Aggregation: agents attend to all keys.
        agent_values = attention(agents, k, v, mask=agent_bias, scale=scale, backend=backend)  # (B, n, H, Dv)
        # Broadcast: each query reads from the agents.
        out = attention(q, agents, agent_values, mask=query_bias, scale=scale**agent_scale_exponent, backend=backend)
    if shortcut or dwc_weight is not None:
        if v.shape[1] != q.shape[1] or v.shape[2] != q.shape[2]:
            raise ValueError(
                f"the value shortcut / depthwise conv need self-attention values (B, N, H, Dv) matching "
                f"q {tuple(q.shape)}; got v {tuple(v.shape)}"
            )
        if shortcut:
            out = out + shortcut * v
        if dwc_weight is not None:
            if grid is None:
                raise ValueError("dwc_weight needs grid=(h, w) to lay the values out as an image")
            out = out + depthwise_conv_values(v, dwc_weight, dwc_bias, grid)
    return out


def _two_sdpa_calls(q: Tensor, k: Tensor, v: Tensor, agents: Tensor, scale: float, agent_scale: float) -> Tensor:
    """Both stages in SDPA's (B, H, L, D) layout, one transpose per tensor (what ``attention()`` does twice)."""
    qt, kt, vt, at = (t.transpose(1, 2) for t in (q, k, v, agents))  # (B, H, L, D)
    if q.is_cuda and not torch.compiler.is_compiling():
        # The skinny stage (n ~ 49 queries over N keys): torch's automatic choice on Hopper, cuDNN, ran at
        # about half the flash kernel's speed there (H200, 2026-11-29); name the kernels explicitly.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            agent_values = F.scaled_dot_product_attention(at, kt, vt, scale=scale)  # (B, H, n, Dv)
    else:
        agent_values = F.scaled_dot_product_attention(at, kt, vt, scale=scale)  # (B, H, n, Dv)
    return F.scaled_dot_product_attention(qt, at, agent_values, scale=agent_scale).transpose(1, 2)  # (B, N, H, Dv)


def expand_agent_bias(bias: Tensor, batch: int) -> Tensor:
    """Pre-expand a (H, n, M) or (1, H, n, M) bias to a contiguous (B, H, n, M) tensor, once per shape.

    Inference helper: SDPA reads a broadcast (stride-0) bias more slowly than a contiguous one.
    """
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    return bias.expand(batch, *bias.shape[1:]).contiguous()


__all__ = ["agent_attention", "depthwise_conv_values", "expand_agent_bias", "pool_agents"]
