"""Train a CLP / WiCLP text projection on a frozen text-to-image pipeline (compositional ShapesWorld prompts).

    python recipes/generate/train_projection.py                                  # configs/wiclp_shapes.yaml
    python recipes/generate/train_projection.py projection.kind=clp --output_dir outputs/clp-shapes
    python recipes/generate/train_projection.py --resume                          # after a stop

Only the projection trains (the paper's Adam 1e-5, batch 8, clipping 1.0 by default); ``final/`` is the
adapter folder that ``mmkit generate --text-projection FOLDER`` and ``eval.py --variants "--text-projection FOLDER"`` load.
"""

import os
import sys

from mmkit.cli import run_guarded
from mmkit.training.config import run_recipe
from mmkit.training.t2i_adapters import ProjectionTrainConfig, train_projection

DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "wiclp_shapes.yaml")


def main(argv=None):
    return run_recipe(
        ProjectionTrainConfig, DEFAULT, train_projection,
        description="Train a CLP / WiCLP text projection on a frozen text-to-image pipeline.",
        epilog="Extra arguments are dotted overrides, e.g. projection.kind=clp train.learning_rate=1e-4",
        script="train_projection.py", saved="text projection", argv=argv,
    )


if __name__ == "__main__":
    sys.exit(run_guarded(lambda: main(), prog="train_projection.py"))
