"""Evaluate learned concepts (NeTI / textual inversion, ``train_concept.py``) on a frozen text-to-image pipeline.

    python recipes/generate/eval_concept.py --adapters outputs/neti-cross/final outputs/ti-cross/final \\
        --truncations none 32 8 --images 16 --json outputs/eval/concept.json --grids outputs/eval/concept

For every adapter (and, for NeTI, every truncation index) it samples, from the same per-image seeds:

- **fidelity**: "a <S*>" should show the concept as trained (by default one yellow cross);
- **editability**: "a {colour} <S*>" for other colours should show the concept's shape in that colour.

A ShapesWorld judge extended with the concept's shape and colour reads the images back (its accuracy on real renders of
the concept in every colour is reported first). Rows: the share of images judged exactly right (one object,
the asked colour, the concept's shape), and colour / shape separately. The base model prompted with the words
("a yellow cross", a shape it never saw) is the floor. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from mmkit.adapters import load_adapter
from mmkit.assets import DEFAULT_T2I_MODEL
from mmkit.cli import run_guarded
from mmkit.data.images import image_grid
from mmkit.data.shapes import SPLIT_SEED_RANGES, ShapesWorldConfig, sample_scene
from mmkit.diffusion import patch
from mmkit.diffusion.loading import load_pipeline
from mmkit.diffusion.neti import NeTIPatch
from mmkit.eval.report import PartialSamples, add_sampling_arguments, partial_path, run_report, weight_stamps
from mmkit.eval.shapes_judge import JudgeConfig, judge_accuracy, prompt_following


def concept_of(metadata: dict) -> ShapesWorldConfig:
    """The concept's render world from the adapter's training metadata (the recipe's default otherwise)."""
    from mmkit.training.t2i_adapters import concept_world

    world = metadata.get("training", {}).get("config", {}).get("data", {}).get("world")
    return ShapesWorldConfig.from_dict(world) if world else concept_world()


def truncations_of(values: list[str]) -> list[int | None]:
    out = []
    for v in values:
        if v.lower() == "none":
            out.append(None)
        elif v.isdigit():
            out.append(int(v))
        else:
            raise ValueError(f"--truncations: {v!r} is neither 'none' nor a non-negative integer")
    return out


def score(images: torch.Tensor, colour: str, shape: str, judge_cfg: JudgeConfig) -> dict:
    rows = [prompt_following(img, f"a small {colour} {shape}", judge_cfg) for img in images]
    n = len(rows)
    return {"all": sum(r["all"] for r in rows) / n, "colour": sum(r["colour"] for r in rows) / n,
            "shape": sum(r["shape"] for r in rows) / n, "count": sum(r["count"] for r in rows) / n, "n": n}


def evaluate(args: argparse.Namespace) -> dict:
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    adapters = [(str(path), *load_adapter(path, family="diffusion_mapper")) for path in args.adapters]
    worlds = [concept_of(meta) for _, _, meta in adapters] or [concept_of({})]
    if any(w != worlds[0] for w in worlds):
        raise ValueError("--adapters were trained on different concepts (their training worlds differ); evaluate "
                         f"each concept on its own: {[path for path, _, _ in adapters]}")
    world = worlds[0]
    (shape,), (trained_colour,) = world.shapes[:1], world.colours[:1]
    # the base model's shapes and colours plus the concept's (a new shape such as the cross, or a new colour)
    base = JudgeConfig()
    judge_cfg = JudgeConfig.for_world(world, shapes=tuple(dict.fromkeys(base.shapes + (shape,))),
                                      colours=tuple(dict.fromkeys(base.colours + (trained_colour,))))
    colours = [c for c in args.colours if c != trained_colour]

    # the judge on real renders of the concept in every colour asked about
    renders = []
    first = SPLIT_SEED_RANGES["test"][0]
    for colour in [trained_colour, *colours]:
        w = ShapesWorldConfig.from_dict({**world.to_dict(), "colours": [colour]})
        renders += [sample_scene(first + i, w) for i in range(args.judge_scenes)]
    judge_acc = judge_accuracy(renders, config=judge_cfg, size=world.image_size)

    # every sampled prompt is kept next to the --json report until it is written: a stopped run resumes
    model_dir = Path(args.model) if args.model is not None else DEFAULT_T2I_MODEL
    saved = PartialSamples(partial_path(args.json), {
        "model": str(model_dir), "weights": weight_stamps([model_dir, *args.adapters]),
        "adapters": [str(a) for a in args.adapters], "truncations": args.truncations, "images": args.images,
        "steps": args.steps, "guidance": args.guidance, "seed": args.seed})

    def sample(variant: str, prompt: str, patches: list) -> torch.Tensor:
        kept = saved.get(f"{variant}|{prompt}")
        if kept is not None:
            return kept[0]
        generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.images)]
        with patch(pipe, *patches) if patches else contextlib.nullcontext():
            images = pipe([prompt], num_images_per_prompt=args.images, num_inference_steps=args.steps,
                          guidance_scale=args.guidance, generator=generators, output_type="pt").images
        saved.put(f"{variant}|{prompt}", images, 0.0)
        return images

    variants: dict[str, dict] = {}
    grids: dict[str, list] = {}

    from tqdm.auto import tqdm

    def run_variant(name: str, make_patches, token: str) -> None:
        row, tiles = {}, []
        for colour in tqdm([trained_colour, *colours], desc=name, unit="prompt", leave=False):
            prompt = f"a {token}" if colour == trained_colour and token != shape else f"a {colour} {token}"
            images = sample(name, prompt, make_patches())
            row[colour] = score(images, colour, shape, judge_cfg)
            tiles.append(images)
        edit = [row[c] for c in colours]
        variants[name] = {
            "fidelity": row[trained_colour],
            "editability": {k: sum(r[k] for r in edit) / len(edit) for k in ("all", "colour", "shape")} if edit else None,
            "per_colour": row,
        }
        grids[name] = tiles

    run_variant(f"base ('a {trained_colour} {shape}')", lambda: [], shape)
    for path, adapter, _ in adapters:
        token = adapter.config.placeholder
        for k in (truncations_of(args.truncations) if adapter.kind == "neti" else [None]):
            label = f"{adapter.kind} {Path(path).parent.name}" + (f" (truncation {k})" if k is not None else "")
            run_variant(label, lambda adapter=adapter, k=k: [NeTIPatch(adapter, truncation=k)], token)
    if args.grids is not None:
        args.grids.mkdir(parents=True, exist_ok=True)
        for name, tiles in grids.items():
            slug = "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")
            image_grid(torch.cat(tiles), cols=args.images).save(args.grids / f"{slug}.png")
    saved.finish()
    return {"model": str(model_dir), "concept": {"shape": shape, "colour": trained_colour},
            "edit_colours": colours, "images_per_prompt": args.images, "steps": args.steps, "guidance": args.guidance,
            "seed": args.seed, "judge_on_renders": judge_acc, "variants": variants}


