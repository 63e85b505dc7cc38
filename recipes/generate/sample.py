"""Generate images with the ShapesWorld model, any pixel-pipeline folder or a Stable Diffusion folder.

    python recipes/generate/sample.py "a small red circle to the left of a large blue star" --out grid.png
    python recipes/generate/sample.py "a large green triangle" --agent-sd --num-images 8 --seed 3
    python recipes/generate/sample.py "a large green triangle" --tome 0.5 --model outputs/t2i-shapes/final

Same arguments as ``mmkit generate`` (see ``mmkit/cli/generate.py``; ``--help`` lists the patch flags).
"""

import sys

from mmkit.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
