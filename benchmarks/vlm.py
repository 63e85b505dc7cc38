"""Vision-language model benchmark (real frozen EfficientNet-Lite0 + SmolLM2-135M, a VLAP connector).

    python benchmarks/vlm.py [--quick] [--json benchmarks/results/vlm.json]

- caption generation tokens/s through the VLM (features -> connector -> merged prefix -> KV-cached decode)
  vs the bare LLM decoding the same number of tokens from a text prefix of the same length
  (target: connector overhead <= 10%, i.e. ratio >= 0.9);
- the same end to end from pixels (encoder included; reported);
- training samples/s with cached vs uncached vision features (reported);
- SmolLM2 load time from mmkit's converted cache (target < 2 s, ratio = 2 s / time).
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Record, finish, machine_header, parse_args, time_interleaved  # noqa: E402

LLM = "HuggingFaceTB/SmolLM2-135M-Instruct"


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mmkit.connectors import build_connector
    from mmkit.data.shapes import ShapesWorldConfig, render_scene
    from mmkit.data.shapes_language import caption
    from mmkit.data.shapesworld import ShapesWorld
    from mmkit.encoders import load_encoder
    from mmkit.llm import FrozenLM
    from mmkit.llm.loading import load_causal_lm
    from mmkit.models import VisionLanguageModel

    records: list[Record] = []
    reps = 3 if args.quick else 7
    load_causal_lm(LLM)  # make sure the converted cache exists before timing a load
    t0 = time.perf_counter()
    llm = FrozenLM.from_pretrained(LLM)
    t_load = time.perf_counter() - t0
    records.append(Record("SmolLM2 load from converted cache", "2 s budget", f"{t_load:.2f} s", 2.0 / t_load, 1.0,
                          values={"load_s": t_load}))
    print(records[-1].line(), flush=True)

    encoder = load_encoder("timm:tf_efficientnet_lite0", token_grid=3)
    connector = build_connector("vlap", vision_dim=encoder.dim, llm_dim=llm.hidden_size, prior="uniform")
    vlm = VisionLanguageModel(encoder, connector, llm)
    world = ShapesWorld(ShapesWorldConfig(image_size=224), split="val", size=64)
    B, new_tokens = 8, 16 if args.quick else 24
    images = [render_scene(world.scene(i), 224) for i in range(B)]
    feats = vlm.image_features(images)

    vlm_batch = llm.build_batch([vlm.caption_prompt] * B, feats.shape[1])
    prefix_len = vlm_batch.input_ids.shape[1]
    # a text prompt with exactly the same number of tokens
    word_ids = llm.tokenizer(" shape", add_special_tokens=False)["input_ids"]
    text_prompt = "".join([" shape"] * (prefix_len // len(word_ids)))
    llm_batch = llm.build_batch([text_prompt + "<image>"] * B, 0)
    assert llm_batch.input_ids.shape[1] == prefix_len, (llm_batch.input_ids.shape, prefix_len)

    def through_vlm():
        embeds, _ = vlm.image_embeds(feats)
        return llm.generate_ids(vlm_batch, embeds, max_new_tokens=new_tokens, stop_at_eos=False)

    def bare_llm():
        return llm.generate_ids(llm_batch, torch.empty(B, 0, llm.hidden_size), max_new_tokens=new_tokens,
                                stop_at_eos=False)

    def from_pixels():
        embeds, _ = vlm.image_embeds(vlm.image_features(images))
        return llm.generate_ids(vlm_batch, embeds, max_new_tokens=new_tokens, stop_at_eos=False)

    with torch.no_grad():
        t = time_interleaved({"vlm": through_vlm, "llm": bare_llm, "pixels": from_pixels}, repeats=reps)
    tps = {k: B * new_tokens / v for k, v in t.items()}
    records.append(Record(
        f"caption generation B{B} prefix{prefix_len} +{new_tokens} tok", f"bare LLM {tps['llm']:.1f} tok/s",
        f"VLM {tps['vlm']:.1f} tok/s", tps["vlm"] / tps["llm"], 0.9, values={"tokens_per_s": tps, "seconds": t},
    ))
    print(records[-1].line(), flush=True)
    records.append(Record(
        "caption generation incl. encoder (from pixels)", f"bare LLM {tps['llm']:.1f} tok/s",
        f"VLM from pixels {tps['pixels']:.1f} tok/s", tps["pixels"] / tps["llm"], values={"tokens_per_s": tps},
    ))
    print(records[-1].line(), flush=True)

    # training throughput, cached vs uncached features (batch 16, one optimizer step each)
    opt = torch.optim.AdamW(vlm.trainable_parameters(), lr=1e-4)
    caps = [caption(world.scene(i)) for i in range(16)]
    train_scenes = [world.scene(i) for i in range(16)]
    cached = vlm.image_features([render_scene(s, 224) for s in train_scenes])

    def step(features):
        out = vlm(features, [vlm.caption_prompt] * 16, caps, alignment_texts=caps)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()

    def uncached_step():
        step(vlm.image_features([render_scene(s, 224) for s in train_scenes]))

    t = time_interleaved({"cached": lambda: step(cached), "uncached": uncached_step},
                         repeats=2 if args.quick else 4)
    sps = {k: 16 / v for k, v in t.items()}
    records.append(Record(
        "training samples/s, batch 16", f"uncached {sps['uncached']:.2f}/s", f"cached {sps['cached']:.2f}/s",
        sps["cached"] / sps["uncached"], values={"samples_per_s": sps},
    ))
    print(records[-1].line(), flush=True)
    return finish(records, args.json, machine_header(args.quick))


if __name__ == "__main__":
    sys.exit(main())
