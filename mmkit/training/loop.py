"""The one training loop every recipe uses (under ``accelerate launch`` or plain ``python``).

A recipe builds its model and data into a :class:`TrainingTask` (the trainable module, the batches, a
``step(batch) -> losses`` and how to save itself); :class:`TrainingLoop` does the rest, the same way for
every method:

- seeding, ``config.json`` of the whole run, a refusal to train into a folder that holds another run
  (unless ``resume`` or ``overwrite``);
- AdamW with warm-up then a cosine / constant / linear rate (:data:`LR_SCHEDULES`), gradient
  accumulation, gradient clipping, mixed precision, DDP/FSDP through accelerate;
- atomic checkpoints ``step-XXXXXX/`` every ``save_every`` optimiser steps (the task's weights, the
  optimiser and scheduler, ``state.json``), resume from the newest one that reads back (a corrupt
  newest checkpoint falls back to the previous), a checkpoint on SIGTERM / Ctrl-C;
- ``log.jsonl`` with each loss averaged over the ``log_every`` steps (summed on the device, read once
  per log line, averaged over processes), a tqdm bar, and accelerate's trackers (``report_to``);
- an optional periodic ``evaluate`` (``eval_every``), and ``final/`` written by the task.

A *step* is one optimiser update; with ``gradient_accumulation_steps = k`` it consumes k batches. On
several processes each takes its own batches (the task's ``batches`` shards them), so the global batch
is ``batch_size * k * num_processes``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..adapters import AdapterMismatch
from ..config import StrictConfig, atomic_write_text
from .checkpoint import GracefulStop, list_checkpoints, load_training_state, save_checkpoint

logger = logging.getLogger("mmkit.training")

LR_SCHEDULES = ("cosine", "constant", "linear")
MIXED_PRECISION = ("no", "fp16", "bf16")
RUN_FILES = ("config.json", "log.jsonl", "final")  # with step-*/: what marks a folder as holding a run


@dataclass
class TrainLoopConfig(StrictConfig):
    """The ``train:`` fields every recipe's loop shares; recipes subclass it to change defaults or add fields.

    output_dir: checkpoints (``step-N/``), ``log.jsonl``, ``config.json`` and ``final/``.
    batch_size: per process and per accumulation step. lr_schedule: warm-up (``warmup_steps``) then
    cosine to 0 / constant / linear to 0 at ``max_train_steps``. max_grad_norm: clip the gradient norm
    (0 = off). save_every: steps between atomic checkpoints, of which the newest ``keep_checkpoints``
    stay. eval_every: steps between the task's ``evaluate`` (0 = never). report_to: an accelerate tracker
    ("tensorboard", "wandb", ...) next to ``log.jsonl``. num_threads: torch CPU threads (None = torch's).
    """

    output_dir: str = "outputs/run"
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_schedule: str = "cosine"
    warmup_steps: int = 50
    max_train_steps: int = 1000
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 0.0
    seed: int = 0
    log_every: int = 25
    save_every: int = 250
    keep_checkpoints: int = 2
    eval_every: int = 0
    mixed_precision: str = "no"
    report_to: str | None = None
    num_threads: int | None = None

    def __post_init__(self) -> None:
        positive = ("batch_size", "max_train_steps", "gradient_accumulation_steps", "log_every", "save_every",
                    "keep_checkpoints")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"train.{name} must be an integer >= 1, got {value!r}")
        for name in ("warmup_steps", "eval_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"train.{name} must be an integer >= 0, got {value!r}")
        if not self.seed < 2**63:
            raise ValueError(f"train.seed must be below 2**63, got {self.seed}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"train.learning_rate must be a positive number, got {self.learning_rate!r}")
        if not (self.weight_decay >= 0 and self.max_grad_norm >= 0):
            raise ValueError(f"train.weight_decay and train.max_grad_norm must be >= 0, got "
                             f"{self.weight_decay!r} and {self.max_grad_norm!r}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError(f"train.adam_beta1/2 must lie in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"train.mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"train.num_threads must be >= 1 or null, got {self.num_threads!r}")


class TrainingTask:
    """What a recipe hands the loop. Subclasses set :attr:`module` and implement :meth:`batches`,
    :meth:`step`, :meth:`save_checkpoint`, :meth:`load_checkpoint` and :meth:`save_final`.

    The loop replaces :attr:`module` by its prepared (e.g. DDP-wrapped) version before training, so
    :meth:`step` must call ``self.module``; :meth:`unwrapped` gives the plain module for saving.
    """

    module: nn.Module
    loop: TrainingLoop

    def parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser updates (default: those of :attr:`module` that require grad)."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def unwrapped(self) -> nn.Module:
        return self.loop.accelerator.unwrap_model(self.module)

    def batches(self, start: int) -> Iterator:
        """Batches for this process from batch number ``start`` on (``start`` = steps done x accumulation);
        resuming at ``start`` must give the same batches as an unbroken run."""
        raise NotImplementedError

    def step(self, batch) -> dict[str, Tensor]:
        """Losses of one batch; ``"loss"`` is what is minimised, the others are logged."""
        raise NotImplementedError

    def after_optimizer_step(self, step: int) -> None:
        """Called after every optimiser update (e.g. an EMA of the weights)."""

    def save_checkpoint(self, folder: Path) -> dict:
        """Write what resuming needs into ``folder``; return small JSON-able state for ``state.json``."""
        raise NotImplementedError

    def load_checkpoint(self, folder: Path, state: dict) -> None:
        """Restore what :meth:`save_checkpoint` wrote (``state`` is ``state.json``)."""
        raise NotImplementedError

    def save_final(self, folder: Path) -> None:
        """Write the trained result (an adapter, a bundle, a pipeline) into ``folder``."""
        raise NotImplementedError

    def evaluate(self, step: int) -> dict | None:
        """Periodic evaluation (every ``eval_every`` steps and at the end); the dict goes to ``log.jsonl``."""
        return None

    def log_extras(self) -> dict:
        """Extra numbers for the next log line (timings, counters), read and reset once per line."""
        return {}

    def describe(self) -> str:
        """One line printed when training starts (what trains, how many parameters)."""
        n = sum(p.numel() for p in self.parameters())
        return f"{type(self.unwrapped()).__name__}: {n / 1e6:.3f}M trainable parameters"


class TrainingLoop:
    """Set up the run (accelerator, seed, output folder) before the task builds its model, then :meth:`run`.

        loop = TrainingLoop(cfg.train, run_config=cfg, resume=args.resume)
        final = loop.run(MyTask(cfg, loop))
    """

    def __init__(
        self,
        config: TrainLoopConfig,
        *,
        run_config: StrictConfig | None = None,
        resume: bool = False,
        overwrite: bool = False,
        command: str | None = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config, self.resume, self.command = config, resume, command
        self.output_dir = Path(config.output_dir)
        _check_tracker(config.report_to)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            log_with=config.report_to,
            project_dir=str(self.output_dir) if config.report_to else None,
        )
        if self.accelerator.is_main_process:
            _claim_output_dir(self.output_dir, resume=resume, overwrite=overwrite)
        self.accelerator.wait_for_everyone()
        set_seed(config.seed)
        self.run_config = run_config
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            payload = run_config.to_dict() if run_config is not None else config.to_dict()
            atomic_write_text(self.output_dir / "config.json", json.dumps(payload, indent=2) + "\n")

    # ------------------------------------------------------------------ what tasks read
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def print(self, *args) -> None:
        self.accelerator.print(*args)

    # ------------------------------------------------------------------ the loop
    def run(self, task: TrainingTask) -> Path:
        """Train ``task`` for ``max_train_steps`` optimiser steps; returns ``output_dir/final``."""
        cfg, acc = self.config, self.accelerator
        task.loop = self
        params = task.parameters()
        if not params:
            raise ValueError(f"{type(task).__name__} has no parameters that require grad; nothing to train")
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.weight_decay)
        scheduler = _lr_scheduler(cfg, optimizer)
        task.module, optimizer = acc.prepare(task.module, optimizer)

        step = self._resume(task, optimizer, scheduler) if self.resume else 0
        if cfg.report_to:
            acc.init_trackers(self.output_dir.name, config=_flat(self.run_config.to_dict() if self.run_config
                                                                  else cfg.to_dict()))
        self.print(task.describe())

        def checkpoint(at: int) -> None:
            if acc.is_main_process:
                save_checkpoint(self.output_dir, at, write_adapter=task.save_checkpoint, optimizer=optimizer,
                                scheduler=scheduler, state={"seed": cfg.seed}, keep=cfg.keep_checkpoints)
            acc.wait_for_everyone()

        log_path = self.output_dir / "log.jsonl"
        progress = _progress(cfg.max_train_steps, step, acc.is_main_process, type(task).__name__)
        task.module.train()
        sums: dict[str, Tensor] = {}
        count, window_start, started = 0, time.perf_counter(), time.perf_counter()
        batches = task.batches(step * cfg.gradient_accumulation_steps)
        with GracefulStop(lambda: checkpoint(step), self.print, lambda: f"step {step} to {self.output_dir}") as stop:
            try:
                while step < cfg.max_train_steps:
                    batch = _next_batch(batches, task, step)
                    with acc.accumulate(task.module):
                        losses = task.step(batch)
                        if "loss" not in losses:
                            raise KeyError(f"{type(task).__name__}.step must return a dict with 'loss', got "
                                           f"{sorted(losses)}")
                        acc.backward(losses["loss"])
                        if acc.sync_gradients and cfg.max_grad_norm > 0:
                            acc.clip_grad_norm_(params, cfg.max_grad_norm)
                        optimizer.step()
                        if acc.sync_gradients and not acc.optimizer_step_was_skipped:
                            scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    for key, value in losses.items():  # summed on the device: no host sync per step
                        sums[key] = sums.get(key, 0.0) + value.detach().float()
                    count += 1
                    if not acc.sync_gradients:
                        continue
                    step += 1
                    task.after_optimizer_step(step)
                    progress.update(1)
                    if step % cfg.log_every == 0 or step == cfg.max_train_steps:
                        now = time.perf_counter()
                        record = {"step": step, "lr": scheduler.get_last_lr()[0]}
                        record.update(_mean_over_processes(acc, sums, count))
                        bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
                        if bad:
                            raise FloatingPointError(f"{', '.join(bad)} not finite at step {step}: {record}; "
                                                     "lower train.learning_rate or check the data")
                        steps_in_window = count / cfg.gradient_accumulation_steps
                        record["s_per_step"] = round((now - window_start) / steps_in_window, 3)
                        record["elapsed_s"] = round(now - started, 1)
                        record.update(task.log_extras())
                        progress.set_postfix(loss=round(record["loss"], 4))
                        self._log(log_path, record, step)
                        sums, count, window_start = {}, 0, time.perf_counter()
                    if cfg.eval_every and step % cfg.eval_every == 0:
                        self._evaluate(task, step, log_path)
                        window_start = time.perf_counter()  # evaluation time is not training time
                    if step % cfg.save_every == 0:
                        checkpoint(step)
                    stop.check()
            finally:
                progress.close()
        if not (self.output_dir / f"step-{step:06d}").is_dir():
            checkpoint(step)
        final = self.output_dir / "final"
        if acc.is_main_process:
            task.save_final(final)
        if cfg.eval_every and step % cfg.eval_every != 0:
            self._evaluate(task, step, log_path)
        if cfg.report_to:
            acc.end_training()
        acc.wait_for_everyone()
        return final

    # ------------------------------------------------------------------ pieces
    def _resume(self, task: TrainingTask, optimizer, scheduler) -> int:
        """Load the newest checkpoint that reads back; returns its step (0 when there is none)."""
        candidates = list_checkpoints(self.output_dir)
        if not candidates:
            self.print(f"--resume: no checkpoint in {self.output_dir}; starting from scratch")
            return 0
        failures = []
        for folder in reversed(candidates):
            try:
                state = json.loads((folder / "state.json").read_text())
                task.load_checkpoint(folder, state)
                load_training_state(folder, optimizer=optimizer, scheduler=scheduler)
            except AdapterMismatch:  # readable, but another model than this run's config builds: no older one fits
                raise
            except Exception as err:  # any unreadable piece: say which, then try the previous checkpoint
                failures.append(f"{folder.name}: {type(err).__name__}: {err}")
                logger.warning("checkpoint %s cannot be read (%s: %s); trying the previous one",
                               folder, type(err).__name__, err)
                continue
            if failures:
                self.print(f"skipped unreadable checkpoints: {'; '.join(failures)}")
            self.print(f"resumed from {folder} at step {state['step']}")
            return int(state["step"])
        raise RuntimeError(f"--resume: no checkpoint in {self.output_dir} could be read: {'; '.join(failures)}")

    def _log(self, path: Path, record: dict, step: int) -> None:
        if self.accelerator.is_main_process:
            with open(path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.config.report_to:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def _evaluate(self, task: TrainingTask, step: int, log_path: Path) -> None:
        was_training = task.module.training
        task.module.eval()
        try:
            result = task.evaluate(step)
        finally:
            task.module.train(was_training)
        if result:
            self._log(log_path, {"step": step, "eval": result}, step)


def _next_batch(batches: Iterator, task: TrainingTask, step: int):
    try:
        return next(batches)
    except StopIteration:
        raise RuntimeError(f"{type(task).__name__}.batches ran out at step {step}; it must keep yielding batches "
                           "(loop over epochs), and the dataset must hold at least one batch") from None


def _mean_over_processes(acc, sums: dict[str, Tensor], count: int) -> dict[str, float]:
    if not sums:
        return {}
    keys = sorted(sums)
    stacked = torch.stack([torch.as_tensor(sums[k], device=acc.device, dtype=torch.float32) for k in keys]) / count
    stacked = acc.reduce(stacked, reduction="mean") if acc.num_processes > 1 else stacked
    return {k: round(float(v), 5) for k, v in zip(keys, stacked.tolist())}


def _lr_scheduler(cfg: TrainLoopConfig, optimizer):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    if cfg.lr_schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)
    if cfg.lr_schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_train_steps)
    return get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_train_steps)


def _progress(total: int, initial: int, enabled: bool, what: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"training ({what})", unit="step", disable=not enabled)


def _claim_output_dir(folder: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a folder holding another run unless resuming it or told to overwrite it."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise NotADirectoryError(f"train.output_dir {folder} is a file; give a folder")
    held = sorted(p.name for p in folder.iterdir() if p.name in RUN_FILES or p.name.startswith(("step-", ".step-")))
    if not held or resume:
        return
    if not overwrite:
        raise FileExistsError(
            f"train.output_dir {folder} already holds a run ({', '.join(held)}); pass --resume to continue it, "
            "--overwrite to start over (deletes its checkpoints, final/ and log.jsonl), or another --output_dir"
        )
    for name in held:
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _check_tracker(report_to: str | None) -> None:
    if report_to is None:
        return
    from accelerate.tracking import get_available_trackers

    available = [str(t) for t in get_available_trackers()]
    if report_to not in available:
        raise ValueError(f"train.report_to={report_to!r} needs that tracker's package installed; available here: "
                         f"{available or 'none'} (e.g. pip install tensorboard)")


def _flat(config: dict, prefix: str = "") -> dict:
    """Nested config -> {"train.learning_rate": 1e-3, ...} with scalar values (what trackers accept)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def recipe_command(argv: list[str] | None, script: str) -> str:
    """The command line recorded with a run: ``argv`` after ``script`` when given, else this process's own,
    prefixed with ``accelerate launch`` when that launcher started it (it sets ``ACCELERATE_MIXED_PRECISION``
    for every kind of launch) and with ``python`` otherwise."""
    import os
    import sys

    if argv is not None:
        return " ".join([script, *argv])
    launcher = "accelerate launch" if "ACCELERATE_MIXED_PRECISION" in os.environ else "python"
    return " ".join([launcher, *sys.argv])


__all__ = ["LR_SCHEDULES", "TrainLoopConfig", "TrainingLoop", "TrainingTask", "recipe_command"]
