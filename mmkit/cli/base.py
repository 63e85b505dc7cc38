"""What every ``mmkit`` subcommand module shares: the command row, the user-error type, argument types and the
guard that turns a user's mistake into one line (see :mod:`mmkit.cli`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ..registry import Registry


class UserError(Exception):
    """A mistake in what the user asked for; the message says what was wrong and what is accepted."""


# What a command may raise for a bad input (all of mmkit's input checks raise one of these).
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, ValueError)


@dataclass(frozen=True)
class Command:
    """``mmkit <name>``: ``configure(parser)`` adds its arguments, ``run(args) -> exit status`` runs it."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMAND_REGISTRY: Registry[Command] = Registry("command")


def register_command(command: Command, *, replace: bool = False) -> Command:
    return COMMAND_REGISTRY.register(command.name, command, replace=replace)


# ---------------------------------------------------------------------- argument types
def positive_int(text: str) -> int:
    return int_in(1, None, "a positive integer")(text)


def int_in(low: int, high: int | None, what: str) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (``high`` None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; expected {what}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"{value} is out of range; expected {what} {bound}")
        return value

    return parse


# ---------------------------------------------------------------------- running
def run_guarded(fn: Callable[[], object], *, prog: str, debug: bool = False) -> int:
    """Run ``fn``; a user error becomes ``<prog>: error: <message>`` on stderr and status 2 (the traceback
    only with ``debug`` or ``MMKIT_DEBUG=1``). Recipes' ``main`` use it too."""
    import os

    debug = debug or os.environ.get("MMKIT_DEBUG", "") not in ("", "0")
    try:
        status = fn()
    except USER_ERRORS as err:
        if debug:
            raise
        message = str(err).strip() or type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0  # a recipe's main may return its output folder
