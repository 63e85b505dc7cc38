"""Load a text-to-image pipeline folder by what its ``model_index.json`` says it is."""

from __future__ import annotations

from pathlib import Path

from ..assets import DEFAULT_T2I_MODEL, resolve_asset

PIPELINE_CLASSES = ("PixelTextToImagePipeline", "StableDiffusionPipeline")


def load_pipeline(folder: str | Path | None = None):
    """The pipeline in ``folder`` (default: the shipped ShapesWorld model; ``"asset:t2i/shapes"`` names it
    portably), class from ``model_index.json``.

    Accepted: ``PixelTextToImagePipeline`` and ``StableDiffusionPipeline`` folders. Errors say which
    folder was given, what it holds and what is accepted.
    """
    from .pixel_pipeline import PixelTextToImagePipeline, read_model_index

    if folder is None:
        folder = DEFAULT_T2I_MODEL
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the default ShapesWorld model is not in {folder} yet; train it with "
                "recipes/generate/train.py and copy output_dir/final there, or pass --model FOLDER"
            )
    folder = Path(resolve_asset(str(folder)))
    index = read_model_index(folder)
    name = index["_class_name"]
    if name == "PixelTextToImagePipeline":
        return PixelTextToImagePipeline.from_pretrained(folder)
    if name == "StableDiffusionPipeline":
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                       requires_safety_checker=False)
    raise ValueError(f"{folder} holds a {name!r} pipeline; accepted: {list(PIPELINE_CLASSES)}")
