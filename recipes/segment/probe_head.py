"""Can a fresh ``<SEG>`` head read the expression from a trained model's frozen ``<SEG>`` states?

A READ / ``<SEG>``-only model that gives the same mask for every expression of a scene (``diagnose.py``) has
either states that do not carry the expression, or a head and mask decoder that do not read it. This probe
separates the two: it keeps the model's LLM (with its LoRA and ``<SEG>`` row) frozen, takes the state that
predicts ``<SEG>`` for each training expression (the prompt and answer the model trained with), and trains
*fresh* heads (LISA's MLP, with each ``--input-norm``, on the states of each of ``--layers``) together with a
fresh copy of the SAM checkpoint's own mask decoder, on the model's mask loss (2.0 BCE + 0.5 Dice by default),
per seed with the same head start, batches and steps for every variant. On held-out scenes it reports how
often the mask overlaps the named object best (scenes of two objects or more, next to one object at random)
and gIoU. States and SAM embeddings are computed once; each variant then trains in a minute or two on a CPU.

    python recipes/segment/probe_head.py --model outputs/segment-seg-only-base/final --input-norm none batch \\
        --train-size 600 --size 150 --steps 400 --json outputs/eval/probe-head.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from mmkit.cli import run_guarded


def seg_states(model, features, refs, prompt: str, answer: str, batch_size: int, layers) -> list[torch.Tensor]:
    """Per layer of ``layers``, (n, d) the frozen model's state predicting ``<SEG>`` for each referral,
    teacher-forced on ``answer``."""
    from tqdm.auto import tqdm

    out = [[] for _ in layers]
    with torch.no_grad():
        for start in tqdm(range(0, len(refs), batch_size), desc="<SEG> states", unit="batch"):
            chunk = refs[start:start + batch_size]
            idx = torch.tensor([r.index for r in chunk])
            texts = [prompt.replace("{expression}", r.expression) for r in chunk]
            states, found = model.teacher_forced_seg_states(features[idx], texts, [answer] * len(chunk),
                                                            layers=layers)
            if not bool(found.all()):
                raise ValueError(f"the answer {answer!r} holds no <SEG> token the model knows")
            for kept, s in zip(out, states, strict=True):
                kept.append(s.float())
    return [torch.cat(kept) for kept in out]


def split_data(source, refs, size: int):
    """(B, H, W) truth masks of ``refs`` and, per referral, the scene's object masks (None if unknown)."""
    truths, scenes = [], []
    for r in refs:
        scene = source.object_masks(r.index, size)
        truths.append(torch.from_numpy(source.mask(r.index, r, size) if scene is None else scene[r.target]))
        scenes.append(scene)
    return torch.stack(truths).float(), scenes


def train_probe(head, decoder_sam, states, embeddings, truths, seg_config, *, steps: int, batch_size: int,
                lr: float, seed: int, desc: str = "probe") -> list[float]:
    """Train ``head`` and ``decoder_sam.mask_decoder`` on (states, SAM embeddings) -> truth masks with the
    model's mask loss (``seg_config``'s BCE and Dice weights and smoothing); returns the loss every 50 steps."""
    from tqdm.auto import tqdm

    from mmkit.heads.sam_prompt import decode_masks, upscale_masks
    from mmkit.heads.seg import dice_loss

    params = list(head.parameters()) + list(decoder_sam.mask_decoder.parameters())
    for p in decoder_sam.mask_decoder.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    head.train(), decoder_sam.mask_decoder.train()
    losses = []
    for step in tqdm(range(steps), desc=desc, unit="step"):
        idx = torch.randint(0, len(states), (min(batch_size, len(states)),), generator=g)
        logits, _ = decode_masks(decoder_sam, embeddings[idx], None, None, extra=head(states[idx]))
        logits = upscale_masks(logits, tuple(truths.shape[-2:]))[:, 0]
        target = truths[idx]
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1).mean()
        dice = dice_loss(logits, target, seg_config.dice_smooth).mean()
        loss = seg_config.bce_weight * bce + seg_config.dice_weight * dice
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append(loss.item())  # every 50 steps: a host read is fine in a probe
    head.eval(), decoder_sam.mask_decoder.eval()
    return losses


def score(head, decoder_sam, states, embeddings, truths, scenes, refs, batch_size: int) -> dict:
    from mmkit.eval.seg import grounding, named_object_hit, seg_scores
    from mmkit.heads.sam_prompt import decode_masks, upscale_masks

    preds = []
    with torch.no_grad():
        for start in range(0, len(states), batch_size):
            sl = slice(start, start + batch_size)
            logits, _ = decode_masks(decoder_sam, embeddings[sl], None, None, extra=head(states[sl]))
            preds += list((upscale_masks(logits, tuple(truths.shape[-2:]))[:, 0] > 0).numpy())
    hits = [named_object_hit(p, s, r.target) for p, s, r in zip(preds, scenes, refs, strict=True)]
    objects = [0 if s is None else len(s) for s in scenes]
    return {"gIoU": seg_scores(preds, [t.numpy() > 0.5 for t in truths])["gIoU"], "grounding": grounding(hits, objects),
            "grounding_hits": hits}


