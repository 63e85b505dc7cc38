"""Frozen-encoder feature cache: encode every training image once, train the connector many times.

The cache is one safetensors file holding ``features`` (num_items, N, D) plus a JSON header naming the
encoder and the item ids, so a stale cache (other encoder, other items) is detected and rebuilt. While it is
being built, every finished batch is kept in a ``<cache>.partial/`` folder: a stopped run (a crash, the end of a
session) resumes from them instead of encoding everything again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..config import atomic_write_bytes


@torch.no_grad()
def encode_all(
    encoder, load: Callable[[int], object], count: int, *, batch_size: int = 32, desc: str = "encoding images",
    keep: str | os.PathLike | None = None, fingerprint: str = "", keep_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Encoder tokens for items 0..count-1 (``load(i)`` returns a PIL image) -> (count, N, D) float32.

    ``keep``: a folder where each finished batch is written as it comes (one small safetensors file per batch,
    stamped with ``fingerprint``, stored as ``keep_dtype``); batches found there with the same fingerprint and
    size are read, not encoded.
    """
    from safetensors import safe_open
    from safetensors.torch import save

    keep = None if keep is None else Path(keep)
    chunks, resumed = [], 0
    bar = tqdm(range(0, count, batch_size), desc=desc, unit="batch", leave=False)
    for start in bar:
        stop = min(count, start + batch_size)
        kept = None if keep is None else keep / f"{start:08d}-{stop:08d}.safetensors"
        tokens = None
        if kept is not None and kept.is_file():
            try:
                with safe_open(str(kept), framework="pt") as fh:
                    if (fh.metadata() or {}).get("fingerprint") == fingerprint:
                        tokens = fh.get_tensor("tokens")
            except Exception:  # gone or unreadable (another process finished the cache and removed it): encode
                tokens = None
        if tokens is not None and tokens.shape[0] == stop - start:
            chunks.append(tokens.float())
            resumed += 1
            bar.set_postfix(kept=resumed)
            continue
        tokens = encoder.encode([load(i) for i in range(start, stop)]).tokens.float().cpu()
        if kept is not None:
            try:
                atomic_write_bytes(kept, save({"tokens": tokens.to(keep_dtype).contiguous()},
                                              metadata={"fingerprint": fingerprint}))
            except OSError:  # the folder was removed under us (another process wrote the cache): keep going
                pass
        chunks.append(tokens)
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
    keep = path.with_name(path.name + ".partial")  # finished batches, until the cache is written
    if path.is_file():
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("signature") == header["signature"] and meta.get("ids") == header["ids"]:
                shutil.rmtree(keep, ignore_errors=True)  # left by a build stopped just after writing the cache
                return fh.get_tensor("features").float()
    fingerprint = hashlib.sha256(json.dumps([header, batch_size, str(dtype)]).encode()).hexdigest()[:16]
    feats = encode_all(encoder, load, len(ids), batch_size=batch_size, desc=f"caching features -> {path.name}",
                       keep=keep, fingerprint=fingerprint, keep_dtype=dtype).to(dtype)
    atomic_write_bytes(path, save({"features": feats.contiguous()}, metadata=header))
    shutil.rmtree(keep, ignore_errors=True)
    return feats.float()  # the values a later run loads from the file, in this run too


def source_features(source, encoder, encoder_info: dict, cache_dir: str | os.PathLike) -> Tensor:
    """Encoder tokens (num_images, N, D) for every image of ``source`` (a :class:`~mmkit.data.sources.DataSource`),
    cached in ``cache_dir``. ``encoder_info`` = {"spec": ..., load options} identifies the encoder."""

    signature = {"encoder": encoder_info, "data": source.signature()}
    digest = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{source.config.source}-{source.config.split}-{digest}.safetensors"
    return cached_features(path, encoder=encoder, ids=source.ids(), load=source.image, signature=signature)
