"""A bundle: one folder describing a composite model as frozen parts named by spec plus one folder per adapter.

    run/final/
      bundle.json          {"format": "mmkit.bundle", "version": 1, "kind": "vlm",
                            "parts": {"encoder": {...}, "llm": {...}, "prompts": {...}},
                            "adapters": {"connector": "connector"}, "metadata": {...}}
      connector/           adapter.json + adapter.safetensors (see mmkit.adapters)

Frozen parts are never copied (the encoder and LLM are named, e.g. ``timm:tf_efficientnet_lite0``); only
the trained adapters are. A folder written by older mmkit (one connector whose metadata names the encoder,
the LLM and the prompts) reads as a bundle with that single adapter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..adapters import Adapter, is_adapter_folder, read_adapter_json
from ..config import atomic_write_text

BUNDLE_NAME = "bundle.json"
FORMAT = "mmkit.bundle"
VERSION = 1


def write_bundle(
    directory: str | os.PathLike,
    *,
    kind: str,
    parts: dict,
    adapters: dict[str, Adapter],
    metadata: dict | None = None,
) -> Path:
    """Write each adapter into ``directory/<name>/`` and ``bundle.json`` last (a folder with a bundle.json
    is complete)."""
    directory = Path(directory)
    for name, adapter in adapters.items():
        if not name.isidentifier():
            raise ValueError(f"adapter names in a bundle must be identifiers, got {name!r}")
        adapter.save_adapter(directory / name)
    payload = {"format": FORMAT, "version": VERSION, "kind": kind, "parts": parts,
               "adapters": {name: name for name in adapters}, "metadata": metadata or {}}
    atomic_write_text(directory / BUNDLE_NAME, json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return directory


def read_bundle(directory: str | os.PathLike) -> dict:
    """``{"kind", "parts", "adapters": {name: folder path}, "metadata"}`` of a bundle or a legacy folder."""
    directory = Path(directory)
    path = directory / BUNDLE_NAME
    if path.is_file():
        try:
            payload = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{path} is not an mmkit bundle (no \"format\": \"{FORMAT}\")")
        if payload.get("version", 0) > VERSION:
            raise ValueError(f"{path} was written by a newer mmkit (bundle version {payload['version']}); "
                             f"this one reads version {VERSION}: upgrade mmkit")
        adapters = {name: directory / sub for name, sub in payload.get("adapters", {}).items()}
        for name, folder in adapters.items():
            if not is_adapter_folder(folder):
                raise FileNotFoundError(f"{path} names adapter {name!r} in {folder}, which holds no adapter.json")
        return {"kind": payload.get("kind"), "parts": payload.get("parts", {}), "adapters": adapters,
                "metadata": payload.get("metadata", {})}
    if is_adapter_folder(directory):  # older mmkit: one connector folder, the parts in its metadata
        meta = dict(read_adapter_json(directory).get("metadata", {}))
        parts = {key: meta.pop(key) for key in ("encoder", "llm", "prompts") if key in meta}
        return {"kind": "vlm", "parts": parts, "adapters": {"connector": directory}, "metadata": meta}
    if not directory.is_dir():
        raise FileNotFoundError(f"no such model folder: {directory}")
    raise FileNotFoundError(
        f"{directory} holds neither {BUNDLE_NAME} (a model saved with save_pretrained / by a training recipe) nor "
        f"a single connector (adapter.json or connector.json); it holds {sorted(p.name for p in directory.iterdir())[:10]}"
    )


def is_bundle(directory: str | os.PathLike) -> bool:
    return (Path(directory) / BUNDLE_NAME).is_file() or is_adapter_folder(directory)
