"""``mmkit generate "prompt"``: text-to-image from the command line, with mmkit's patches as flags.

    mmkit generate "a small red circle to the left of a large blue star" --num-images 8 --out grid.png
    mmkit generate "a red star" --agent-sd --seed 3                  # AgentSD on the highest-resolution blocks
    mmkit generate "a red star" --tome 0.5 --model path/to/sd-folder  # a Stable Diffusion folder

Models: the shipped ShapesWorld model (``assets/t2i/shapes``, the default), any folder written by
``PixelTextToImagePipeline.save_pretrained`` or any diffusers ``StableDiffusionPipeline`` folder; the
class is read from ``model_index.json``'s ``_class_name``.

Patches are rows of :data:`PATCH_FLAGS`: each row declares its flag, its options and how it builds its
:class:`~mmkit.diffusion.patch.Patch` from the parsed arguments. A new patch (``--neti``,
``--text-projection``) is one more row, not a new branch in the command.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cli import command
from .data.images import image_grid

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "t2i" / "shapes"
PIPELINE_CLASSES = ("PixelTextToImagePipeline", "StableDiffusionPipeline")


# ---------------------------------------------------------------------- patches as flags
@dataclass(frozen=True)
class Option:
    """One extra command-line option of a patch flag (argparse ``add_argument`` arguments)."""

    flag: str
    type: Callable[[str], Any]
    default: Any
    help: str


@dataclass(frozen=True)
class PatchFlag:
    """A patch switched on by ``flag``. ``build(args, steps)`` returns the Patch; ``dest`` is the
    argparse attribute that is set when the flag was given. ``nargs="?"`` flags take an optional
    value of ``type`` (``const`` when the flag is given bare)."""

    flag: str
    help: str
    build: Callable[[argparse.Namespace, int], Any]
    options: tuple[Option, ...] = ()
    nargs: str | None = None
    type: Callable[[str], Any] = float
    const: Any = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def _build_agent_sd(args: argparse.Namespace, steps: int):
    from .diffusion import AgentSD, AgentSDConfig, published_schedule

    # The published schedule is for 50 steps (agents for steps 0-19, i.e. the noisiest 40%); for
    # other step counts the switch moves to the same fraction of the run.
    schedule = published_schedule()
    if steps != 50:
        schedule = (schedule[0], schedule[1].replace(start_step=max(1, round(schedule[1].start_step * steps / 50))))
    config = AgentSDConfig(schedule=schedule, max_downsample=args.max_downsample, seed=args.seed)
    return AgentSD(config, ratio=args.agent_sd_ratio)


def _build_tome(args: argparse.Namespace, steps: int):
    from .diffusion import ToMe, ToMeConfig

    return ToMe(ToMeConfig(ratio=args.tome, max_downsample=args.max_downsample, seed=args.seed))


SHARED_OPTIONS: tuple[Option, ...] = (
    Option("--max-downsample", int, 1,
           "merging patches (AgentSD, ToMe) act on blocks downsampled at most this much (1 = highest resolution)"),
)

PATCH_FLAGS: list[PatchFlag] = [
    PatchFlag("--agent-sd", "AgentSD: agent attention on ToMe-merged tokens (published schedule)", _build_agent_sd,
              options=(Option("--agent-sd-ratio", float, 0.4, "AgentSD's ToMe merge ratio (default 0.4)"),)),
    PatchFlag("--tome", "ToMe token merging with this ratio (bare flag: 0.5)", _build_tome,
              nargs="?", const=0.5, metavar="RATIO"),
]
"""The patch flags of ``mmkit generate`` / ``recipes/generate/sample.py``; append rows to add patches."""


def add_patch_arguments(parser: argparse.ArgumentParser, table: Sequence[PatchFlag] = PATCH_FLAGS) -> None:
    group = parser.add_argument_group("mmkit patches (reversible; applied only while sampling)")
    for row in table:
        if row.nargs is None:
            group.add_argument(row.flag, action="store_true", help=row.help)
        else:
            group.add_argument(row.flag, nargs=row.nargs, const=row.const, default=None, type=row.type,
                               metavar=row.metavar, help=row.help)
        for opt in row.options:
            group.add_argument(opt.flag, type=opt.type, default=opt.default, help=opt.help)
    for opt in SHARED_OPTIONS:
        group.add_argument(opt.flag, type=opt.type, default=opt.default, help=opt.help)


def build_patches(args: argparse.Namespace, steps: int, table: Sequence[PatchFlag] = PATCH_FLAGS) -> list:
    """The patches whose flags are set in ``args``, in table order."""
    chosen = []
    for row in table:
        value = getattr(args, row.dest, None)
        if value is not None and value is not False:
            chosen.append(row.build(args, steps))
    return chosen


# ---------------------------------------------------------------------- loading
def load_pipeline(folder: str | Path | None = None):
    """The pipeline in ``folder`` (default: the shipped ShapesWorld model), class from ``model_index.json``.

    Accepted: ``PixelTextToImagePipeline`` and ``StableDiffusionPipeline`` folders. Errors say which
    folder was given, what it holds and what is accepted.
    """
    from .diffusion.pixel_pipeline import PixelTextToImagePipeline, read_model_index

    if folder is None:
        folder = DEFAULT_MODEL
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the default ShapesWorld model is not in {folder} yet; train it with "
                "recipes/generate/train.py and copy output_dir/final there, or pass --model FOLDER"
            )
    folder = Path(folder)
    index = read_model_index(folder)
    name = index["_class_name"]
    if name == "PixelTextToImagePipeline":
        return PixelTextToImagePipeline.from_pretrained(folder)
    if name == "StableDiffusionPipeline":
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                       requires_safety_checker=False)
    raise ValueError(f"{folder} holds a {name!r} pipeline; accepted: {list(PIPELINE_CLASSES)}")


# ---------------------------------------------------------------------- the command
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="+", help="one or more prompts (quote each)")
    parser.add_argument("--model", type=Path, default=None,
                        help=f"pipeline folder (default: the shipped ShapesWorld model, {DEFAULT_MODEL})")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: 3.0 for ShapesWorld, 7.5 for SD)")
    parser.add_argument("--num-images", "--batch", dest="num_images", type=int, default=4,
                        help="images per prompt (default 4)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--sampler", choices=("ddim", "dpm", "ddpm"), default=None,
                        help="pixel pipelines only: replace the saved scheduler (ddim: DDIM with clipping; dpm: "
                             "DPM-Solver++ 2M with thresholding; ddpm: ancestral)")
    parser.add_argument("--out", type=Path, default=Path("grid.png"), help="image grid PNG (default grid.png)")
    parser.add_argument("--cols", type=int, default=None, help="grid columns (default: images per prompt)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_patch_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from .diffusion import patch

    if args.steps < 1 or args.num_images < 1:
        raise SystemExit(f"mmkit generate: --steps and --num-images must be >= 1, got {args.steps}, {args.num_images}")
    try:
        pipe = load_pipeline(args.model)
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        raise SystemExit(f"mmkit generate: {err}") from None
    if args.sampler is not None:
        from .diffusion.pixel_pipeline import with_sampler

        try:
            with_sampler(pipe, args.sampler)
        except TypeError as err:
            raise SystemExit(f"mmkit generate: --sampler: {err}") from None
    if getattr(args, "no_progress", False):
        pipe.set_progress_bar_config(disable=True)
    pixel = type(pipe).__name__ == "PixelTextToImagePipeline"
    guidance = args.guidance if args.guidance is not None else (3.0 if pixel else 7.5)
    total = len(args.prompt) * args.num_images
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(total)]
    patches = build_patches(args, args.steps)
    kwargs = {"num_inference_steps": args.steps, "guidance_scale": guidance, "generator": generators,
              "num_images_per_prompt": args.num_images, "negative_prompt": args.negative_prompt}
    t0 = time.perf_counter()
    try:
        with patch(pipe, *patches) if patches else contextlib.nullcontext():
            images = pipe(list(args.prompt), **kwargs).images
    except ValueError as err:  # e.g. two patches claiming the same layers
        raise SystemExit(f"mmkit generate: {err}") from None
    seconds = time.perf_counter() - t0
    grid = image_grid(images, cols=args.cols or args.num_images)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    names = ", ".join(p.describe() for p in patches) or "none"
    print(f"wrote {args.out} ({total} images, {args.steps} steps of {type(pipe.scheduler).__name__}, guidance "
          f"{guidance}, patches: {names}; "
          f"{seconds:.1f} s)")
    return 0


@command("generate", "text-to-image with a diffusers / ShapesWorld pipeline, mmkit patches by flag", configure)
def _generate(args: argparse.Namespace) -> int:
    return run(args)


def main(argv: list[str] | None = None) -> int:
    """``recipes/generate/sample.py``: the same command without the ``mmkit`` prefix."""
    parser = argparse.ArgumentParser(prog="sample.py", description="Generate images; mmkit patches by flag.")
    configure(parser)
    return run(parser.parse_args(argv))


__all__ = [
    "DEFAULT_MODEL",
    "PATCH_FLAGS",
    "Option",
    "PatchFlag",
    "add_patch_arguments",
    "build_patches",
    "image_grid",
    "load_pipeline",
    "main",
    "run",
]
