"""A tiny regression task on the shared training loop, for the loop's own tests (one or two processes).

    python tests/helpers/loop_task.py OUTPUT_DIR [key=value ...]          # one process
    accelerate launch --multi_gpu --num_processes 2 tests/helpers/loop_task.py  # gloo on a CPU machine: OUTPUT_DIR train.batch_size=4 ...
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from mmkit.config import StrictConfig
from mmkit.training.loop import TrainingLoop, TrainingTask, TrainLoopConfig


@dataclass
class ToyData(StrictConfig):
    size: int = 64
    nan_at_step: int = 0  # > 0: the loss becomes NaN from this step on (to test the check)


@dataclass
class ToyConfig(StrictConfig):
    data: ToyData = field(default_factory=ToyData)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)


DEFAULTS = ["train.batch_size=8", "train.learning_rate=0.05", "train.warmup_steps=0", "train.max_train_steps=6",
            "train.log_every=1", "train.save_every=2"]


class ToyTask(TrainingTask):
    """Linear regression y = x w* + noise, batches from a seeded sampler like the VLM recipe's."""

    def __init__(self, cfg: ToyConfig, loop: TrainingLoop) -> None:
        self.cfg, self.loop = cfg, loop
        g = torch.Generator().manual_seed(123)
        x = torch.randn(cfg.data.size, 5, generator=g)
        y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0]) + 0.1 * torch.randn(cfg.data.size, generator=g)
        dataset = TensorDataset(x, y)
        self.sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(cfg.train.seed))
        self.loader = loop.accelerator.prepare(
            DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=self.sampler, drop_last=True))
        self.module = nn.Linear(5, 1)
        self.steps_done = 0

    def batches(self, start: int):
        per_epoch = len(self.loader)
        while per_epoch:
            epoch, offset = divmod(start, per_epoch)
            self.sampler.generator.manual_seed(self.cfg.train.seed + epoch)
            for batch in self.loop.accelerator.skip_first_batches(self.loader, offset) if offset else self.loader:
                yield batch
                start += 1

    def step(self, batch):
        x, y = batch
        loss = (self.module(x).squeeze(-1) - y).pow(2).mean()
        if self.cfg.data.nan_at_step and self.steps_done + 1 >= self.cfg.data.nan_at_step:
            loss = loss * float("nan")
        return {"loss": loss, "abs_error": (self.module(x).squeeze(-1) - y).abs().mean()}

    def after_optimizer_step(self, step: int) -> None:
        self.steps_done = step

    def save_checkpoint(self, folder: Path) -> dict:
        from safetensors.torch import save_file

        save_file(self.unwrapped().state_dict(), str(folder / "toy.safetensors"))
        return {"toy": True}

    def load_checkpoint(self, folder: Path, state: dict) -> None:
        from safetensors.torch import load_file

        self.unwrapped().load_state_dict(load_file(str(folder / "toy.safetensors")))
        self.steps_done = state["step"]

    def save_final(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.save_checkpoint(folder)


def train_toy(output_dir: str, overrides: list[str], *, resume: bool = False, overwrite: bool = False) -> Path:
    from mmkit.training.config import load_config

    cfg = load_config(ToyConfig, None, [*DEFAULTS, f"train.output_dir={output_dir}", *overrides])
    loop = TrainingLoop(cfg.train, run_config=cfg, resume=resume, overwrite=overwrite)
    return loop.run(ToyTask(cfg, loop))


if __name__ == "__main__":
    args = [a for a in sys.argv[2:] if not a.startswith("--")]
    train_toy(sys.argv[1], args, resume="--resume" in sys.argv, overwrite="--overwrite" in sys.argv)
