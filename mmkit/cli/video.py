"""``mmkit video-qa``: ask questions about a clip (a video file, a folder of frames, a still image + sound)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..assets import DEFAULT_VIDEO_MODEL
from .base import Command, UserError, positive_int


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video", help="a video file (PyAV), a folder of frame images (sorted by name), a still "
                                      "image or a sound file")
    parser.add_argument("questions", nargs="+", help="one or more questions about the clip")
    parser.add_argument("--audio", default=None, help="a sound file to use (instead of the video's own track)")
    parser.add_argument("--fps", type=float, default=2.0, help="frames sampled per second (default 2, FAVOR's)")
    parser.add_argument("--frames-fps", type=float, default=None,
                        help="the rate a folder's frames were recorded at (default: --fps)")
    parser.add_argument("--start", type=float, default=0.0, help="seconds to skip at the start")
    parser.add_argument("--model", type=Path, default=DEFAULT_VIDEO_MODEL,
                        help=f"trained video model (a bundle folder; default: {DEFAULT_VIDEO_MODEL})")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None)
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of text")


def _run(args: argparse.Namespace) -> int:
    from ..data.media import load_clip
    from ..models.bundle import is_bundle, read_bundle

    empty = [i + 1 for i, q in enumerate(args.questions) if not q.strip()]
    if empty:
        raise UserError(f"question {empty[0]} is empty; ask something about the clip")
    clip = load_clip(args.video, audio=args.audio, fps=args.fps, frames_fps=args.frames_fps, start=args.start)
    if not is_bundle(args.model):
        raise UserError(f"no trained video model in {args.model} (expected bundle.json); train one with "
                        "recipes/video_qa/train.py and pass --model")
    spec = str(read_bundle(args.model)["parts"].get("encoder", {}).get("spec", "?"))
    if not spec.startswith("av:"):  # before loading any weights
        raise UserError(f"{args.model} reads single images (encoder {spec}), not clips; use `mmkit vqa IMAGE "
                        "QUESTION`, or a model trained by recipes/video_qa")
    from ..models import VisionLanguageModel

    model = VisionLanguageModel.from_pretrained(args.model)
    kw = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    answers = model.answer(args.questions, images=[clip] * len(args.questions), **kw)
    for q, a in zip(args.questions, answers):
        print(json.dumps({"question": q, "answer": a}) if args.json else f"Q: {q}\nA: {a}")
    return 0


COMMANDS = (Command("video-qa", "answer questions about a video (frames + sound) with a trained video model", _args,
                    _run),)
