"""Teach a frozen text-to-image pipeline a new concept from a few renders: NeTI or plain textual inversion.

    python recipes/generate/train_concept.py                                     # configs/neti_cross.yaml
    python recipes/generate/train_concept.py model.kind=textual_inversion --output_dir outputs/ti-cross
    python recipes/generate/train_concept.py --resume                             # after a stop

The concept (default: a yellow cross, a shape the ShapesWorld T2I model never saw) is ``data.num_images``
renders captioned with textual-inversion templates around ``<S*>``. Only the mapper (or the one embedding)
trains; ``final/`` is the adapter folder that ``mmkit generate --neti FOLDER`` and ``eval_concept.py`` load.
"""

import os
import sys

from mmkit.cli import run_guarded
from mmkit.training.config import run_recipe
from mmkit.training.t2i_adapters import ConceptTrainConfig, train_concept

DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "neti_cross.yaml")


def main(argv=None):
    return run_recipe(
        ConceptTrainConfig, DEFAULT, train_concept,
        description="Teach a frozen text-to-image pipeline a new concept (NeTI or textual inversion).",
        epilog="Extra arguments are dotted overrides, e.g. model.kind=textual_inversion data.num_images=5",
        script="train_concept.py", saved="concept adapter", argv=argv,
    )


if __name__ == "__main__":
    sys.exit(run_guarded(lambda: main(), prog="train_concept.py"))
