"""What the sampling evaluation scripts (``recipes/generate/eval*.py``) share: their sampling options and the
end of a run (print the markdown table, write the JSON report)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from ..config import atomic_write_text


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """--steps, --guidance, --seed, --grids, --json and --threads."""
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0, help="image i of every prompt uses seed + i in every variant")
    parser.add_argument("--grids", type=Path, default=None, help="folder for one PNG grid per variant")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on a busy machine)")


def run_report(args: argparse.Namespace, evaluate: Callable[[argparse.Namespace], dict],
               markdown: Callable[[dict], str]) -> dict:
    """Set the thread count, evaluate, print the table and write ``args.json``; returns the report."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    report = evaluate(args)
    print(markdown(report))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return report


__all__ = ["add_sampling_arguments", "run_report"]
