"""Read a pretrained state dict a user names, without unpickling: a file, a model folder or a hub name.

    state = read_state_dict("blip2/model.safetensors")
    state = read_state_dict("checkpoints/blip2-opt-2.7b", prefixes=("qformer.", "query_tokens"))
    state = read_state_dict("Salesforce/blip2-opt-2.7b", prefixes=("qformer.", "query_tokens"))  # hub, online

Files: ``.safetensors``, or ``.bin`` / ``.pt`` / ``.pth`` read with ``torch.load(weights_only=True)``. A folder (or
a downloaded hub snapshot) holds ``model.safetensors`` / ``pytorch_model.bin`` or their sharded
``*.index.json``; with ``prefixes``, only the shards holding those keys are read (or downloaded).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def _wanted(key: str, prefixes: Sequence[str] | None) -> bool:
    return prefixes is None or any(key.startswith(p) for p in prefixes)


def _read_file(path: Path, prefixes: Sequence[str] | None) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys() if _wanted(k, prefixes)}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    if path.suffix in PICKLE_SUFFIXES:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # pickle / zip errors of a foreign or corrupt file
            raise ValueError(f"{path} is not a readable weights-only torch checkpoint ({type(err).__name__}: {err})"
                             ) from None
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise ValueError(f"{path} does not hold a state dict")
        return {k: v for k, v in state.items() if isinstance(v, Tensor) and _wanted(k, prefixes)}
    raise ValueError(f"cannot read weights from {path}: accepted are .safetensors, {', '.join(PICKLE_SUFFIXES)} "
                     f"files, or a model folder with {' / '.join(SINGLE_FILES + INDEX_FILES)}")


def _files_in_folder(folder: Path, prefixes: Sequence[str] | None, fetch) -> list[Path]:
    for index in INDEX_FILES:
        path = fetch(index)
        if path is not None:
            weight_map = json.loads(Path(path).read_text())["weight_map"]
            shards = sorted({shard for key, shard in weight_map.items() if _wanted(key, prefixes)})
            return [fetch(shard, required=True) for shard in shards]
    for single in SINGLE_FILES:
        path = fetch(single)
        if path is not None:
            return [Path(path)]
    raise ValueError(f"{folder}: no weights found; expected {' or '.join(SINGLE_FILES + INDEX_FILES)}")


def read_state_dict(source: str | os.PathLike, *, prefixes: Sequence[str] | None = None) -> dict[str, Tensor]:
    """The tensors of ``source`` (whose keys start with one of ``prefixes``, if given); see the module docstring."""
    path = Path(source)
    if path.is_file():
        state = _read_file(path, prefixes)
    elif path.is_dir():
        def local(name: str, required: bool = False):
            candidate = path / name
            if candidate.is_file():
                return candidate
            if required:
                raise ValueError(f"{path}: the index names {name}, which is missing")
            return None

        state = {}
        for file in _files_in_folder(path, prefixes, local):
            state.update(_read_file(Path(file), prefixes))
    else:
        from .hub import hub_offline

        name = str(source)
        if hub_offline() or name.count("/") != 1 or name.startswith((".", "/")):
            raise ValueError(f"no weights at {name!r}: not a file or folder" + (
                " (and HF_HUB_OFFLINE=1 forbids the hub)" if hub_offline() and name.count("/") == 1 else ""))
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError

        def remote(filename: str, required: bool = False):
            try:
                return hf_hub_download(name, filename)
            except EntryNotFoundError:
                if required:
                    raise
                return None

        state = {}
        for file in _files_in_folder(Path(name), prefixes, remote):
            state.update(_read_file(Path(file), prefixes))
    if not state:
        wanted = f" with keys starting {', '.join(prefixes)}" if prefixes else ""
        raise ValueError(f"{source}: holds no tensors{wanted}")
    return state


__all__ = ["read_state_dict"]
