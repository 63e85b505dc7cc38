"""``mmkit info``: versions, devices, and which attention backends can run here (and why not)."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform

from .base import Command

PACKAGES = (
    "torch", "torchvision", "transformers", "diffusers", "accelerate", "peft", "open_clip_torch", "timm",
    "safetensors", "pillow", "triton", "gguf",
)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import __version__
    from ..ops.dispatch import AUTO_ORDER, ENV_VAR, backends, requested_backend

    print(f"mmkit {__version__}  python {platform.python_version()}  {platform.machine()}")
    for dist in PACKAGES:
        print(f"  {dist:<16} {_version(dist)}")
    cuda = torch.cuda.is_available()
    print(f"  devices: cpu ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"
          + (f", cuda x{torch.cuda.device_count()}" if cuda else ", no cuda"))
    name, source = requested_backend(None)
    chosen = f"{name} (from {source})" if name else f"automatic: first that accepts the call of {list(AUTO_ORDER)}"
    print(f"attention backends (selection: {chosen}; override with ${ENV_VAR}):")
    for be_name, be in backends().items():
        why = be.unavailable()
        status = "available" if why is None else f"unavailable: {why}"
        print(f"  {be_name:<9} {status}\n            {be.summary}")
    return 0


COMMANDS = (Command("info", "print versions and which attention backends can run here (and why not)",
                    lambda parser: None, run),)
