"""``mmkit generate "prompt"``: text-to-image from the command line, with mmkit's patches as flags.

    mmkit generate "a small red circle to the left of a large blue star" --num-images 8 --out grid.png
    mmkit generate "a red star" --agent-sd --seed 3                  # AgentSD on the highest-resolution blocks
    mmkit generate "a red star" --tome 0.5 --model path/to/sd-folder  # a Stable Diffusion folder

Models: the shipped ShapesWorld model (``assets/t2i/shapes``, the default), any folder written by
``PixelTextToImagePipeline.save_pretrained`` or any diffusers ``StableDiffusionPipeline`` folder; the
class is read from ``model_index.json``'s ``_class_name``.

Patches are the rows of :data:`mmkit.diffusion.flags.PATCH_FLAGS`: a new patch is one more registered row,
not a new branch in this command.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

from ..assets import DEFAULT_T2I_MODEL
from ..diffusion.flags import add_patch_arguments, build_patches
from .base import Command, UserError, int_in, positive_int


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="+", help="one or more prompts (quote each)")
    parser.add_argument("--model", type=Path, default=None,
                        help=f"pipeline folder (default: the shipped ShapesWorld model, {DEFAULT_T2I_MODEL})")
    parser.add_argument("--seed", type=int_in(0, 2**62, "a seed"), default=0,
                        help="image i uses seed + i (default 0)")
    parser.add_argument("--steps", type=positive_int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: 3.0 for ShapesWorld, 7.5 for SD)")
    parser.add_argument("--num-images", "--batch", dest="num_images", type=positive_int, default=4,
                        help="images per prompt (default 4)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--sampler", choices=("ddim", "dpm", "ddpm"), default=None,
                        help="pixel pipelines only: replace the saved scheduler (ddim: DDIM with clipping; dpm: "
                             "DPM-Solver++ 2M with thresholding; ddpm: ancestral)")
    parser.add_argument("--out", type=Path, default=Path("grid.png"),
                        help="image grid file, .png/.jpg/.webp/... (default grid.png)")
    parser.add_argument("--cols", type=positive_int, default=None, help="grid columns (default: images per prompt)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_patch_arguments(parser)


def check_output_path(path: Path) -> None:
    """Refuse an output file PIL cannot write or a folder that cannot be made, before any sampling."""
    from PIL import Image

    Image.init()
    if path.suffix.lower() not in Image.registered_extensions():
        raise UserError(f"--out {path}: unknown image extension {path.suffix or '(none)'!r}; "
                        "use e.g. .png, .jpg or .webp")
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; give a file name such as {path / 'grid.png'}")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--out {path}: {parent} is a file, so the folder cannot be made")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data.images import image_grid
    from ..diffusion import patch
    from ..diffusion.loading import load_pipeline

    check_output_path(args.out)  # before minutes of sampling, not after
    pipe = load_pipeline(args.model)
    if args.sampler is not None:
        from ..diffusion.pixel_pipeline import with_sampler

        try:
            with_sampler(pipe, args.sampler)
        except TypeError as err:
            raise UserError(f"--sampler: {err}") from None
    if getattr(args, "no_progress", False):
        pipe.set_progress_bar_config(disable=True)
    pixel = type(pipe).__name__ == "PixelTextToImagePipeline"
    guidance = args.guidance if args.guidance is not None else (3.0 if pixel else 7.5)
    total = len(args.prompt) * args.num_images
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(total)]
    patches = build_patches(args, args.steps)
    for p in patches:
        p.check_prompts(list(args.prompt))
    kwargs = {"num_inference_steps": args.steps, "guidance_scale": guidance, "generator": generators,
              "num_images_per_prompt": args.num_images, "negative_prompt": args.negative_prompt}
    t0 = time.perf_counter()
    with patch(pipe, *patches) if patches else contextlib.nullcontext():  # two patches on one layer: ValueError
        images = pipe(list(args.prompt), **kwargs).images
    seconds = time.perf_counter() - t0
    grid = image_grid(images, cols=args.cols or args.num_images)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    names = ", ".join(p.describe() for p in patches) or "none"
    print(f"wrote {args.out} ({total} images, {args.steps} steps of {type(pipe.scheduler).__name__}, guidance "
          f"{guidance}, patches: {names}; "
          f"{seconds:.1f} s)")
    return 0


COMMANDS = (Command("generate", "text-to-image with a diffusers / ShapesWorld pipeline, mmkit patches by flag",
                    configure, run),)


def main(argv: list[str] | None = None) -> int:
    """``recipes/generate/sample.py``: the same command without the ``mmkit`` prefix."""
    from .base import run_guarded

    parser = argparse.ArgumentParser(prog="sample.py", description="Generate images; mmkit patches by flag.")
    configure(parser)
    return run_guarded(lambda: run(parser.parse_args(argv)), prog="sample.py")
