"""Evaluate trained vision->LLM connectors: captioning, VQA and image-text retrieval on held-out images.

    python recipes/caption/eval.py --connectors outputs/caption-vlap/final outputs/caption-linear/final

Captioning: CIDEr-D and BLEU-4 against all reference captions, plus (ShapesWorld) attribute accuracy:
the fraction of objects whose true colour *and* shape the generated caption states. VQA: VQAv2 accuracy
overall and per question kind. Retrieval: R@1/5 image->text and text->image over the canonical captions,
scored by cosine of the assignment codes (any connector) and by VLAP's assignment cross-entropy.

Reports keep each question's VQA score, so models scored on the same questions pair up: with several
connectors, or later with ``--compare A.json B.json``, each is compared with the first question by question
(``mmkit.eval.paired``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import atomic_write_text
from .captioning import bleu, cider_d
from .vqa import vqa_accuracy

TASKS = ("caption", "vqa", "retrieval")


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


@torch.no_grad()
def evaluate_connector(
    connector_dir: str | os.PathLike,
    data,
    *,
    tasks: Sequence[str] = TASKS,
    batch_size: int = 16,
    qa_per_image: int = 3,
    feature_cache: str | None = None,
    model=None,
) -> dict:
    """Metrics dict for one connector folder on the images of ``data`` (a ``DataConfig``)."""
    from ..data.features import source_features
    from ..data.sources import open_source
    from ..models.vlm import VisionLanguageModel

    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown eval tasks {sorted(unknown)}; accepted: {list(TASKS)}")
    if model is None:
        model = VisionLanguageModel.from_pretrained(connector_dir)
    meta = VisionLanguageModel.bundle_parts(connector_dir)
    source = open_source(data)
    features = source_features(source, model.encoder, meta["encoder"], feature_cache or data.feature_cache)
    n = features.shape[0]
    results: dict = {"connector": str(connector_dir), "kind": model.connector.kind, "num_images": n}
    samples: dict[int, dict] = defaultdict(dict)
    timings = {}

    if "caption" in tasks:
        t0 = time.perf_counter()
        preds = {}
        for a, b in tqdm(list(_batches(n, batch_size)), desc="captioning", leave=False):
            for i, text in zip(range(a, b), model.caption(features=features[a:b])):
                preds[i] = text
        refs = {i: source.references(i) for i in range(n)}
        corpus, _ = cider_d(preds, refs)
        results["caption"] = {"CIDEr": corpus, "BLEU-4": bleu(preds, refs, 4)}
        checks = [source.attribute_hits(i, preds[i]) for i in range(n)]
        if all(c is not None for c in checks):  # the source knows every object's colour and shape
            results["caption"]["attribute_accuracy"] = sum(h for h, _ in checks) / max(sum(t for _, t in checks), 1)
            results["caption"]["exact_match"] = sum(preds[i].strip() == source.caption(i) for i in range(n)) / n
        for i in range(min(n, 12)):
            samples[i].update({"caption": preds[i], "references": refs[i][:3]})
        timings["caption_s"] = time.perf_counter() - t0

    questions = [(i, q) for i in range(n) for q in source.questions(i, qa_per_image)] if "vqa" in tasks else []
    if questions:
        t0 = time.perf_counter()
        per_kind: dict[str, list[float]] = defaultdict(list)
        for a, b in tqdm(list(_batches(len(questions), batch_size * 2)), desc="answering", leave=False):
            chunk = questions[a:b]
            idx = torch.tensor([i for i, _ in chunk])
            answers = model.answer([q.question for _, q in chunk], features=features[idx])
            for (i, q), pred in zip(chunk, answers):
                score = vqa_accuracy(pred, q.answers)
                per_kind[q.kind].append(score)
                per_kind["overall"].append(score)
                if i < 12 and len(samples[i].get("qa", [])) < 3:
                    samples[i].setdefault("qa", []).append({"q": q.question, "pred": pred, "gold": q.answers[0]})
        results["vqa"] = {k: sum(v) / len(v) for k, v in sorted(per_kind.items())}
        results["vqa"]["num_questions"] = len(questions)
        # per question, in order, with a fingerprint of the questions: reports pair up later (mmkit.eval.paired)
        results["vqa_per_question"] = list(per_kind["overall"])
        results["vqa_question_kinds"] = [q.kind for _, q in questions]  # for paired differences per kind
        results["vqa_questions_sha"] = hashlib.sha256("\n".join(
            f"{i}\t{q.question}\t{q.answers[0]}" for i, q in questions).encode()).hexdigest()[:16]
        timings["vqa_s"] = time.perf_counter() - t0

    texts = [source.caption(i) for i in range(n)] if "retrieval" in tasks else []
    if texts and all(t is not None for t in texts):
        from .retrieval import recall_at_k

        t0 = time.perf_counter()
        owner = torch.arange(n)
        results["retrieval"] = {}
        methods = ["cosine"] + (["assignment"] if hasattr(model.connector, "assign") else [])
        for method in methods:
            if method == "assignment" and model.connector.prior_missing:
                print(f"{connector_dir}: no word-frequency prior saved with this connector (saved before priors "
                      "were stored), so retrieval through the assignments is skipped")
                continue
            sim = model.retrieval_similarity(features, texts, method=method, batch_size=batch_size)
            r = recall_at_k(sim, owner, ks=(1, 5))
            results["retrieval"][method] = {
                "i2t_R@1": r["image_to_text"]["R@1"], "i2t_R@5": r["image_to_text"]["R@5"],
                "t2i_R@1": r["text_to_image"]["R@1"], "t2i_R@5": r["text_to_image"]["R@5"],
            }
        timings["retrieval_s"] = time.perf_counter() - t0
    results["timings"] = timings
    results["samples"] = [dict(index=i, **s) for i, s in sorted(samples.items())]
    return results


def connector_label(path: str | Path) -> str:
    """How a connector folder is named in tables: ``run/final`` or ``run/step-000400``, else the folder's own name."""
    path = Path(path)
    if path.name == "final" or path.name.startswith("step-"):
        return f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    return path.name or str(path)


