"""The ``mmkit`` command (also ``python -m mmkit``).

Each subcommand is a function registered with :func:`command`; later subsystems add theirs here.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
from collections.abc import Callable

_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help_text: str, configure: Callable[[argparse.ArgumentParser], None] | None = None):
    """Register ``fn(args) -> exit code`` as ``mmkit <name>``; ``configure`` adds its arguments."""

    def deco(fn: Callable[[argparse.Namespace], int]):
        _COMMANDS[name] = (help_text, configure or (lambda p: None), fn)
        return fn

    return deco


_PACKAGES = (
    "torch", "torchvision", "transformers", "diffusers", "accelerate", "peft", "open_clip_torch", "timm",
    "safetensors", "pillow", "triton", "gguf",
)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@command("info", "print versions and which attention backends can run here (and why not)")
def _info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__
    from .ops.dispatch import AUTO_ORDER, ENV_VAR, backends, requested_backend

    print(f"mmkit {__version__}  python {platform.python_version()}  {platform.machine()}")
    for dist in _PACKAGES:
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


def _load_subcommands() -> None:
    # Subcommands defined in other modules register themselves on import.
    from . import demo, generate_cli, vlm_cli  # noqa: F401


def build_parser() -> argparse.ArgumentParser:
    _load_subcommands()
    parser = argparse.ArgumentParser(prog="mmkit", description="mmkit: adapters on frozen multimodal models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, configure, _) in _COMMANDS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return _COMMANDS[args.command][2](args)


if __name__ == "__main__":
    sys.exit(main())
