"""Adapters: trainable modules on frozen models, each saved on its own in one folder format.

An adapter folder holds ``adapter.json`` ({"kind", "config", "metadata"}) and ``adapter.safetensors``
(only the adapter's own tensors, keys without wrapper prefixes). Folders written before this format
(``connector.json`` + ``connector.safetensors``) load the same way. Every adapter class registers its
``kind`` in :data:`ADAPTERS`; connectors, heads and diffusion mappers are families of adapters.

    connector.save_adapter("out/connector", metadata={"training": {...}})
    connector, metadata = load_adapter("out/connector")           # any registered kind
    load_adapter_weights(model.connector, "out/step-000400/connector")   # into an existing module (resume)
    cast_saved("out/final", "assets/my-model", torch.float16)   # a copy at half the size (loads back as fp32)

Loading never unpickles, checks every tensor's shape against the config, and refuses files that are not
safetensors, that hold NaN / inf, or that hold nothing but zeros, naming the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from .config import StrictConfig, atomic_write_bytes, atomic_write_folder, atomic_write_text
from .registry import Registry

CONFIG_NAME = "adapter.json"
WEIGHTS_NAME = "adapter.safetensors"
# (config, weights) file names of older folders, still read.
LEGACY_NAMES = (("connector.json", "connector.safetensors"),)

ADAPTERS: Registry[type[Adapter]] = Registry("adapter kind")


class AdapterMismatch(ValueError):
    """A saved adapter that reads fine but is not the adapter it is loaded into (another kind or settings)."""


@dataclass
class AdapterConfig(StrictConfig):
    """Base of every adapter's config (subclasses add their fields, each with the published default)."""


