"""What the sampling evaluation scripts (``recipes/generate/eval*.py``) share: their sampling options and the
end of a run (print the markdown table, write the JSON report)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
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


class PartialSamples:
    """Generated images kept on disk as they come, so a long sampling evaluation that is stopped (a crash, the end
    of a session) resumes where it was instead of starting over.

    One safetensors file (``path``, e.g. next to the ``--json`` report) maps each unit of work (``key``: a batch
    of one variant) to its images (N, 3, H, W) and the seconds it took. ``settings`` (everything the images
    depend on) is fingerprinted: a file written under other settings is ignored and replaced. ``finish()``
    removes the file once the report is made. ``path=None`` keeps nothing.
    """

    def __init__(self, path: Path | None, settings: dict) -> None:
        self.path = path
        self.fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.items: dict[str, tuple] = {}  # key -> (images, seconds)
        if path is not None and path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("fingerprint") == self.fingerprint:
                    for i, (key, seconds) in enumerate(json.loads(meta["keys"])):
                        self.items[key] = (f.get_tensor(f"t{i}"), float(seconds))
        self.resumed = len(self.items)

    def get(self, key: str):
        """(images, seconds) saved for ``key``, or None."""
        return self.items.get(key)

    def put(self, key: str, images, seconds: float) -> None:
        """Keep ``images`` for ``key`` and rewrite the file (atomically: a stop mid-write keeps the last one)."""
        if self.path is None:  # nothing to resume from: the caller holds the images already
            return
        self.items[key] = (images.detach().to("cpu").contiguous(), float(seconds))
        from safetensors.torch import save_file

        keys = list(self.items)
        tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_file({f"t{i}": self.items[k][0] for i, k in enumerate(keys)}, str(tmp),
                  metadata={"fingerprint": self.fingerprint, "keys": json.dumps([[k, self.items[k][1]] for k in keys])})
        os.replace(tmp, self.path)

    def finish(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def weight_stamps(paths) -> dict:
    """Size and modification time of every safetensors file under ``paths`` (model and adapter folders or files),
    for :class:`PartialSamples` settings: a model retrained in place does not reuse the old one's samples."""
    stamps = {}
    for path in map(Path, paths):
        for f in sorted(path.rglob("*.safetensors") if path.is_dir() else [path]):
            stamps[str(f)] = [f.stat().st_size, f.stat().st_mtime_ns]
    return stamps


def partial_path(report: Path | None) -> Path | None:
    """Where the samples of an evaluation writing ``report`` are kept until it ends (None without a report)."""
    return None if report is None else report.with_name(report.name + ".partial.safetensors")


__all__ = ["PartialSamples", "add_sampling_arguments", "partial_path", "run_report", "weight_stamps"]
