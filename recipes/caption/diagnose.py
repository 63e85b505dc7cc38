"""Measure whether VLAP's assignment targets carry per-caption information on your data, and whether the
gradient of L_map is batch-specific signal or the same drift every batch (see
mmkit/eval/assignment_diagnostics.py for what each number means).

    python recipes/caption/diagnose.py --config recipes/caption/configs/shapes_vlap.yaml \
        --connector outputs/caption-vlap/final --batches 8 --json outputs/eval/vlap-diagnostics.json
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from mmkit.cli import run_guarded
from mmkit.config import atomic_write_text, load_config
from mmkit.connectors import load_weights_into
from mmkit.data.features import source_features
from mmkit.data.sources import open_source
from mmkit.eval.assignment_diagnostics import assignment_diagnostics, format_diagnostics
from mmkit.models.bundle import read_bundle
from mmkit.training.vlm import VLMTrainConfig, build_model, encoder_meta, load_components


def main(argv: list[str] | None = None) -> dict:
    """The training config's model and data, at init or with a trained connector's weights."""
    parser = argparse.ArgumentParser(description="Measure how informative VLAP's assignment targets are.")
    parser.add_argument("--config", required=True, help="a caption/VQA training yaml (model + data sections)")
    parser.add_argument("--connector", default=None, help="trained connector folder (default: the untrained init)")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's train.batch_size")
    parser.add_argument("--no-caption-loss", action="store_true", help="skip the LLM forward/backward")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(VLMTrainConfig, args.config, list(args.overrides))
    torch.manual_seed(cfg.train.seed)
    encoder, llm = load_components(cfg.model)
    source = open_source(cfg.data)
    features = source_features(source, encoder, encoder_meta(cfg.model), cfg.data.feature_cache)
    captioned = [(i, text) for i in range(len(source)) if (text := source.caption(i))]
    keep, texts = [i for i, _ in captioned], [text for _, text in captioned]
    model = build_model(cfg, encoder, llm, texts)
    if args.connector:
        load_weights_into(model.connector, read_bundle(args.connector)["adapters"]["connector"])
    result = assignment_diagnostics(
        model, features[keep], texts, batch_size=args.batch_size or cfg.train.batch_size,
        batches=args.batches, with_caption_loss=not args.no_caption_loss, seed=cfg.train.seed,
    )
    result["connector"] = args.connector or "init"
    print(format_diagnostics(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.json), json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(run_guarded(lambda: main(), prog="diagnose.py"))
