"""READ's Similarity as Points (Qian et al., CVPR 2025): the ``<SEG>`` state's similarity map becomes point
prompts for SAM.

1. ``similarity_map``: raw dot products of the ``<SEG>`` hidden state with the LLM's last-layer hidden states
   at the image positions (the core's :func:`~mmkit.ops.attention_scores`, scale 1), on the image-token
   grid: (B, h, w).
2. ``normalised_map``: bilinear down-sampling by ``down_sample`` (24x24 -> 12x12 in the paper) and min-max
   normalisation per image, to [0, 1].
3. ``select_points``: positives ``S >= 0.8`` (highest first), negatives ``S <= 0.2`` (lowest first), then the
   neutral cells in grid order with label -1 (SAM's "not a point"); the first ``num_points`` (30) are kept.
   Padding cells (``valid`` False, e.g. outside a non-square image) are never chosen; when there are fewer
   usable cells than points, the rest are SAM padding points (label -10, no embedding).
4. ``cell_centres``: grid cells -> pixel coordinates (x, y) in the image SAM sees; with a ``box``, the grid
   covers only that part of it (the encoder's crop, e.g. timm's centre 87.5% or CLIP's middle square).
5. ``discrete_to_continuous`` (DtoC): each point moves to the softmax(S)-weighted, Gaussian-windowed mean
   position around it on the full-resolution map, so the mask loss reaches the similarity map (and the
   hidden states behind it). The official code uses the min-max normalised map bilinearly up-sampled to
   the image's pixels and the window ``exp(-d^2)`` in pixels (sigma = 1/sqrt(2)); both are config fields.

Every step keeps static shapes and makes no host reads (sorting replaces ``nonzero``), so it compiles and
runs on a GPU without syncs::

    coords, labels = sasp_points(seg_state, image_states, grid=(7, 7), image_size=(256, 256), config=SasPConfig())
    # coords (B, 30, 2) float pixel (x, y); labels (B, 30) long in {1, 0, -1, -10}
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import StrictConfig
from ..ops import attention_scores

POSITIVE, NEGATIVE, NEUTRAL, PADDING = 1, 0, -1, -10  # SAM's point labels (transformers' SamPromptEncoder)


@dataclass
class SasPConfig(StrictConfig):
    """Defaults: READ-7B's (``down_sample`` 2, thresholds 0.8 / 0.2, 30 points, DtoC with exp(-d^2) in pixels)."""

    down_sample: int = 2
    positive_threshold: float = 0.8
    negative_threshold: float = 0.2
    num_points: int = 30
    dtoc: bool = True
    dtoc_sigma: float = 1 / math.sqrt(2)  # Gaussian window in pixels of the DtoC map: exp(-d^2 / (2 sigma^2))
    dtoc_size: int | None = None  # side of the DtoC map; None: the image SAM sees (the official choice)
    # where the token grid lies in SAM's frame: "encoder": on the part of the photo the encoder keeps (its
    # centre crop, VisionEncoder.view_box; the official code likewise undoes CLIP's crop); "image": on all of
    # SAM's square frame (what mmkit did before 2026-11-30, off by the crop margin)
    grid_view: str = "encoder"
    # which LLM states are compared: None, the last layer after the final norm (READ's choice, paper and code);
    # k, the output of decoder layer k (transformers' hidden_states[k]): an ablation of that choice
    layer: int | None = None

    def __post_init__(self) -> None:
        if self.down_sample < 1:
            raise ValueError(f"SasPConfig.down_sample must be >= 1, got {self.down_sample}")
        if not 0.0 <= self.negative_threshold < self.positive_threshold <= 1.0:
            raise ValueError("SasPConfig needs 0 <= negative_threshold < positive_threshold <= 1, got "
                             f"{self.negative_threshold} and {self.positive_threshold}")
        if self.num_points < 1:
            raise ValueError(f"SasPConfig.num_points must be >= 1, got {self.num_points}")
        if self.dtoc_sigma <= 0:
            raise ValueError(f"SasPConfig.dtoc_sigma must be > 0, got {self.dtoc_sigma}")
        if self.grid_view not in ("encoder", "image"):
            raise ValueError(f"SasPConfig.grid_view must be 'encoder' or 'image', got {self.grid_view!r}")
        if self.dtoc_size is not None and self.dtoc_size < 1:
            raise ValueError(f"SasPConfig.dtoc_size must be >= 1 or None, got {self.dtoc_size}")


def similarity_map(seg_state: Tensor, image_states: Tensor, grid: tuple[int, int]) -> Tensor:
    """Raw dot products of the ``<SEG>`` state with the image-position states, on the token grid.

    seg_state: (B, D); image_states: (B, h * w, D) in row-major grid order -> (B, h, w).
    """
    h, w = grid
    if image_states.shape[1] != h * w:
        raise ValueError(f"similarity_map: {image_states.shape[1]} image states do not fill a {h}x{w} grid")
    scores = attention_scores(seg_state[:, None, None, :], image_states[:, :, None, :], scale=1.0)  # (B, 1, 1, hw)
    return scores.reshape(-1, h, w)