def table(results: Sequence[dict]) -> str:
    """A markdown table comparing connectors (one row each)."""
    head = ["connector", "CIDEr", "BLEU-4", "attribute acc", "VQA acc", "R@1 i2t (cos)", "R@1 t2i (cos)",
            "R@1 i2t (assign)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cap, vqa, ret = r.get("caption", {}), r.get("vqa", {}), r.get("retrieval", {})

        def fmt(x, scale=1.0):
            return "-" if x is None else f"{x * scale:.3f}" if scale == 1.0 else f"{x * scale:.1f}"

        rows.append("| " + " | ".join([
            f"{r['kind']} ({connector_label(r['connector'])})",
            fmt(cap.get("CIDEr")), fmt(cap.get("BLEU-4")), fmt(cap.get("attribute_accuracy"), 100),
            fmt(vqa.get("overall"), 100), fmt(ret.get("cosine", {}).get("i2t_R@1"), 100),
            fmt(ret.get("cosine", {}).get("t2i_R@1"), 100), fmt(ret.get("assignment", {}).get("i2t_R@1"), 100),
        ]) + " |")
    return "\n".join(rows)


def _paired_vqa(base: dict, other: dict) -> dict | str:
    """``other`` minus ``base`` per question: {"overall": paired result, kind: paired result or None when the
    kind has too few questions}, or the reason they cannot be paired."""
    from .paired import paired_difference, unpairable

    reason = unpairable(base, other, scores="vqa_per_question", examples="vqa_questions_sha")
    if reason:
        return reason
    out = {"overall": paired_difference(base["vqa_per_question"], other["vqa_per_question"])}
    kinds = base.get("vqa_question_kinds") or other.get("vqa_question_kinds")
    if kinds and len(set(kinds)) > 1:  # the same questions, so the same kinds, in order
        for kind in sorted(set(kinds)):
            pick = [j for j, k in enumerate(kinds) if k == kind]
            out[kind] = None if len(pick) < 2 else paired_difference(
                [base["vqa_per_question"][j] for j in pick], [other["vqa_per_question"][j] for j in pick])
    return out


def paired_vqa_lines(results: Sequence[dict]) -> list[str]:
    """VQA accuracy of each later model minus the first's, paired over the same questions (empty when fewer
    than two results carry per-question scores for the same questions)."""
    from .paired import format_paired

    scored = [r for r in results if "vqa_per_question" in r]
    if len(scored) < 2:
        return []
    base = scored[0]
    lines = []
    for r in scored[1:]:
        paired = _paired_vqa(base, r)
        if isinstance(paired, str):
            lines.append(f"{connector_label(r['connector'])} vs {connector_label(base['connector'])}: {paired}; "
                         "not paired")
            continue
        name = f"{connector_label(r['connector'])} minus {connector_label(base['connector'])}"
        for kind, diff in paired.items():
            if kind == "overall":
                lines.append(format_paired(f"VQA acc, {name}", diff))
            elif diff is None:
                lines.append(f"  {kind}: 1 question, too few to pair")
            else:
                lines.append("  " + format_paired(f"{kind}, {name}", diff))
    return lines


def seed_pooled_vqa_lines(groups: Sequence[Sequence[dict]]) -> list[str]:
    """The paired comparison of ``paired_vqa_lines`` repeated over training seeds and pooled: ``groups`` holds
    one list of reports per seed, the same recipes in the same order (the first is the baseline). Each later
    recipe's difference from the baseline is averaged over the seeds, each seed counting once
    (``mmkit.eval.paired.across_seeds``), overall and per question kind."""
    from .paired import across_seeds, distinct_per_seed, format_across_seeds

    if len(groups) < 2:
        return []
    distinct_per_seed(groups, lambda r: r["connector"])
    lines = []
    for i in range(1, len(groups[0])):
        per_seed = [_paired_vqa(g[0], g[i]) for g in groups]
        names = [f"{connector_label(g[i]['connector'])} minus {connector_label(g[0]['connector'])}" for g in groups]
        bad = [f"{n}: {p}" for n, p in zip(names, per_seed) if isinstance(p, str)]
        if bad:
            lines.append(f"not pooled over seeds ({'; '.join(bad)})")
            continue
        name = " | ".join(names)
        kinds = [k for k in per_seed[0] if all(k in p and p[k] is not None for p in per_seed)]
        for kind in kinds:
            pooled = across_seeds([p[kind] for p in per_seed])
            label = f"VQA acc, {name}" if kind == "overall" else f"  {kind}"
            lines.append(format_across_seeds(label, pooled))
    return lines


def eval_main(default_tasks: Sequence[str], argv: list[str] | None = None) -> list[dict]:
    """Command line shared by the caption and VQA eval recipes."""
    import argparse

    from ..config import parse_override
    from ..data.sources import SOURCES, DataConfig, parse_source_options, source_options

    parser = argparse.ArgumentParser(description="Evaluate trained models (bundle or connector folders) on held-out images.")
    parser.add_argument("--connectors", nargs="+", default=[], help="model folders (e.g. outputs/x/final)")
    parser.add_argument("--compare", nargs="+", action="append", default=[], metavar="JSON",
                        help="instead of evaluating: table and paired VQA comparison (against the first) of "
                             "earlier --json reports; repeat the flag once per training seed, the same recipes "
                             "in the same order each time, to pool the comparison over seeds too")
    parser.add_argument("--source", default="shapesworld", choices=SOURCES.names())
    parser.add_argument("--split", default="test", help="ShapesWorld split (held-out seeds: val or test)")
    parser.add_argument("--size", type=int, default=500, help="number of images")
    parser.add_argument("--tasks", nargs="+", default=list(default_tasks), choices=list(TASKS))
    parser.add_argument("--qa-per-image", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                        help="a source option (repeatable), e.g. --option captions=ann.json for --source coco")
    parser.add_argument("--feature-cache", default="outputs/features")
    shortcuts = parser.add_argument_group("shortcuts for common source options")
    for flag, key in _OPTION_FLAGS:
        shortcuts.add_argument(flag, dest=key, default=None, help=f"= --option {key}=...")
    parser.add_argument("--json", help="write all metrics (and sample outputs) to this file")
    args = parser.parse_args(argv)
    if bool(args.connectors) == bool(args.compare):
        parser.error("give either --connectors (evaluate) or --compare (earlier JSON reports)")
    if args.compare:
        groups = [[r for path in paths for r in json.loads(Path(path).read_text())] for paths in args.compare]
        pooled = seed_pooled_vqa_lines(groups)  # first: refuses groups that do not pair before printing any
        for reports in groups:
            print(table(reports))
            for line in paired_vqa_lines(reports):
                print(line)
        if pooled:
            print(f"pooled over {len(groups)} seeds (each --compare one seed; each seed counts once):")
            for line in pooled:
                print(line)
        return [r for reports in groups for r in reports]
    accepted = source_options(args.source)
    options = {key: parse_override(f"x={getattr(args, key)}")[1] for _, key in _OPTION_FLAGS
               if getattr(args, key) is not None and key in accepted}
    options.update(parse_source_options(args.options, args.source))
    data = DataConfig(source=args.source, split=args.split, size=args.size, options=options,
                      feature_cache=args.feature_cache)
    all_results = []
    for folder in args.connectors:
        res = evaluate_connector(folder, data, tasks=args.tasks, batch_size=args.batch_size,
                                 qa_per_image=args.qa_per_image)
        all_results.append(res)
        per_item = ("samples", "vqa_per_question", "vqa_question_kinds")  # long lists: in the --json report only
        print(json.dumps({k: v for k, v in res.items() if k not in per_item}, indent=2))
    if args.json:  # first: nothing after this can lose the evaluation
        atomic_write_text(args.json, json.dumps(all_results, indent=2) + "\n")
    print(table(all_results))
    for line in paired_vqa_lines(all_results):
        print(line)
    if args.json:
        print(f"wrote {args.json}")
    return all_results


# (flag, option name): flags kept from earlier versions; each sets the option of the same meaning when the
# chosen source has it.
_OPTION_FLAGS = (
    ("--render-size", "render_size"), ("--max-objects", "max_objects"), ("--coco-captions", "captions"),
    ("--coco-images", "images"), ("--vqa-questions", "questions"), ("--vqa-annotations", "annotations"),
    ("--vqa-images", "images"),
)
