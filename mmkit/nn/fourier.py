"""Random Fourier features: ``[sin(2 pi B x); cos(2 pi B x)]`` with Gaussian B (SAM and NeTI share it)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class FourierFeatures(nn.Module):
    """Encode (..., in_dim) coordinates as (..., 2 * num_frequencies) features.

    ``B ~ N(0, sigma_i^2)`` per input dimension i (``sigma`` is a scalar or one value per dimension),
    stored as a buffer so it is saved with the model. ``two_pi`` multiplies the projection by 2 pi
    (SAM's prompt encoder); ``normalize`` L2-normalises the output (NeTI).
    """

    def __init__(
        self,
        in_dim: int,
        num_frequencies: int,
        sigma: float | Sequence[float] = 1.0,
        *,
        two_pi: bool = True,
        normalize: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        sig = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
        if sig.numel() not in (1, in_dim):
            raise ValueError(f"sigma must be a scalar or have in_dim={in_dim} values, got {sig.numel()}")
        proj = torch.randn(in_dim, num_frequencies, generator=generator) * sig.reshape(-1, 1)
        self.register_buffer("projection", proj)  # (in_dim, F)
        self.two_pi = two_pi
        self.normalize = normalize

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_dim) -> (..., 2F)."""
        z = x.to(self.projection.dtype) @ self.projection  # (..., F)
        if self.two_pi:
            z = z * (2 * math.pi)
        out = torch.cat([z.sin(), z.cos()], dim=-1)
        if self.normalize:
            out = out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return out



def grid_sincos(rows: int, cols: int, dim: int) -> Tensor:
    """Fixed 2-D sine-cosine position codes of a row-major (rows, cols) token grid -> (rows * cols, dim): a quarter
    of the channels each for sin / cos of the column and of the row, at frequencies spread geometrically from half
    a period across the grid (pi / side) to a period of four cells (pi / 2), so that every channel varies over a
    grid of a few cells (ViT / MAE codes, base 10000, barely move across 7 cells); the rest (dim % 4) zero. Every
    channel lies in [-1, 1]."""
    quarter = dim // 4

    def axis(n: int) -> Tensor:  # (n, 2 * quarter): sin and cos of cell index times each frequency
        lo, hi = math.pi / max(n, 1), math.pi / 2
        freq = lo * (hi / lo) ** (torch.arange(quarter, dtype=torch.float64) / max(quarter - 1, 1))
        z = torch.arange(n, dtype=torch.float64)[:, None] * freq
        return torch.cat([z.sin(), z.cos()], dim=1)

    x = axis(cols).repeat(rows, 1)  # (rows * cols, 2 * quarter), column of each cell
    y = axis(rows).repeat_interleave(cols, dim=0)  # row of each cell
    return torch.nn.functional.pad(torch.cat([x, y], dim=1), (0, dim - 4 * quarter)).float()
