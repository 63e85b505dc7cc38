"""Train a connector for video (+ audio) question answering: FAVOR's causal Q-Former on ShapesWorld clips.

    python recipes/video_qa/train.py --config recipes/video_qa/configs/shapes_clips_past.yaml
    python recipes/video_qa/train.py --config recipes/video_qa/configs/shapes_clips_none.yaml     # non-causal
    python recipes/video_qa/train.py --max_train_steps 2 --output_dir /tmp/smoke                 # smoke test
    accelerate launch recipes/video_qa/train.py --resume                                          # after a stop

Frames through a frozen image encoder and the sound through frozen Whisper (``av:`` encoder specs), the
clip's frame tokens through the connector into the frozen LLM; the same loop as the caption recipe.
"""

import os
import sys

from mmkit.cli import run_guarded
from mmkit.training.vlm import recipe_main

DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "shapes_clips_past.yaml")

if __name__ == "__main__":
    sys.exit(run_guarded(lambda: recipe_main(DEFAULT), prog="train.py"))