def min_max(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Per-image min-max normalisation of (B, h, w) to [0, 1] (a constant map becomes zeros)."""
    flat = maps.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(maps)


def normalised_map(sim: Tensor, down_sample: int) -> Tensor:
    """(B, h, w) raw scores -> (B, h // down_sample, w // down_sample) in [0, 1] (bilinear, then min-max)."""
    h, w = sim.shape[-2:]
    if down_sample > 1:
        size = (max(h // down_sample, 1), max(w // down_sample, 1))
        sim = F.interpolate(sim[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return min_max(sim.float())


def select_points(norm: Tensor, config: SasPConfig, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Choose SAM point prompts from a normalised map.

    norm: (B, h, w) in [0, 1]; valid: optional (B, h, w) bool, False for padding cells.
    Returns cell indices (B, P) long (row-major; 0 for padding points) and labels (B, P) long, P =
    ``config.num_points``: positives by descending score, negatives by ascending score, neutrals (-1) in grid
    order, padding (-10) last.
    """
    b, h, w = norm.shape
    s = norm.flatten(1)  # (B, hw)
    ok = torch.ones_like(s, dtype=torch.bool) if valid is None else valid.flatten(1).to(torch.bool)
    positive = ok & (s >= config.positive_threshold)
    negative = ok & (s <= config.negative_threshold) & ~positive
    neutral = ok & ~positive & ~negative
    # group rank (smaller first), then the order inside each group; two stable sorts make it a lexicographic sort
    group = torch.full_like(s, 3.0)
    group = torch.where(neutral, 2.0, group)
    group = torch.where(negative, 1.0, group)
    group = torch.where(positive, 0.0, group)
    cell = torch.arange(h * w, device=s.device, dtype=s.dtype).expand_as(s)
    within = torch.where(positive, -s, torch.where(negative, s, cell))
    order = torch.sort(within, dim=1, stable=True).indices
    order = order.gather(1, torch.sort(group.gather(1, order), dim=1, stable=True).indices)
    labels_by_cell = torch.full_like(s, PADDING, dtype=torch.long)
    labels_by_cell = torch.where(neutral, NEUTRAL, labels_by_cell)
    labels_by_cell = torch.where(negative, NEGATIVE, labels_by_cell)
    labels_by_cell = torch.where(positive, POSITIVE, labels_by_cell)
    k = min(config.num_points, h * w)
    index, labels = order[:, :k], labels_by_cell.gather(1, order[:, :k])
    index = torch.where(labels == PADDING, 0, index)
    if k < config.num_points:  # a grid smaller than the point budget: SAM padding points fill the rest
        pad = config.num_points - k
        index = torch.cat([index, index.new_zeros(b, pad)], dim=1)
        labels = torch.cat([labels, labels.new_full((b, pad), PADDING)], dim=1)
    return index, labels


def cell_centres(index: Tensor, grid: tuple[int, int], image_size: tuple[int, int],
                 box: Tensor | None = None) -> Tensor:
    """Cell indices (B, P) of an (h, w) grid -> the cells' centres (B, P, 2) as (x, y) in an (H, W) image, in
    SAM's pixel-index convention (pixel i spans [i, i + 1) and SAM's prompt encoder adds the 0.5 itself).
    ``box``: (B, 4) x0, y0, x1, y1 in those pixels, the part of the image the grid covers (the encoder's
    crop, :meth:`~mmkit.encoders.VisionEncoder.view_box`); None: the whole image."""
    h, w = grid
    height, width = image_size
    if box is None:  # the whole image: plain arithmetic, no tensor built per call
        x = ((index % w).float() + 0.5) * (width / w) - 0.5
        y = ((index // w).float() + 0.5) * (height / h) - 0.5
    else:
        box = box.to(device=index.device, dtype=torch.float32)
        x0, y0, x1, y1 = (box[:, i, None] for i in range(4))  # (B, 1) each
        x = x0 + ((index % w).float() + 0.5) * ((x1 - x0) / w) - 0.5
        y = y0 + ((index // w).float() + 0.5) * ((y1 - y0) / h) - 0.5
    return torch.stack([x.clamp(0, width - 1), y.clamp(0, height - 1)], dim=-1)


def dense_map(norm: Tensor, size: tuple[int, int], image_size: tuple[int, int], box: Tensor | None = None) -> Tensor:
    """DtoC's full-resolution map: (B, h, w) in [0, 1] -> (B, Hd, Wd) laid over the (H, W) image. Without a
    ``box`` a bilinear resize (``align_corners=False``); with one, (B, 4) in image pixels, the map is resized
    onto the box and the rest is zero, as the official code zero-pads the crop back to the image."""
    if box is None:
        return F.interpolate(norm[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    hd, wd = size
    height, width = image_size
    box = box.to(device=norm.device, dtype=norm.dtype)
    px = (torch.arange(wd, device=norm.device, dtype=norm.dtype) + 0.5) * (width / wd)  # map pixel centres, image px
    py = (torch.arange(hd, device=norm.device, dtype=norm.dtype) + 0.5) * (height / hd)
    gx = (px - box[:, 0, None]) / (box[:, 2, None] - box[:, 0, None]) * 2 - 1  # (B, Wd) in the box's [-1, 1]
    gy = (py - box[:, 1, None]) / (box[:, 3, None] - box[:, 1, None]) * 2 - 1  # (B, Hd)
    grid = torch.stack([gx[:, None, :].expand(-1, hd, -1), gy[:, :, None].expand(-1, -1, wd)], dim=-1)
    sampled = F.grid_sample(norm[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0]
    inside = (gx.abs() <= 1)[:, None, :] & (gy.abs() <= 1)[:, :, None]  # (B, Hd, Wd)
    return sampled * inside.to(sampled.dtype)


def discrete_to_continuous(points: Tensor, dense: Tensor, sigma: float, image_size: tuple[int, int]) -> Tensor:
    """Move each point to the softmax(dense)-weighted mean position inside a Gaussian window around it.

    points: (B, P, 2) pixel (x, y) in an (H, W) image, in SAM's pixel-index convention; dense: (B, Hd, Wd)
    scores on a map covering the image the way bilinear resizing (``align_corners=False``) lays it out: map
    pixel j is centred on image coordinate (j + 0.5) * W / Wd - 0.5 (= j when the map has the image's size,
    the official code's grid); sigma in pixels of ``dense``. Differentiable in ``dense``.
    The window is separable, so the cost is two small matmuls per image instead of P full-map products.
    """
    height, width = image_size
    hd, wd = dense.shape[-2:]
    sx, sy = width / wd, height / hd  # image pixels per map pixel
    px, py = (points[..., 0] + 0.5) / sx - 0.5, (points[..., 1] + 0.5) / sy - 0.5  # (B, P): in map pixels
    gx = torch.arange(wd, device=dense.device, dtype=dense.dtype)
    gy = torch.arange(hd, device=dense.device, dtype=dense.dtype)
    wx = torch.exp(-((gx - px[..., None].to(dense.dtype)) ** 2) / (2 * sigma**2))  # (B, P, Wd)
    wy = torch.exp(-((gy - py[..., None].to(dense.dtype)) ** 2) / (2 * sigma**2))  # (B, P, Hd)
    flat = dense.flatten(1)
    e = torch.exp(flat - flat.max(dim=1, keepdim=True).values).view_as(dense)  # softmax numerator (B, Hd, Wd)
    rows = torch.einsum("bph,bhw->bpw", wy, e)  # (B, P, Wd): window over y applied
    total = (rows * wx).sum(-1).clamp_min(torch.finfo(dense.dtype).tiny)  # (B, P)
    mean_x = (rows * wx * gx).sum(-1) / total
    mean_y = torch.einsum("bph,bhw,bpw->bp", wy * gy, e, wx) / total
    return torch.stack([(mean_x + 0.5) * sx - 0.5, (mean_y + 0.5) * sy - 0.5], dim=-1).to(points.dtype)


def sasp_points(
    seg_state: Tensor,
    image_states: Tensor,
    *,
    grid: tuple[int, int],
    image_size: tuple[int, int],
    config: SasPConfig,
    valid: Tensor | None = None,
    box: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The whole SasP step: (B, D) ``<SEG>`` states and (B, h * w, D) image states -> SAM point prompts.

    Returns coordinates (B, P, 2) pixel (x, y) in the (H, W) image SAM sees (differentiable through DtoC) and
    labels (B, P) long. ``valid``: optional (B, h', w') bool on the down-sampled grid (False: padding cell).
    ``box``: optional (B, 4) x0, y0, x1, y1 in those pixels: the part of the image the token grid covers (an
    encoder's centre crop; SAM's padding of a non-square photo); None: all of it.
    """
    sim = similarity_map(seg_state, image_states, grid).float()  # (B, h, w)
    norm = normalised_map(sim, config.down_sample)
    index, labels = select_points(norm.detach(), config, valid)
    coords = cell_centres(index, tuple(norm.shape[-2:]), image_size, box)
    if config.dtoc:
        side = config.dtoc_size
        size = image_size if side is None else (side, side)
        dense = dense_map(min_max(sim), size, image_size, box)
        moved = discrete_to_continuous(coords, dense, config.dtoc_sigma, image_size)
        coords = torch.where((labels == PADDING)[..., None], coords, moved)
    return coords, labels
