"""FAVOR's causal Q-Former: windows per second through the block-causal mask, and its share of a training step.

    python benchmarks/qformer.py [--quick] [--device cuda] [--json benchmarks/results/qformer.json]

1. **windows/s**: the connector at FAVOR's defaults (32 queries, hidden 768, 12 heads, 2 layers, 10-frame
   windows of 32 tokens per frame) on 60-frame clips (6 windows each; frame tokens 1408 + 1280 wide, EVA
   ViT-g next to Whisper large as in FAVOR), every attention through the default backend (the causal
   encoder attention with the structured ``key_padding & block_causal`` mask) against the same connector
   forced onto the ``eager`` backend (the dense masked path: the mask materialised, softmax(QK^T + bias)V);
   forward in eval mode and forward + backward in training mode. The ``compiled`` backend
   (flex_attention, block-sparse) is reported when it runs here. Ratio = eager time / default time.
2. **share of a training step**: connector forward + backward against a whole video-QA training step
   (connector -> frozen SmolLM2-135M, real weights from the carrier, loss on the answers, backward into the
   connector), at FAVOR's sizes and at the offline recipe's (``recipes/video_qa/configs/shapes_clips_past``).
   Reported (no target): where the time of a step goes.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Record, finish, machine_header, parse_args, time_interleaved  # noqa: E402

FAVOR = dict(vision_dim=1408 + 1280, hidden_dropout=0.0, attention_dropout=0.0)  # defaults otherwise
OFFLINE = dict(vision_dim=1280 + 384, tokens_per_frame=9, frames_per_window=4, num_queries=8, hidden_size=256,
               num_heads=4, intermediate_size=1024, encoder_heads=8, hidden_dropout=0.0, attention_dropout=0.0)
LLM = "HuggingFaceTB/SmolLM2-135M-Instruct"


def clip_features(connector, clips: int, frames: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = connector.config
    g = torch.Generator().manual_seed(0)
    features = torch.randn(clips, frames * cfg.tokens_per_frame, cfg.vision_dim, generator=g).to(device)
    return features, torch.ones(features.shape[:2], dtype=torch.bool, device=device)


def window_records(args, device) -> list[Record]:
    from mmkit.connectors import build_connector
    from mmkit.ops import attention_backend, block_causal, explain, key_padding

    connector = build_connector("qformer", llm_dim=576, **FAVOR).to(device)
    clips = 2 if args.quick else 8
    features, mask = clip_features(connector, clips, 60, device)
    windows = clips * connector.windows(features[:1], mask[:1])[2]
    cfg = connector.config
    probe = torch.randn(windows, cfg.frames_per_window * cfg.tokens_per_frame, cfg.encoder_heads,
                        cfg.vision_dim // cfg.encoder_heads, device=device)
    structured = key_padding(torch.ones(probe.shape[:2], dtype=torch.bool, device=device)) & block_causal(
        cfg.tokens_per_frame, direction=cfg.encoder_attention)
    print(explain(probe, probe, probe, mask=structured).splitlines()[1].strip(), "(the causal encoder attention)")

    def run(backend: str | None, train: bool):
        def call():
            connector.train(train)
            with attention_backend(backend) if backend else contextlib.nullcontext():
                if train:
                    tokens, _ = connector(features, mask)
                    tokens.float().square().mean().backward()
                else:
                    with torch.no_grad():
                        connector(features, mask)

        return call

    records = []
    for train in (False, True):
        backends = {"default": None, "eager": "eager"}
        try:
            run("compiled", train)()
            backends["compiled"] = "compiled"
        except Exception as err:  # flex_attention unavailable on this build / device / with grad on CPU
            print(f"compiled backend skipped ({'train' if train else 'eval'}): {type(err).__name__}: "
                  f"{str(err).splitlines()[0][:160]}")
        fns = {name: run(b, train) for name, b in backends.items()}
        times = time_interleaved(fns, repeats=3 if args.quick else 7, warmup=1, device=device)
        mode = "forward+backward" if train else "forward"
        per_s = {name: windows / t for name, t in times.items()}
        records.append(Record(f"qformer {mode} windows/s", "eager (dense mask)", "default backend",
                              times["eager"] / times["default"],
                              values={"windows": windows, "clips": clips, "frames": 60, "windows_per_s": per_s,
                                      "seconds": times, "device": str(device)}))
        print(records[-1].line(), " ".join(f"{k}={v:.1f}/s" for k, v in per_s.items()), flush=True)
        if "compiled" in times:
            records.append(Record(f"qformer {mode} compiled flex", "eager (dense mask)", "compiled",
                                  times["eager"] / times["compiled"], values={"windows_per_s": per_s}))
            print(records[-1].line(), flush=True)
    return records


def step_fns(connector, model, features, mask, prompts, targets) -> dict:
    """The connector's forward+backward alone, and a whole training step through the frozen LLM."""

    def connector_only():
        tokens, _ = connector(features, mask)
        tokens.float().square().mean().backward()

    def whole_step():
        model(features, prompts, targets, feature_mask=mask)["loss"].backward()

    return {"connector": connector_only, "step": whole_step}


def share_records(args, device) -> list[Record]:
    from mmkit.connectors import build_connector
    from mmkit.llm import FrozenLM
    from mmkit.models import VisionLanguageModel

    llm = FrozenLM.from_pretrained(LLM)
    llm.to(device)
    records = []
    for label, sizes, frames in (("FAVOR sizes, 60 frames", FAVOR, 60), ("offline recipe, 8 frames", OFFLINE, 8)):
        connector = build_connector("qformer", llm_dim=llm.hidden_size, **sizes).to(device).train()
        model = VisionLanguageModel(None, connector, llm, caption_prompt="<image> Caption:",
                                    vqa_prompt="<image> Question: {question} Answer:")
        clips = 2 if args.quick else 4
        features, mask = clip_features(connector, clips, frames, device)
        prompts = ["<image> Question: which shape appeared first? Answer:"] * clips
        targets = ["circle"] * clips

        times = time_interleaved(step_fns(connector, model, features, mask, prompts, targets),
                                 repeats=3 if args.quick else 5, warmup=1, device=device)
        share = times["connector"] / times["step"]
        records.append(Record(f"connector share of a step ({label})", "whole training step", "connector fwd+bwd",
                              share, values={"seconds": times, "clips": clips, "frames": frames,
                                             "llm_tokens_from_video": connector.num_output_tokens(features.shape[1]),
                                             "device": str(device)}))
        print(f"{records[-1].name}: {100 * share:.1f}% ({times['connector'] * 1e3:.0f} ms of "
              f"{times['step'] * 1e3:.0f} ms)", flush=True)
    return records


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], device=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device)
    records = window_records(args, device) + share_records(args, device)
    return finish(records, args.json, {**machine_header(args.quick), "device": str(device)})


if __name__ == "__main__":
    sys.exit(main())
