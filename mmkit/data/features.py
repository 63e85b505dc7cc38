"""Frozen-encoder feature cache: encode every training image once, train the connector many times.

The cache is one safetensors file holding ``features`` (num_items, N, D) plus a JSON header naming the
encoder and the item ids, so a stale cache (other encoder, other items) is detected and rebuilt.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..config import atomic_write_bytes


@torch.no_grad()
def encode_all(
    encoder, load: Callable[[int], object], count: int, *, batch_size: int = 32, desc: str = "encoding images"
) -> Tensor:
    """Encoder tokens for items 0..count-1 (``load(i)`` returns a PIL image) -> (count, N, D) float32."""
    chunks = []
    for start in tqdm(range(0, count, batch_size), desc=desc, unit="batch", leave=False):
        images = [load(i) for i in range(start, min(count, start + batch_size))]
        chunks.append(encoder.encode(images).tokens.float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0)


def cached_features(
    path: str | os.PathLike,
    *,
    encoder,
    ids: Sequence[str],
    load: Callable[[int], object],
    signature: dict,
    batch_size: int = 32,
    dtype: torch.dtype = torch.float16,
) -> Tensor:
    """Load ``path`` if it matches ``signature`` and ``ids``; otherwise encode and write it atomically.

    Returns (len(ids), N, D) float32. ``dtype`` is the storage type (fp16 halves the file).
    """
    from safetensors import safe_open
    from safetensors.torch import save

    path = Path(path)
    header = {"signature": json.dumps(signature, sort_keys=True), "ids": json.dumps(list(ids))}
    if path.is_file():
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("signature") == header["signature"] and meta.get("ids") == header["ids"]:
                return fh.get_tensor("features").float()
    feats = encode_all(encoder, load, len(ids), batch_size=batch_size, desc=f"caching features -> {path.name}")
    atomic_write_bytes(path, save({"features": feats.to(dtype).contiguous()}, metadata=header))
    return feats


def source_features(source, encoder, encoder_info: dict, cache_dir: str | os.PathLike) -> Tensor:
    """Encoder tokens (num_images, N, D) for every image of ``source`` (a :class:`~mmkit.data.sources.DataSource`),
    cached in ``cache_dir``. ``encoder_info`` = {"spec": ..., load options} identifies the encoder."""
    import hashlib

    signature = {"encoder": encoder_info, "data": source.signature()}
    digest = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{source.config.source}-{source.config.split}-{digest}.safetensors"
    return cached_features(path, encoder=encoder, ids=source.ids(), load=source.image, signature=signature)
