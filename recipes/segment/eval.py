"""Evaluate READ / <SEG>-only models on held-out referring expressions: gIoU, cIoU (overall and per kind) and
an HTML sheet of mask overlays (prediction red, ground truth outlined green, SAM's points as rings).
``--ablate-points`` also decodes READ models without SasP's points, to measure what the points add.

    python recipes/segment/eval.py --models outputs/segment-seg-only/final outputs/segment-read/final \\
        --split test --size 300 --json outputs/eval/segment.json --sheet outputs/eval/segment.html

With several models, every later one is also compared with the first on the same expressions (paired per-example
IoU differences, ``mmkit.eval.paired``). ``--compare A.json B.json`` does the same from earlier reports; the flag
given once per training seed (``--compare A0.json B0.json --compare A1.json B1.json``) also pools the pairs over
the seeds, each seed counting once.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from mmkit.cli import run_guarded


def evaluate(model_dir: Path, args) -> dict:
    from mmkit.data.features import source_features
    from mmkit.data.sources import DataConfig, open_source, parse_source_options
    from mmkit.eval.seg import (
        examples_digest,
        grounding,
        map_auc,
        named_object_hit,
        overlay,
        seg_scores,
        write_sheet,
    )
    from mmkit.heads.seg import ReadModel, view_boxes
    from mmkit.models.bundle import read_bundle
    from mmkit.training.seg import SEG_PROMPT, sam_embeddings

    parts = read_bundle(model_dir)["parts"]
    model = ReadModel.from_pretrained(model_dir).eval()
    options = parse_source_options(args.option, args.source)
    source = open_source(DataConfig(source=args.source, split=args.split, size=args.size, options=options, tasks={}))
    features = source_features(source, model.vlm.encoder, parts["encoder"], args.feature_cache)
    sam_emb = sam_embeddings(source, model.sam, parts["sam"]["name"], args.feature_cache)
    size = int(model.sam.config.prompt_encoder_config.image_size)
    refs = source.segmentation_examples(args.refs_per_image, seed=0)
    prompt = parts.get("seg_prompt", SEG_PROMPT)  # the training prompt, kept in the bundle
    ablate = args.ablate_points and parts["seg"].get("sasp") is not None
    preds, truths, kinds, cards, bare = [], [], [], [], []
    hits, objects = [], []  # where the source knows every object's mask: is the *named* one segmented?
    positives, inside = [], []  # SasP: positive points per expression; share of them inside the target
    aucs = []  # how well the <SEG> state's similarity map ranks the target's pixels first (any model)
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(refs), args.batch_size), desc=f"segmenting ({model_dir.parent.name}/{model_dir.name})", unit="batch"):
        chunk = refs[start:start + args.batch_size]
        idx = torch.tensor([r.index for r in chunk])
        sizes = [source.image_size(r.index) for r in chunk]
        out = model.segment(features[idx], [prompt.replace("{expression}", r.expression) for r in chunk], sam_emb[idx],
                            (size, size), without_points=ablate, image_sizes=sizes)
        boxes = view_boxes(model.vlm.encoder, sizes, len(chunk), size)  # the token grid's part of each mask
        for r, res, box in zip(chunk, out, boxes.tolist(), strict=True):
            scene = source.object_masks(r.index, size)
            truth = source.mask(r.index, r, size) if scene is None else scene[r.target]
            mask = None if res["mask"] is None else res["mask"].numpy()
            preds.append(mask)
            hits.append(named_object_hit(mask, scene, r.target))
            objects.append(0 if scene is None else len(scene))
            truths.append(truth)
            if ablate:
                bare.append(None if res["mask_without_points"] is None else res["mask_without_points"].numpy())
            if res["labels"] is not None:
                pos = res["points"][res["labels"] == 1].round().long().clamp(0, size - 1)  # (P, 2) x, y
                positives.append(len(pos))
                if len(pos):
                    inside.append(float(truth[pos[:, 1].numpy(), pos[:, 0].numpy()].mean()))
            if res["similarity"] is not None:
                auc = map_auc(res["similarity"].numpy(), truth, box)
                if auc is not None:
                    aucs.append(auc)
            kinds.append(r.kind)
            if len(cards) < args.sheet_examples:
                inter = 0 if mask is None else int((mask & truth).sum())
                union = int(truth.sum()) if mask is None else int((mask | truth).sum())
                cards.append({"image": overlay(source.image(r.index).resize((size * 3, size * 3)), mask, truth,
                                               res["points"], res["labels"], size),
                              "expression": r.expression, "answer": res["text"],
                              "iou": None if mask is None else (inter / union if union else 1.0)})
    scores = seg_scores(preds, truths, per_example=True)
    ious = scores.pop("ious")
    points = None if not positives else {  # does the similarity map point at the target? (READ only)
        "positives_per_expression": sum(positives) / len(positives),
        "positives_inside_target": sum(inside) / len(inside) if inside else None}
    examples = examples_digest(refs)
    result = {"model": str(model_dir), "sasp": parts["seg"].get("sasp") is not None, **scores,
              "by_kind": {k: seg_scores([p for p, kk in zip(preds, kinds, strict=True) if kk == k],
                                        [t for t, kk in zip(truths, kinds, strict=True) if kk == k])
                          for k in sorted(set(kinds))}}
    if args.sheet:
        sheet = Path(args.sheet)
        sheet = sheet.with_name(f"{sheet.stem}-{model_dir.parent.name}-{model_dir.name}{sheet.suffix}")
        write_sheet(sheet, f"{model_dir}: {args.source}/{args.split}", cards,
                    note=f"gIoU {100 * result['gIoU']:.1f}%, cIoU {100 * result['cIoU']:.1f}% over {result['examples']} "
                         "expressions; red: prediction, green outline: truth, rings: SAM points (white +, black -)")
        result["sheet"] = str(sheet)
    result["sasp_points"] = points
    result["grounding"] = grounding(hits, objects)
    result["similarity_auc"] = sum(aucs) / len(aucs) if aucs else None  # 0.5: the map does not mark the target
    result["similarity_auc_expressions"] = len(aucs)  # those answered with <SEG> (and a target that is not empty)
    if ablate:  # the same answers and <SEG> prompts decoded again without SasP's points: what do they add?
        from mmkit.eval.paired import paired_difference

        without = seg_scores(bare, truths, per_example=True)
        result["without_points"] = {"gIoU": without["gIoU"], "cIoU": without["cIoU"],
                                    "paired": paired_difference(without.pop("ious"), ious)}
    result["examples_sha"] = examples  # the expressions scored, so reports can be paired later
    result["ious"] = ious  # per expression, in order
    result["grounding_hits"] = hits  # per expression: 1 / 0 named object best, None: fewer than two objects
    return result


def paired_lines(results: list[dict]) -> list[dict]:
    """Each later result's per-expression IoU against the first's (they must have scored the same expressions)."""
    from mmkit.eval.paired import paired_difference, unpairable

    base = results[0]
    out = []
    for r in results[1:]:
        reason = unpairable(base, r, scores="ious", examples="examples_sha")
        if reason:
            raise ValueError(f"{r['model']} vs {base['model']}: {reason} (pair reports of the same --source, "
                             "--split, --size and --refs-per-image)")
        pair = {"baseline": base["model"], "model": r["model"], "gIoU": paired_difference(base["ious"], r["ious"])}
        if base.get("grounding_hits") is not None and r.get("grounding_hits") is not None:  # reports since 2026-12-01
            both = [(a, b) for a, b in zip(base["grounding_hits"], r["grounding_hits"], strict=True)
                    if a is not None and b is not None]
            if len(both) >= 2:
                pair["grounding"] = paired_difference([a for a, _ in both], [b for _, b in both])
        out.append(pair)
    return out


def print_report(results: list[dict]) -> None:
    """The table, per-model lines and (with several) the paired comparisons against the first; the pairs are also
    kept on the first result as ``paired_vs_first``."""
    print("| model | SasP | gIoU | cIoU | no mask | " + " | ".join(f"gIoU {k}" for k in results[0]["by_kind"]) + " |")
    print("|---|---|---|---|---|" + "---|" * len(results[0]["by_kind"]))
    for r in results:
        kinds = " | ".join(f"{100 * v['gIoU']:.1f}" for v in r["by_kind"].values())
        print(f"| {r['model']} | {'yes' if r['sasp'] else 'no'} | {100 * r['gIoU']:.1f} | {100 * r['cIoU']:.1f} | "
              f"{r['no_mask']} | {kinds} |")
        if r.get("sasp_points"):
            pts = r["sasp_points"]
            share = "-" if pts["positives_inside_target"] is None else f"{100 * pts['positives_inside_target']:.1f}%"
            print(f"  {r['model']}: {pts['positives_per_expression']:.1f} positive SasP points per expression, "
                  f"{share} of them inside the target")
        ground = r.get("grounding") or {}
        if ground.get("named_best") is not None:
            print(f"  {r['model']}: in scenes of two objects or more the mask overlaps the named object best for "
                  f"{100 * ground['named_best']:.1f}% of {ground['expressions']} expressions (one object at random: "
                  f"{100 * ground['chance']:.1f}%)")
        if r.get("similarity_auc") is not None:
            print(f"  {r['model']}: the <SEG> similarity map ranks target pixels first with AUC "
                  f"{r['similarity_auc']:.3f} (0.5: no better than chance; over "
                  f"{r.get('similarity_auc_expressions', '?')} answers with <SEG>)")
        if r.get("without_points"):
            from mmkit.eval.paired import format_paired

            bare = r["without_points"]
            print(f"  without its points: gIoU {100 * bare['gIoU']:.1f}, cIoU {100 * bare['cIoU']:.1f}; "
                  + format_paired("gIoU, with minus without points", bare["paired"]))
    if len(results) > 1:
        from mmkit.eval.paired import format_paired

        pairs = paired_lines(results)
        for pair in pairs:
            print(format_paired(f"gIoU, {pair['model']} minus {pair['baseline']}", pair["gIoU"]))
            if "grounding" in pair:
                print(format_paired(f"named object best, {pair['model']} minus {pair['baseline']}",
                                    pair["grounding"]))
        results[0]["paired_vs_first"] = pairs


def seed_pooled_lines(groups: list[list[dict]]) -> list[str]:
    """The paired comparisons repeated over training seeds (one list of reports per seed, the same recipes in
    the same order, the first the baseline) and pooled with each seed counting once
    (``mmkit.eval.paired.across_seeds``)."""
    from mmkit.eval.paired import across_seeds, distinct_per_seed, format_across_seeds

    distinct_per_seed(groups, lambda r: r["model"])
    per_seed = [paired_lines(g) for g in groups]  # per seed: one pair per later recipe
    lines = []
    for i in range(len(per_seed[0])):
        pairs = [seed[i] for seed in per_seed]
        name = " | ".join(f"{p['model']} minus {p['baseline']}" for p in pairs)
        lines.append(format_across_seeds(f"gIoU, {name}", across_seeds([p["gIoU"] for p in pairs])))
        if all("grounding" in p for p in pairs):
            lines.append(format_across_seeds("  named object best",
                                             across_seeds([p["grounding"] for p in pairs])))
    return lines


def main(argv=None) -> list[dict]:
    from mmkit.config import atomic_write_text

    parser = argparse.ArgumentParser(description="gIoU / cIoU of READ models on held-out referring expressions.")
    parser.add_argument("--models", nargs="+", type=Path, default=[], help="READ bundles (train.py's final/)")
    parser.add_argument("--compare", nargs="+", action="append", type=Path, default=[], metavar="JSON",
                        help="instead of evaluating: pair earlier reports of this script (the first is the "
                             "baseline); repeat the flag once per training seed, the same recipes in the same "
                             "order, to pool the comparison over seeds too")
    parser.add_argument("--source", default="shapesworld_refer")
    parser.add_argument("--split", default="test")
    parser.add_argument("--size", type=int, default=300, help="images")
    parser.add_argument("--refs-per-image", type=int, default=2)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="data.options entries")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--feature-cache", default="outputs/features")
    parser.add_argument("--sheet", default=None, help="write an HTML sheet of overlays (one per model)")
    parser.add_argument("--sheet-examples", type=int, default=24)
    parser.add_argument("--ablate-points", action="store_true",
                        help="READ models: also decode every expression without SasP's points (the <SEG> prompt alone) "
                             "and report what the points add, paired per expression")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if bool(args.models) == bool(args.compare):
        parser.error("give either --models (evaluate) or --compare (pair earlier JSON reports)")
    if args.compare:
        groups = [[r for path in paths for r in json.loads(path.read_text())] for paths in args.compare]
        pooled = seed_pooled_lines(groups) if len(groups) > 1 else []  # first: refuses groups that do not pair
        for results in groups:
            print_report(results)
        if pooled:
            print(f"pooled over {len(groups)} seeds (each --compare one seed; each seed counts once):")
            for line in pooled:
                print(line)
        results = [r for results in groups for r in results]
    else:
        results = [evaluate(m, args) for m in args.models]
        print_report(results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.json), json.dumps(results, indent=2, default=float) + "\n")
    return results


if __name__ == "__main__":
    sys.exit(run_guarded(lambda: main(), prog="eval.py"))
