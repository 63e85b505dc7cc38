"""What every vision->LLM connector shares: a strict config, a registry, safetensors save/load."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from torch import Tensor, nn

from ..config import StrictConfig, atomic_write_bytes, atomic_write_text
from ..registry import Registry

WEIGHTS_NAME = "connector.safetensors"
CONFIG_NAME = "connector.json"

CONNECTORS: Registry[type[Connector]] = Registry("connector kind")


def register_connector(cls: type[Connector], *, replace: bool = False) -> type[Connector]:
    """Make ``cls`` buildable and loadable by its ``kind``; a kind already taken raises."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__}.kind must name the connector (e.g. 'linear')")
    return CONNECTORS.register(cls.kind, cls, replace=replace)


def connector_kinds() -> list[str]:
    return CONNECTORS.names()


@dataclass
class ConnectorConfig(StrictConfig):
    vision_dim: int = 0
    llm_dim: int = 0


class Connector(nn.Module):
    """Maps frozen vision tokens (B, N, Dv) to LLM input embeddings (B, N', Dl).

    Subclasses set ``kind`` and ``config_class``; those with an objective beyond the captioning loss
    implement :meth:`auxiliary_loss` and set ``needs_text_features``.
    """

    kind: ClassVar[str] = ""
    config_class: ClassVar[type[ConnectorConfig]] = ConnectorConfig
    needs_text_features: ClassVar[bool] = False
    # Buffers computed from the training data rather than fixed by the config (VLAP's word-frequency prior):
    # saved with the weights, sized by the file when loaded, and allowed to be absent from older files.
    data_buffers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        if config.vision_dim <= 0 or config.llm_dim <= 0:
            raise ValueError(f"{type(self).__name__}: vision_dim and llm_dim must be positive, got {config}")
        self.config = config

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens

    def auxiliary_loss(self, image_embeds: Tensor, text_features: Tensor, prototypes: Tensor) -> dict[str, Tensor]:
        return {}

    @classmethod
    def upgrade_saved_config(cls, config: dict) -> dict:
        """The config dict of a saved ``connector.json``, brought up to date (fields added since keep the
        behaviour the file was trained with); called by :func:`load_connector`."""
        return config

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike, *, metadata: dict | None = None) -> Path:
        """Write ``connector.safetensors`` (trainable weights only) and ``connector.json`` atomically."""
        from safetensors.torch import save

        directory = Path(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write_bytes(directory / WEIGHTS_NAME, save(state))
        payload = {"kind": self.kind, "config": self.config.to_dict(), "metadata": metadata or {}}
        atomic_write_text(directory / CONFIG_NAME, json.dumps(payload, indent=2, sort_keys=True) + "\n")
        return directory


def read_connector_json(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no {CONFIG_NAME} in {directory}; a connector folder holds {CONFIG_NAME} + {WEIGHTS_NAME}"
        )
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    try:
        CONNECTORS.get(payload.get("kind"))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return payload


def load_connector(directory: str | os.PathLike) -> tuple[Connector, dict]:
    """(connector, metadata) from a folder written by :meth:`Connector.save`. Never unpickles."""
    from safetensors.torch import load_file

    payload = read_connector_json(directory)
    cls = CONNECTORS.get(payload["kind"])
    connector = cls(cls.config_class.from_dict(cls.upgrade_saved_config(payload["config"])))
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"connector weights missing: {weights}")
    state = load_file(str(weights))
    expected, got = _shapes(connector.state_dict(), cls.data_buffers), _shapes(state, cls.data_buffers)
    if expected != got:
        raise ValueError(f"{weights} does not fit a {cls.kind} connector with {payload['config']}: "
                         f"expected tensors {expected}, file has {got}")
    connector.load_state_dict(state, strict=False)  # keys and shapes checked above; data buffers may be absent
    return connector, payload.get("metadata", {})


def load_weights_into(connector: Connector, directory: str | os.PathLike) -> dict:
    """Copy the weights saved in ``directory`` into an existing ``connector`` (resuming, diagnostics).

    The saved connector must be of the same kind with tensors of the same shapes; otherwise one error names
    the folder, what it holds and what the target connector expects. Returns the saved metadata.
    """
    loaded, metadata = load_connector(directory)
    if loaded.kind != connector.kind:
        raise ValueError(f"{directory} holds a {loaded.kind!r} connector; this model's connector is "
                         f"{connector.kind!r} ({connector.config.to_dict()})")
    skip = connector.data_buffers
    state = {k: v for k, v in loaded.state_dict().items() if not (k in skip and v.numel() == 0)}  # absent in file
    expected, got = _shapes(connector.state_dict(), skip), _shapes(state, skip)
    if expected != got:
        raise ValueError(f"{directory} does not fit this model's {connector.kind} connector: the folder's config "
                         f"{loaded.config.to_dict()} gives tensors {got}; the model's config "
                         f"{connector.config.to_dict()} needs {expected}")
    connector.load_state_dict(state, strict=False)  # keys and shapes checked above
    return metadata


def _shapes(state: dict[str, Tensor], skip: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if k not in skip}


def build_connector(kind: str, **config) -> Connector:
    """A freshly initialised connector of ``kind`` ('linear', 'vlap', ...) from config keywords."""
    cls = CONNECTORS.get(kind)
    return cls(cls.config_class.from_dict(config))
