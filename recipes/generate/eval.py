"""Evaluate the ShapesWorld text-to-image model and mmkit's patches on held-out (test split) prompts.

    python recipes/generate/eval.py --model assets/t2i/shapes --prompts 200 --json outputs/eval/t2i.json

1. the judge itself on real renders of test scenes (per-attribute accuracy against exact ground truth);
2. the model's prompt following (judge on generated images) for each variant: the base model and the
   same model under each patch flag (default ``--agent-sd`` and ``--tome``), all from the same per-image
   seeds, so the starting noise is identical;
3. the drop in points against the base model, and the PSNR of every patched image against the base
   image of the same seed (how far the patch moves the output; identical outputs count as inf and are
   reported separately);
4. each variant paired with the base on the same prompts and seeds (``mmkit.eval.paired``): the mean per-prompt
   difference in "all" and "objects", its standard error and a bootstrap 95% interval.

Attribute binding (CLP / WiCLP): ``--objects 2 --variants "--text-projection outputs/wiclp-shapes/final"
"--text-projection outputs/wiclp-shapes/final --switch-off 600"``; "objects" is then the share of prompts'
objects drawn with the right colour *and* shape; ``--objects 1`` measures the cost on single-object prompts.

Variants run interleaved batch by batch, so slow phases of a shared machine hit them alike; the
seconds per image are indicative only. Prints a markdown table and writes JSON. With ``--json``, every finished
batch is kept next to the report (``REPORT.partial.safetensors``) until the report is written: a stopped run
started again with the same settings resumes from there.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from mmkit.cli import run_guarded
from mmkit.data.images import image_grid
from mmkit.data.shapes import ShapesWorldConfig
from mmkit.diffusion import patch
from mmkit.diffusion.flags import add_patch_arguments, build_patches
from mmkit.diffusion.loading import load_pipeline
from mmkit.diffusion.pixel_pipeline import SAMPLERS, with_sampler
from mmkit.diffusion.t2i_data import held_out_prompts, t2i_world
from mmkit.eval.paired import format_paired, paired_difference
from mmkit.eval.report import PartialSamples, add_sampling_arguments, partial_path, run_report, weight_stamps
from mmkit.eval.shapes_judge import JudgeConfig, judge_accuracy, prompt_following, prompt_following_accuracy

METRICS = ("all", "objects", "colour", "shape", "count", "relation")
PAIRED_METRICS = ("all", "objects")  # per prompt: everything right; share of objects with colour and shape bound right


def world_of(model_folder: Path | None) -> ShapesWorldConfig:
    """The ShapesWorld config the model was trained on (``training.json``), else the default T2I world."""
    path = model_folder / "training.json" if model_folder is not None else None
    if path is not None and path.is_file():
        world = json.loads(path.read_text()).get("config", {}).get("data", {}).get("world")
        if world:
            return ShapesWorldConfig.from_dict(world)
    return t2i_world()


def variant_patches(flags: str, steps: int) -> list:
    """Patches for a variant given as command-line flags (``""`` = none, ``"--tome 0.3"``)."""
    parser = argparse.ArgumentParser(prog="variant", add_help=False)
    add_patch_arguments(parser)
    return build_patches(parser.parse_args(shlex.split(flags)), steps)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images (3, H, W) in [0, 1]; inf when identical."""
    mse = float((a.double() - b.double()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def evaluate(args: argparse.Namespace) -> dict:
    world = world_of(args.model) if args.model is not None else world_of(_default_model())
    judge_cfg = JudgeConfig.for_world(world)

    t0 = time.perf_counter()
    judge_scenes = [s for s, _ in held_out_prompts(args.judge_scenes, world)]
    judge_acc = judge_accuracy(judge_scenes, config=judge_cfg, size=world.image_size)
    judge_acc["seconds_per_image"] = round((time.perf_counter() - t0) / max(1, len(judge_scenes)), 4)

    pipe = load_pipeline(args.model)
    if args.sampler is not None:
        with_sampler(pipe, args.sampler)
    pipe.set_progress_bar_config(disable=True)
    if args.objects is not None:  # only prompts with this many objects (two: attribute binding; one: quality)
        world = ShapesWorldConfig.from_dict({**world.to_dict(), "min_objects": args.objects,
                                             "max_objects": args.objects})
    prompts = held_out_prompts(args.prompts, world)
    variants = {"base": ""} | {flags.strip(): flags for flags in args.variants}
    images: dict[str, list[torch.Tensor]] = {name: [] for name in variants}
    seconds = dict.fromkeys(variants, 0.0)
    from tqdm.auto import tqdm

    # what every image depends on: a stopped run with the same settings resumes from the batches it finished
    model_dir = Path(args.model or _default_model())
    files = [model_dir] + [Path(w) for flags in variants.values() for w in shlex.split(flags) if Path(w).exists()]
    saved = PartialSamples(partial_path(args.json), {
        "model": str(model_dir), "weights": weight_stamps(files),  # a model retrained in place samples anew
        "prompts": [c for _, c in prompts], "variants": variants,
        "steps": args.steps, "guidance": args.guidance, "seed": args.seed, "sampler": type(pipe.scheduler).__name__,
        "batch": args.batch})
    if saved.resumed:
        print(f"resuming: {saved.resumed} batch x variant results kept in {saved.path}")
    batches = range(0, len(prompts), args.batch)
    for start in tqdm(batches, desc=f"sampling {len(variants)} variants", unit="batch"):
        chunk = prompts[start:start + args.batch]
        for name, flags in variants.items():
            kept = saved.get(f"{start}:{name}")
            if kept is not None:
                images[name].extend(kept[0])
                seconds[name] += kept[1]
                continue
            generators = [torch.Generator().manual_seed(args.seed + start + i) for i in range(len(chunk))]
            patches = variant_patches(flags, args.steps)
            t = time.perf_counter()
            handle = patch(pipe, *patches) if patches else None
            try:
                out = pipe([c for _, c in chunk], num_inference_steps=args.steps, guidance_scale=args.guidance,
                           generator=generators, output_type="pt").images
            finally:
                if handle is not None:
                    handle.remove()
            elapsed = time.perf_counter() - t
            seconds[name] += elapsed
            images[name].extend(out)
            saved.put(f"{start}:{name}", out, elapsed)

    results: dict[str, dict] = {}
    per_prompt: dict[str, dict[str, list[float]]] = {}
    for name in variants:
        follows = [prompt_following(img, scene, judge_cfg) for img, (scene, _) in zip(images[name], prompts)]
        row = prompt_following_accuracy(follows)
        per_prompt[name] = {m: [float(f[m]) for f in follows] for m in PAIRED_METRICS}
        row["seconds_per_image"] = round(seconds[name] / len(prompts), 3)
        if name != "base":
            values = [psnr(a, b) for a, b in zip(images[name], images["base"])]
            finite = [v for v in values if math.isfinite(v)]
            row["psnr_vs_base_db"] = round(sum(finite) / len(finite), 2) if finite else math.inf
            row["identical_to_base"] = len(values) - len(finite)
            base = results["base"]
            row["drop_points"] = {m: _points(base[m], row[m]) for m in METRICS}
            # the same prompts and seeds in every variant: paired per-prompt differences against the base
            row["paired_vs_base"] = {m: paired_difference(per_prompt["base"][m], per_prompt[name][m])
                                     for m in PAIRED_METRICS}
        results[name] = row
        if args.grids is not None:
            args.grids.mkdir(parents=True, exist_ok=True)
            # a file name from the flags (adapter paths hold '/'): letters, digits, '-' and '_' only
            slug = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name.replace("--", "")).strip("_") or "base"
            image_grid(torch.stack(images[name][:64]), cols=8).save(args.grids / f"{slug}.png")
    saved.finish()  # the report is made (grids included); the kept samples go
    return {
        "model": str(model_dir),
        "prompts": len(prompts), "split": "test", "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
        "sampler": type(pipe.scheduler).__name__,
        "world": world.to_dict(),
        "judge_on_renders": judge_acc,
        "variants": results,
    }


def _points(base: float | None, value: float | None) -> float | None:
    if base is None or value is None:
        return None
    return round(100 * (base - value), 1)


def _default_model() -> Path:
    from mmkit.assets import DEFAULT_T2I_MODEL

    return DEFAULT_T2I_MODEL


def markdown(report: dict) -> str:
    j = report["judge_on_renders"]
    relation = "-" if j["relation"] is None else f"{j['relation']:.1%}"
    lines = [
        f"Judge on {j['scenes']} real test renders: colour {j['colour']:.1%}, shape {j['shape']:.1%}, "
        f"count {j['count']:.1%}, relation {relation} ({j['two_object_scenes']} two-object scenes), "
        f"all {j['all']:.1%}",
        "",
        f"{report['prompts']} test prompts, {report['steps']} {report['sampler']} steps, guidance {report['guidance']}, seeds "
        f"{report['seed']}..{report['seed'] + report['prompts'] - 1}:",
        "",
        "| variant | all | objects | colour | shape | count | relation | drop in 'all' (pts) | PSNR vs base (dB) | s/image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report["variants"].items():
        rel = "-" if row["relation"] is None else f"{row['relation']:.1%}"
        drop = "" if name == "base" else f"{row['drop_points']['all']:+.1f}"
        psnr_ = "" if name == "base" else f"{row['psnr_vs_base_db']}"
        lines.append(
            f"| {name} | {row['all']:.1%} | {row['objects']:.1%} | {row['colour']:.1%} | {row['shape']:.1%} | "
            f"{row['count']:.1%} | {rel} | {drop} | {psnr_} | {row['seconds_per_image']} |"
        )
    paired = [(name, row["paired_vs_base"]) for name, row in report["variants"].items() if "paired_vs_base" in row]
    if paired:
        lines += ["", "Paired with the base on the same prompts and seeds (variant minus base):"]
        lines += [f"- {format_paired(f'{name}, {m}', diff[m])}" for name, diff in paired for m in PAIRED_METRICS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="pipeline folder (default: assets/t2i/shapes)")
    parser.add_argument("--prompts", type=int, default=100, help="held-out prompts (test split), default 100")
    parser.add_argument("--objects", type=int, choices=(1, 2), default=None,
                        help="only prompts with this many objects (2: attribute binding of CLP / WiCLP; default: the "
                             "model's own mix)")
    parser.add_argument("--judge-scenes", type=int, default=1000, help="renders to check the judge on (default 1000)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help="replace the saved scheduler")
    parser.add_argument("--batch", type=int, default=16, help="prompts per pipeline call")
    parser.add_argument("--variants", nargs="*", default=["--agent-sd", "--tome"],
                        help="patch flags of each variant (as for mmkit generate); the base model always runs")
    add_sampling_arguments(parser)
    return run_report(parser.parse_args(argv), evaluate, markdown)


if __name__ == "__main__":
    sys.exit(run_guarded(lambda: main(), prog="eval.py"))
