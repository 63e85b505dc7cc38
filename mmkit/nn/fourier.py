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
    of the channels each for sin / cos of the column and of the row, at frequencies 1 / 10000^(k / (dim // 4)),
    the rest (dim % 4) zero. Every channel lies in [-1, 1]."""
    quarter = dim // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1))  # (dim // 4,)
    y, x = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                          indexing="ij")
    x, y = x.reshape(-1, 1) * freq, y.reshape(-1, 1) * freq  # (rows * cols, dim // 4)
    codes = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)
    return torch.nn.functional.pad(codes, (0, dim - 4 * quarter)).float()
