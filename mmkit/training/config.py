"""Recipe configs: a yaml file, then ``dotted.key=value`` overrides, into strict dataclasses."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..config import StrictConfig

T = TypeVar("T", bound=StrictConfig)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], 1e-4); values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {item!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return key.split("."), raw
    # "a: b" or "x - y" are prompts, not mappings/lists, unless written with explicit brackets
    if isinstance(value, (dict, list)) and not raw.lstrip().startswith(("{", "[")):
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ValueError(f"override {item!r}: '{part}' is a value, not a section")
            node[part] = child = dict(child)
            node = child
        node[path[-1]] = value
    return data


def load_config(cls: type[T], path: str | os.PathLike | None, overrides: list[str] | None = None) -> T:
    """Read ``path`` (yaml) if given, apply overrides, and build ``cls`` strictly (unknown keys fail)."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{p}: a config must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    return cls.from_dict(apply_overrides(data, overrides or []))


def dump_config(config: StrictConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


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
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.max_train_steps is not None:
        overrides.append(f"train.max_train_steps={args.max_train_steps}")
    if args.output_dir is not None:
        overrides.append(f"train.output_dir={args.output_dir}")
    return load_config(cls, args.config, overrides), args
