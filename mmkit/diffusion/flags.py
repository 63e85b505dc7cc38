"""Diffusion patches as command-line flags: one registry row per patch, shared by ``mmkit generate``,
``recipes/generate/sample.py`` and ``recipes/generate/eval.py``.

Each row declares its flag, its options and how it builds its :class:`~mmkit.diffusion.patch.Patch` from the
parsed arguments. A new patch (``--neti``, ``--text-projection``) is one more :func:`register_patch_flag`
call, not a new branch in a command.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..registry import Registry


@dataclass(frozen=True)
class Option:
    """One extra command-line option of a patch flag (argparse ``add_argument`` arguments)."""

    flag: str
    type: Callable[[str], Any]
    default: Any
    help: str


@dataclass(frozen=True)
class PatchFlag:
    """A patch switched on by ``flag``. ``build(args, steps)`` returns the Patch; ``dest`` is the
    argparse attribute that is set when the flag was given. ``nargs="?"`` flags take an optional
    value of ``type`` (``const`` when the flag is given bare)."""

    flag: str
    help: str
    build: Callable[[argparse.Namespace, int], Any]
    options: tuple[Option, ...] = ()
    nargs: str | int | None = None  # None: a switch; 1: a required value; "?": an optional value
    type: Callable[[str], Any] = float
    const: Any = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def _build_agent_sd(args: argparse.Namespace, steps: int):
    from . import AgentSD, AgentSDConfig, published_schedule

    # The published schedule is for 50 steps (agents for steps 0-19, i.e. the noisiest 40%); for
    # other step counts the switch moves to the same fraction of the run.
    schedule = published_schedule()
    if steps != 50:
        schedule = (schedule[0], schedule[1].replace(start_step=max(1, round(schedule[1].start_step * steps / 50))))
    config = AgentSDConfig(schedule=schedule, max_downsample=args.max_downsample, seed=args.merge_seed)
    return AgentSD(config, ratio=args.agent_sd_ratio)


def _build_tome(args: argparse.Namespace, steps: int):
    from . import ToMe, ToMeConfig

    return ToMe(ToMeConfig(ratio=args.tome, max_downsample=args.max_downsample, seed=args.merge_seed))


SHARED_OPTIONS: tuple[Option, ...] = (
    Option("--max-downsample", int, 1,
           "merging patches (AgentSD, ToMe) act on blocks downsampled at most this much (1 = highest resolution)"),
    Option("--merge-seed", int, 0, "seed of the merging patches' random choice of destination tokens (default 0)"),
)

PATCH_FLAGS: Registry[PatchFlag] = Registry("patch flag")


def register_patch_flag(row: PatchFlag, *, replace: bool = False) -> PatchFlag:
    """Offer a patch as ``row.flag`` in every command that takes patch flags."""
    return PATCH_FLAGS.register(row.flag, row, replace=replace)


def _build_neti(args: argparse.Namespace, steps: int):
    from .neti import NeTIPatch

    return NeTIPatch(str(args.neti), truncation=args.truncation)


def _build_text_projection(args: argparse.Namespace, steps: int):
    from ..adapters import load_adapter
    from .text_projection import TextProjectionPatch

    projector, _ = load_adapter(str(args.text_projection), family="text_projection")
    return TextProjectionPatch(projector, switch_off=args.switch_off)


register_patch_flag(PatchFlag(
    "--agent-sd", "AgentSD: agent attention on ToMe-merged tokens (published schedule)", _build_agent_sd,
    options=(Option("--agent-sd-ratio", float, 0.4, "AgentSD's ToMe merge ratio (default 0.4)"),)))
register_patch_flag(PatchFlag("--tome", "ToMe token merging with this ratio (bare flag: 0.5)", _build_tome,
                              nargs="?", const=0.5, metavar="RATIO"))
register_patch_flag(PatchFlag(
    "--neti", "NeTI (or textual inversion) concept adapter folder; prompts name the concept by its token (<S*>)",
    _build_neti, nargs=1, type=str, metavar="PATH",
    options=(Option("--truncation", int, None, "NeTI nested-dropout truncation index (lower: more editable)"),)))
register_patch_flag(PatchFlag(
    "--text-projection", "CLP / WiCLP text projection adapter folder", _build_text_projection, nargs=1, type=str,
    metavar="PATH", options=(Option("--switch-off", float, None,
                                    "project only while the timestep is above this (default: at every step)"),)))


def add_patch_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every registered patch flag (and its options) to ``parser``."""
    group = parser.add_argument_group("mmkit patches (reversible; applied only while sampling)")
    for _, row in PATCH_FLAGS.items():
        if row.nargs is None:
            group.add_argument(row.flag, action="store_true", help=row.help)
        elif row.nargs == 1:  # a flag that needs its value (a path)
            group.add_argument(row.flag, default=None, type=row.type, metavar=row.metavar, help=row.help)
        else:
            group.add_argument(row.flag, nargs=row.nargs, const=row.const, default=None, type=row.type,
                               metavar=row.metavar, help=row.help)
        for opt in row.options:
            group.add_argument(opt.flag, type=opt.type, default=opt.default, help=opt.help)
    for opt in SHARED_OPTIONS:
        group.add_argument(opt.flag, type=opt.type, default=opt.default, help=opt.help)


def build_patches(args: argparse.Namespace, steps: int) -> list:
    """The patches whose flags are set in ``args``, in registration order."""
    chosen = []
    for _, row in PATCH_FLAGS.items():
        value = getattr(args, row.dest, None)
        if value is not None and value is not False:
            chosen.append(row.build(args, steps))
    return chosen


__all__ = ["PATCH_FLAGS", "Option", "PatchFlag", "add_patch_arguments", "build_patches", "register_patch_flag"]
