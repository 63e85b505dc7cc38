"""The command line every training recipe shares (the yaml + dotted-override parsing is in :mod:`mmkit.config`)."""

from __future__ import annotations

import argparse
from typing import TypeVar

from ..config import StrictConfig, apply_overrides, dump_config, load_config, parse_override

T = TypeVar("T", bound=StrictConfig)


def parse_recipe_args(
    cls: type[T], default_config: str, *, description: str, epilog: str, argv: list[str] | None = None
) -> tuple[T, argparse.Namespace]:
    """The command line every training recipe shares: ``--config``, ``--resume``, ``--overwrite``,
    ``--max_train_steps``, ``--output_dir`` and dotted ``section.key=value`` overrides. Returns the strict config and the args."""
    parser = argparse.ArgumentParser(description=description, epilog=epilog)
    parser.add_argument("--config", default=default_config, help=f"yaml config (default: {default_config})")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output_dir that holds another run (deletes its checkpoints and final/)")
    parser.add_argument("--max_train_steps", type=int, default=None, help="override train.max_train_steps")
    parser.add_argument("--output_dir", default=None, help="override train.output_dir")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    # intermixed: overrides may come before and after the options ("a.b=1 --max_train_steps 9 c.d=2")
    args = parser.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.max_train_steps is not None:
        overrides.append(f"train.max_train_steps={args.max_train_steps}")
    if args.output_dir is not None:
        overrides.append(f"train.output_dir={args.output_dir}")
    return load_config(cls, args.config, overrides), args




def run_recipe(cls: type[T], default_config: str, train_fn, *, description: str, epilog: str, script: str,
               saved: str, argv: list[str] | None = None):
    """A training recipe's whole ``main``: parse the shared command line into ``cls``, run ``train_fn(cfg,
    resume=, overwrite=, command=)`` and say where ``saved`` (e.g. "SAM") went. Returns the final folder."""
    from .loop import recipe_command

    cfg, args = parse_recipe_args(cls, default_config, description=description, epilog=epilog, argv=argv)
    final = train_fn(cfg, resume=args.resume, overwrite=args.overwrite, command=recipe_command(argv, script))
    print(f"{saved} saved to {final}")
    return final


__all__ = ["apply_overrides", "dump_config", "load_config", "parse_override", "parse_recipe_args", "run_recipe"]
