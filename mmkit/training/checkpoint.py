"""Adapter-only training checkpoints, written atomically, resumable.

A checkpoint folder ``step-000200/`` holds the adapter in its own format (e.g. ``connector.safetensors``
+ ``connector.json``), ``optimizer.pt`` / ``scheduler.pt`` (tensors and plain containers only, read back
with ``torch.load(weights_only=True)``), ``rng.safetensors`` (torch's generator states, restored on resume)
and ``state.json`` (step, RNG seeds, anything else small). It is
written to a temporary folder and renamed into place, so a crash never leaves a half checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import umask_mode

_STEP_DIR = re.compile(r"^step-(\d+)$")


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    write_adapter: Callable[[Path], dict | None],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    state: dict | None = None,
    keep: int = 2,
) -> Path:
    """Write ``output_dir/step-XXXXXX`` atomically and prune all but the newest ``keep`` checkpoints.

    ``write_adapter(folder)`` writes the trained weights; a dict it returns joins ``state.json``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=output_dir, prefix=f".step-{step:06d}."))
    try:
        os.chmod(tmp, umask_mode(0o777))  # as a plain mkdir would make it (mkdtemp's is private)
        extra = write_adapter(tmp)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        save_rng_state(tmp / "rng.safetensors")
        payload = {"step": step, **(state or {}), **(extra if isinstance(extra, dict) else {})}
        (tmp / "state.json").write_text(json.dumps(payload, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def load_training_state(
    checkpoint: str | os.PathLike, *, optimizer: torch.optim.Optimizer | None = None, scheduler=None
) -> dict:
    """Restore optimizer/scheduler state in place; return ``state.json``."""
    checkpoint = Path(checkpoint)
    state_path = checkpoint / "state.json"
    if not state_path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint (no state.json)")
    if optimizer is not None and (checkpoint / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True, map_location="cpu"))
    if scheduler is not None and (checkpoint / "scheduler.pt").is_file():
        scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True, map_location="cpu"))
    if (checkpoint / "rng.safetensors").is_file():  # older checkpoints have none: the RNG then starts fresh
        load_rng_state(checkpoint / "rng.safetensors")
    return json.loads(state_path.read_text())


def save_rng_state(path: Path) -> None:
    """torch's CPU and CUDA generator states (dropout, e.g. LoRA's, draws from them) as safetensors, so a
    resumed run continues the unbroken run's random stream."""
    from safetensors.torch import save_file

    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(states, str(path))


def load_rng_state(path: Path) -> None:
    from safetensors.torch import load_file

    states = load_file(str(path))
    torch.set_rng_state(states["cpu"])
    cuda = [states[f"cuda_{i}"] for i in range(len(states) - 1) if f"cuda_{i}" in states]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class StopRequested(Exception):
    """Raised inside a training loop by :meth:`GracefulStop.check` once SIGTERM arrived."""


class GracefulStop:
    """Context manager for a training loop: nothing is lost on Ctrl-C or SIGTERM.

    SIGTERM only sets a flag; the loop calls :meth:`check` after each step, which raises
    :class:`StopRequested` at a step boundary. On that or on ``KeyboardInterrupt``, ``save()`` writes a
    checkpoint, ``announce(message)`` says where, and the process exits with status 130.

        with GracefulStop(lambda: checkpoint(step), accelerator.print, lambda: f"step {step}") as stop:
            for ...: train one step; stop.check()
    """

    def __init__(self, save: Callable[[], object], announce: Callable[[str], object],
                 describe: Callable[[], str]) -> None:
        self.save, self.announce, self.describe = save, announce, describe
        self.requested = False
        self._previous = None

    def check(self) -> None:
        if self.requested:
            raise StopRequested

    def __enter__(self) -> GracefulStop:
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, *_) -> None:
        self.requested = True

    def __exit__(self, kind, value, tb) -> bool:
        signal.signal(signal.SIGTERM, self._previous)
        if kind is not None and issubclass(kind, (KeyboardInterrupt, StopRequested)):
            self.save()
            self.announce(f"\ninterrupted: saved {self.describe()}; continue with --resume")
            raise SystemExit(130) from None
        return False
