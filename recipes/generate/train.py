"""Train the ShapesWorld text-to-image model: a pixel-space UNet conditioned on frozen MiniLM states.

    python recipes/generate/train.py --config recipes/generate/configs/shapes_t2i.yaml
    python recipes/generate/train.py --max_train_steps 2 --output_dir /tmp/smoke     # smoke test
    python recipes/generate/train.py --resume                                        # after a stop
    python recipes/generate/train.py train.learning_rate=2e-4 model.layers_per_block=2   # dotted overrides

(``accelerate launch recipes/generate/train.py ...`` works too.) The model, the noise schedule, the EMA and
the sample grids are in :mod:`mmkit.training.t2i`; the loop (checkpoints, resume, logging) is
:mod:`mmkit.training.loop`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mmkit.cli import run_guarded
from mmkit.training.config import parse_recipe_args
from mmkit.training.loop import recipe_command
from mmkit.training.t2i import T2ITrainConfig, train_t2i

DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "shapes_t2i.yaml")


def main(argv: list[str] | None = None) -> Path:
    cfg, args = parse_recipe_args(
        T2ITrainConfig, DEFAULT, description="Train the ShapesWorld pixel-space text-to-image UNet.",
        epilog="Extra arguments are dotted overrides, e.g. train.learning_rate=2e-4 model.block_out_channels=[32,64,64]",
        argv=argv,
    )
    final = train_t2i(cfg, resume=args.resume, overwrite=args.overwrite, command=recipe_command(argv, "train.py"))
    print(f"pipeline saved to {final}")
    return final


if __name__ == "__main__":
    sys.exit(run_guarded(lambda: main(), prog="train.py"))