def markdown(report: dict) -> str:
    j, c = report["judge_on_renders"], report["concept"]
    lines = [f"Judge on {j['scenes']} real renders of the {c['shape']} in {1 + len(report['edit_colours'])} colours: "
             f"colour {j['colour']:.1%}, shape {j['shape']:.1%}, all {j['all']:.1%}", "",
             f"{report['images_per_prompt']} images per prompt, {report['steps']} steps, guidance {report['guidance']}; "
             f"fidelity = 'a <S*>' judged a {c['colour']} {c['shape']}; editability = 'a {{colour}} <S*>' for "
             f"{', '.join(report['edit_colours'])}:", "",
             "| variant | fidelity (all) | fidelity shape | editability (all) | edit colour | edit shape |",
             "|---|---|---|---|---|---|"]
    for name, v in report["variants"].items():
        f, e = v["fidelity"], v["editability"] or {"all": 0, "colour": 0, "shape": 0}
        lines.append(f"| {name} | {f['all']:.1%} | {f['shape']:.1%} | {e['all']:.1%} | {e['colour']:.1%} | "
                     f"{e['shape']:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="pipeline folder (default: assets/t2i/shapes)")
    parser.add_argument("--adapters", nargs="*", type=Path, default=[], help="concept adapter folders (NeTI / TI)")
    parser.add_argument("--truncations", nargs="+", default=["none", "32", "8"],
                        help="NeTI truncation indices to try ('none' = all 128 dims)")
    parser.add_argument("--colours", nargs="+", default=["red", "green", "blue", "purple", "white"],
                        help="colours asked for in the editability prompts")
    parser.add_argument("--images", type=int, default=16, help="images per prompt (default 16)")
    parser.add_argument("--judge-scenes", type=int, default=100, help="real renders per colour to check the judge on")
    add_sampling_arguments(parser)
    return run_report(parser.parse_args(argv), evaluate, markdown)


if __name__ == "__main__":
    sys.exit(run_guarded(lambda: main(), prog="eval_concept.py"))
