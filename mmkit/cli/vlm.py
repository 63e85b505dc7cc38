"""``mmkit caption``, ``mmkit vqa`` and ``mmkit prepare``: the vision-language model from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..assets import DEFAULT_CONNECTOR
from .base import Command, UserError, positive_int


def _connector_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connector", type=Path, default=DEFAULT_CONNECTOR,
                        help=f"trained model folder: a bundle or a connector (default: {DEFAULT_CONNECTOR})")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None)
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of text")


def _load(connector: Path):
    from ..models import VisionLanguageModel
    from ..models.bundle import is_bundle

    if not is_bundle(connector):
        raise UserError(f"no trained model in {connector} (expected bundle.json, or adapter.json / connector.json "
                        f"of a connector); train one with recipes/caption/train.py or pass --connector")
    return VisionLanguageModel.from_pretrained(connector)


def _caption_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    _connector_arg(parser)


def _caption(args: argparse.Namespace) -> int:
    from ..data.images import load_image

    images = [load_image(p) for p in args.images]  # fails early, naming the bad file
    model = _load(args.connector)
    kw = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    for path, text in zip(args.images, model.caption(images=images, **kw)):
        print(json.dumps({"image": path, "caption": text}) if args.json else f"{path}: {text}")
    return 0


def _vqa_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="an image file")
    parser.add_argument("questions", nargs="+", help="one or more questions")
    _connector_arg(parser)


def _vqa(args: argparse.Namespace) -> int:
    from ..data.images import load_image

    image = load_image(args.image)
    empty = [i + 1 for i, q in enumerate(args.questions) if not q.strip()]
    if empty:  # before loading the model
        raise UserError(f"question {empty[0]} is empty; ask something about the image")
    model = _load(args.connector)
    kw = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    answers = model.answer(args.questions, images=[image] * len(args.questions), **kw)
    for q, a in zip(args.questions, answers):
        print(json.dumps({"question": q, "answer": a}) if args.json else f"Q: {q}\nA: {a}")
    return 0


def _prepare_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--llm", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--whisper", default="openai/whisper-tiny.en", help="audio encoder to convert ('' = none)")


def _prepare(args: argparse.Namespace) -> int:
    import time

    from ..llm.loading import converted_dir, load_causal_lm

    t0 = time.perf_counter()
    load_causal_lm(args.llm)
    print(f"{args.llm}: ready in {converted_dir(args.llm)} ({time.perf_counter() - t0:.1f} s)")
    if args.whisper:
        from ..encoders import whisper

        t0 = time.perf_counter()
        whisper.load_whisper(args.whisper)
        print(f"{args.whisper}: ready in {whisper.converted_dir(args.whisper)} ({time.perf_counter() - t0:.1f} s)")
    return 0


COMMANDS = (
    Command("caption", "caption images with a trained connector", _caption_args, _caption),
    Command("vqa", "answer questions about an image with a trained connector", _vqa_args, _vqa),
    Command("prepare", "convert the offline weight carriers once (SmolLM2 GGUF, Whisper CTranslate2 -> cached folders)",
            _prepare_args, _prepare),
)
