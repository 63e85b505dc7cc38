"""The ``mmkit`` command (also ``python -m mmkit``): one module per group of subcommands, registered here.

Each module lists its :class:`Command` rows in ``COMMANDS``; :func:`build_parser` registers them explicitly
in :data:`COMMAND_REGISTRY`. A user's mistake (a missing file, a bad value, an unreadable image or model
folder) ends as one line on stderr naming what was wrong and what is accepted, with exit status 2;
``--debug`` shows the traceback instead. Library code never imports this package.
"""

from __future__ import annotations

import argparse

from .base import COMMAND_REGISTRY, Command, UserError, int_in, positive_int, register_command, run_guarded


def _register_builtins() -> None:
    from . import demo, generate, info, segment, video, vlm

    for module in (info, demo, vlm, video, segment, generate):
        for command in module.COMMANDS:
            register_command(command)  # registering the same row twice is harmless


def build_parser() -> argparse.ArgumentParser:
    _register_builtins()
    parser = argparse.ArgumentParser(prog="mmkit", description="mmkit: adapters on frozen multimodal models.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMAND_REGISTRY.items():
        command.configure(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    command = COMMAND_REGISTRY.get(args.command)
    return run_guarded(lambda: command.run(args), prog=f"mmkit {args.command}", debug=args.debug)


__all__ = ["COMMAND_REGISTRY", "Command", "UserError", "int_in", "main", "positive_int", "register_command",
           "run_guarded"]