class Adapter(nn.Module):
    """Base class: a ``kind``, a strict ``config_class``, a ``family`` ("connector", "head", ...)."""

    kind: ClassVar[str] = ""
    family: ClassVar[str] = "adapter"
    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    # Buffers computed from the training data rather than fixed by the config (VLAP's word-frequency prior):
    # saved with the weights, sized by the file when loaded, and allowed to be absent from older files.
    data_buffers: ClassVar[tuple[str, ...]] = ()
    # Config fields that only choose how fresh weights are drawn: loading saved weights ignores them.
    init_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config

    @classmethod
    def upgrade_saved_config(cls, config: dict) -> dict:
        """The config dict of a saved folder, brought up to date (fields added since keep the behaviour the
        file was trained with); called when loading."""
        return config

    def save_adapter(self, directory: str | os.PathLike, *, metadata: dict | None = None) -> Path:
        """Write ``adapter.safetensors`` (this module's tensors) and ``adapter.json`` atomically."""
        from safetensors.torch import save

        directory = Path(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write_bytes(directory / WEIGHTS_NAME, save(state))
        payload = {"kind": self.kind, "config": self.config.to_dict(), "metadata": metadata or {}}
        atomic_write_text(directory / CONFIG_NAME, json.dumps(payload, indent=2, sort_keys=True) + "\n")
        return directory


def register_adapter(cls: type[Adapter], *, replace: bool = False) -> type[Adapter]:
    """Make ``cls`` buildable and loadable by its ``kind``; a kind already taken raises."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__}.kind must name the adapter (e.g. 'linear')")
    return ADAPTERS.register(cls.kind, cls, replace=replace)


def adapter_kinds(family: str | None = None) -> list[str]:
    """Registered kinds, optionally of one family."""
    return [k for k, cls in ADAPTERS.items() if family is None or cls.family == family]


def build_adapter(kind: str, *, family: str | None = None, **config) -> Adapter:
    """A freshly initialised adapter of ``kind`` from config keywords (``family`` narrows what is accepted)."""
    cls = _adapter_class(kind, family)
    return cls(cls.config_class.from_dict(config))


def _adapter_class(kind: str, family: str | None, where: str = "") -> type[Adapter]:
    try:
        if family is None:
            return ADAPTERS.get(kind)
        return ADAPTERS.get(kind, among=adapter_kinds(family), what=f"{family} kind")
    except ValueError as err:
        raise ValueError(f"{where}{err}") from None


def adapter_files(directory: str | os.PathLike) -> tuple[Path, Path]:
    """(config, weights) paths of the adapter folder ``directory`` (current or legacy names)."""
    directory = Path(directory)
    for config_name, weights_name in ((CONFIG_NAME, WEIGHTS_NAME), *LEGACY_NAMES):
        if (directory / config_name).is_file():
            return directory / config_name, directory / weights_name
    if not directory.is_dir():
        raise FileNotFoundError(f"no adapter folder {directory} (it does not exist)")
    raise FileNotFoundError(
        f"no {CONFIG_NAME} in {directory}; an adapter folder holds {CONFIG_NAME} + {WEIGHTS_NAME} "
        f"(or, written by older mmkit, connector.json + connector.safetensors)"
    )


def is_adapter_folder(directory: str | os.PathLike) -> bool:
    return any((Path(directory) / c).is_file() for c, _ in ((CONFIG_NAME, WEIGHTS_NAME), *LEGACY_NAMES))


def read_adapter_json(directory: str | os.PathLike, *, family: str | None = None) -> dict:
    """The parsed ``adapter.json`` of ``directory``; its kind must be registered (and of ``family``)."""
    path, _ = adapter_files(directory)
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("config"), dict):
        raise ValueError(f"{path} must hold an object with 'kind', 'config' and 'metadata'")
    _adapter_class(payload.get("kind"), family, where=f"{path}: ")
    return payload


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of ``path``; an unreadable file raises naming it (never unpickles)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"adapter weights missing: {path}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for bad headers and truncation
        raise ValueError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); "
                         f"it may be truncated or corrupt: write it again") from None


def _check_values(path: Path, state: dict[str, Tensor], skip: tuple[str, ...]) -> None:
    floats = {k: v for k, v in state.items() if v.is_floating_point() and k not in skip and v.numel()}
    for key, value in floats.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"{path}: tensor {key!r} holds NaN or inf; the training that wrote it diverged")
    if floats and all(not value.any() for value in floats.values()):
        raise ValueError(f"{path}: every tensor is all zeros ({sorted(floats)}); this is not a trained adapter")


def _shapes(state: dict[str, Tensor], skip: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if k not in skip}


def load_adapter(directory: str | os.PathLike, *, family: str | None = None) -> tuple[Adapter, dict]:
    """(adapter, metadata) from a folder written by :meth:`Adapter.save_adapter` (or a legacy one); the adapter is
    in eval mode (a training loop switches it back)."""
    payload = read_adapter_json(directory, family=family)
    cls = ADAPTERS.get(payload["kind"])
    config_path, weights = adapter_files(directory)
    try:
        config = cls.config_class.from_dict(cls.upgrade_saved_config(payload["config"]))
        adapter = cls(config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: {err}") from None
    state = read_safetensors(weights)
    skip = cls.data_buffers
    expected, got = _shapes(adapter.state_dict(), skip), _shapes(state, skip)
    if expected != got:
        raise ValueError(f"{weights} does not fit a {cls.kind} {cls.family} with {payload['config']}: "
                         f"expected tensors {expected}, file has {got}")
    _check_values(weights, state, skip)
    adapter.load_state_dict(state, strict=False)  # keys and shapes checked above; data buffers may be absent
    return adapter.eval(), payload.get("metadata", {})  # ready for inference, as from_pretrained models are


def load_adapter_weights(adapter: Adapter, directory: str | os.PathLike) -> dict:
    """Copy the weights saved in ``directory`` into an existing ``adapter`` (resuming, diagnostics).

    The saved adapter must be of the same kind, with the same settings (its saved config, brought up to date,
    equal to the target's) and tensors of the same shapes; otherwise one :class:`AdapterMismatch` names the
    folder, what it holds and what the target expects. Returns the saved metadata.
    """
    loaded, metadata = load_adapter(directory)
    if loaded.kind != adapter.kind:
        raise AdapterMismatch(f"{directory} holds a {loaded.kind!r} {loaded.family}; this model's {adapter.family} "
                              f"is {adapter.kind!r} ({adapter.config.to_dict()})")
    skip = adapter.data_buffers
    state = {k: v for k, v in loaded.state_dict().items() if not (k in skip and v.numel() == 0)}  # absent in file
    expected, got = _shapes(adapter.state_dict(), skip), _shapes(state, skip)
    if expected != got:
        raise AdapterMismatch(f"{directory} does not fit this model's {adapter.kind} {adapter.family}: the folder's "
                              f"config {loaded.config.to_dict()} gives tensors {got}; the model's config "
                              f"{adapter.config.to_dict()} needs {expected}")
    saved, wanted = (json.loads(json.dumps(a.config.to_dict())) for a in (loaded, adapter))  # tuples as lists
    differ = {k: (saved.get(k), wanted.get(k)) for k in sorted(set(saved) | set(wanted))
              if saved.get(k) != wanted.get(k) and k not in adapter.init_fields}
    if differ:  # same shapes, other maths (e.g. a switch added since the folder was written): not the same model
        raise AdapterMismatch(
            f"{directory} was saved with other {adapter.kind} settings than this model's: "
            + ", ".join(f"{k} (saved {a!r}, model {b!r})" for k, (a, b) in differ.items())
            + "; build the model with the saved settings (e.g. the run's config or an override) to continue it")
    adapter.load_state_dict(state, strict=False)  # keys and shapes checked above
    return metadata


# Normalisation statistics stay as saved: a standardisation's mean is often far larger than the spread it
# divides by, and fp16 / bf16 rounding of it would move every output.
KEEP_PRECISION = ("running_mean", "running_var")


def cast_saved(source: str | os.PathLike, destination: str | os.PathLike,
               dtype: torch.dtype = torch.float16) -> list[Path]:
    """Copy an adapter folder, or a bundle of them, to ``destination`` with every floating tensor of its weight
    files but normalisation statistics (:data:`KEEP_PRECISION`) cast to ``dtype`` (fp16 / bf16 halves a
    checkpoint for shipping; loading copies the values back into the module's own dtype). Other files are
    copied unchanged. Returns the weight files written.

    Refuses a ``destination`` that exists and is not empty, a ``source`` without any adapter weights, and a
    cast that would turn finite values into inf (fp16 above 65504), naming the tensor."""
    import shutil

    from safetensors.torch import save

    source, destination = Path(source), Path(destination)
    if not source.is_dir():
        raise FileNotFoundError(f"no adapter or bundle folder {source}")
    if not dtype.is_floating_point:
        raise ValueError(f"cast_saved casts to a floating dtype (torch.float16, torch.bfloat16, ...), got {dtype}")
    weights = sorted(p for p in source.rglob("*.safetensors")
                     if p.name in {WEIGHTS_NAME, *(w for _, w in LEGACY_NAMES)})
    if not weights:
        raise ValueError(f"{source} holds no {WEIGHTS_NAME} (an adapter folder, or a bundle of adapter folders)")
    if destination.exists() and any(destination.iterdir()):
        raise FileExistsError(f"{destination} exists and is not empty; choose a new folder")
    cast = {}  # relative path -> the new file's bytes; all computed before anything is written
    for path in weights:
        state = read_safetensors(path)
        out = {k: v.to(dtype) if v.is_floating_point() and not k.endswith(KEEP_PRECISION) else v
               for k, v in state.items()}
        for key, value in out.items():
            if value.is_floating_point() and not torch.isfinite(value).all() and torch.isfinite(state[key]).all():
                raise ValueError(f"{path}: tensor {key!r} overflows {dtype} (largest magnitude "
                                 f"{state[key].abs().max().item():.4g}); keep it at {state[key].dtype}")
        cast[path.relative_to(source)] = save({k: v.contiguous() for k, v in out.items()})

    def write(tmp: Path) -> None:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        for relative, data in cast.items():
            (tmp / relative).write_bytes(data)

    if destination.exists():
        destination.rmdir()  # empty (checked above): atomic_write_folder renames into place
    atomic_write_folder(destination, write)  # a crash never leaves a half-cast folder behind
    return [destination / relative for relative in cast]


__all__ = [
    "ADAPTERS",
    "AdapterMismatch",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "Adapter",
    "AdapterConfig",
    "adapter_files",
    "adapter_kinds",
    "build_adapter",
    "cast_saved",
    "is_adapter_folder",
    "load_adapter",
    "load_adapter_weights",
    "read_adapter_json",
    "read_safetensors",
    "register_adapter",
]