def probe(args) -> dict:
    from mmkit.data.features import source_features
    from mmkit.data.sources import DataConfig, open_source, parse_source_options
    from mmkit.eval.seg import examples_digest
    from mmkit.heads.sam_prompt import load_sam
    from mmkit.heads.seg import ReadModel, SegHead, SegHeadConfig
    from mmkit.models.bundle import read_bundle
    from mmkit.training.seg import SEG_ANSWER, SEG_PROMPT, sam_embeddings

    layers = [None if k == "last" else int(k) for k in args.layers]
    parts = read_bundle(args.model)["parts"]
    model = ReadModel.from_pretrained(args.model).eval()
    prompt = parts.get("seg_prompt", SEG_PROMPT)
    answer = args.answer or parts.get("seg_answer")
    if answer is None:
        answer = SEG_ANSWER
        print(f"warning: {args.model} does not say which answer it trained with (saved before 2026-12-01); "
              f"teacher-forcing the recipe's default {answer!r} (--answer sets another)", file=sys.stderr)
    size = int(model.sam.config.prompt_encoder_config.image_size)
    options = parse_source_options(args.option, "shapesworld_refer")
    data = {}
    for role, split, n in (("fit", "train", args.train_size), ("held_out", args.split, args.size)):
        source = open_source(DataConfig(source="shapesworld_refer", split=split, size=n, options=options, tasks={}))
        refs = source.segmentation_examples(args.refs_per_image, seed=0)
        features = source_features(source, model.vlm.encoder, parts["encoder"], args.feature_cache)
        emb = sam_embeddings(source, model.sam, parts["sam"]["name"], args.feature_cache)
        truths, scenes = split_data(source, refs, size)
        data[role] = (seg_states(model, features, refs, prompt, answer, args.batch_size, layers),
                       emb[torch.tensor([r.index for r in refs])], truths, scenes, refs)
    train_layers, train_emb, train_truths, _, _ = data["fit"]
    test_layers, test_emb, test_truths, test_scenes, test_refs = data["held_out"]
    fresh = load_sam(parts["sam"]["name"])  # the checkpoint's own decoder, not the model's trained one
    examples = examples_digest(test_refs)
    result = {"model": str(args.model), "train_expressions": len(train_truths), "test_expressions": len(test_truths),
              "settings": {"train_size": args.train_size, "split": args.split, "size": args.size,
                           "refs_per_image": args.refs_per_image, "steps": args.steps, "batch_size": args.batch_size,
                           "lr": args.lr, "seeds": args.seeds, "layers": args.layers, "options": options,
                           "prompt": prompt, "answer": answer},
              "examples_sha": examples, "variants": {}}
    for layer, train_states, test_states in zip(args.layers, train_layers, test_layers, strict=True):
        for norm in args.input_norm:
            runs = []
            for seed in args.seeds:  # per seed: the MLP's start and the batches, the same for every variant
                torch.manual_seed(seed)
                head = SegHead(SegHeadConfig(llm_dim=train_states.shape[1], prompt_dim=model.config.prompt_dim,
                                             input_norm=norm))
                sam = copy.deepcopy(fresh)
                losses = train_probe(head, sam, train_states, train_emb, train_truths, model.config,
                                     steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed,
                                     desc=f"probe (layer {layer}, input norm {norm}, seed {seed})")
                runs.append({"seed": seed, "losses": losses, **score(head, sam, test_states, test_emb, test_truths,
                                                                     test_scenes, test_refs, args.batch_size)})
            best = [r["grounding"]["named_best"] for r in runs if r["grounding"]["named_best"] is not None]
            result["variants"][f"layer {layer}, input norm {norm}"] = {
                "layer": layer, "input_norm": norm, "named_best_mean": sum(best) / len(best) if best else None,
                "gIoU_mean": sum(r["gIoU"] for r in runs) / len(runs), "runs": runs}
    return result


def main(argv=None) -> dict:
    from mmkit.config import atomic_write_text
    from mmkit.heads.seg import HEAD_INPUT_NORMS

    parser = argparse.ArgumentParser(description="Fresh <SEG> heads on a model's frozen <SEG> states: do they "
                                                 "read the expression?")
    parser.add_argument("--model", type=Path, required=True, help="a READ / <SEG>-only bundle (or checkpoint)")
    parser.add_argument("--input-norm", nargs="+", default=["none", "batch"], choices=sorted(HEAD_INPUT_NORMS))
    parser.add_argument("--layers", nargs="+", default=["last"],
                        help="where to take the state: 'last' (after the final norm, what the head reads) or k (after "
                             "decoder layer k, 0 = the input embeddings)")
    parser.add_argument("--train-size", type=int, default=600, help="training scenes")
    parser.add_argument("--split", default="test")
    parser.add_argument("--size", type=int, default=150, help="held-out scenes")
    parser.add_argument("--refs-per-image", type=int, default=2)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="data.options entries")
    parser.add_argument("--answer", default=None, help="the answer to teacher-force (default: the one the bundle "
                                                       "trained with)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one probe per seed and variant")
    parser.add_argument("--feature-cache", default="outputs/features")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.split == "train":
        parser.error("--split is where the probes are scored: a held-out split (test or val), not the one they train on")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = probe(args)
    for name, v in result["variants"].items():
        for r in v["runs"]:
            g = r["grounding"]
            best = "-" if g["named_best"] is None else f"{100 * g['named_best']:.1f}%"
            print(f"{name}, seed {r['seed']}: named object best {best} of {g['expressions']} expressions "
                  f"(one object at random: {100 * (g['chance'] or 0):.1f}%), gIoU {100 * r['gIoU']:.1f}; loss "
                  f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}")
        if v["named_best_mean"] is not None:
            print(f"{name}: mean over seeds {100 * v['named_best_mean']:.1f}% named object best, "
                  f"gIoU {100 * v['gIoU_mean']:.1f}")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(run_guarded(lambda: main(), prog="probe_head.py"))
