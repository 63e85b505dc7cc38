"""Adapters trained on a frozen text-to-image pipeline with the ordinary denoising loss, on the shared loop:

- ``text_projection``: CLP / WiCLP (:mod:`mmkit.diffusion.text_projection`) on compositional ShapesWorld
  prompts ("a small red circle to the left of a large blue star"); only the projector trains.
- ``concept``: NeTI (:class:`~mmkit.diffusion.neti.NeTIMapper`) or plain textual inversion on a few renders of
  a concept the base model never saw (by default a cross, a shape kept out of the T2I world), with textual
  inversion prompt templates; only the mapper / embedding trains.

Both load the pipeline folder (``model.pipeline``; the pixel-space ShapesWorld model or a Stable Diffusion
folder: a VAE, when there is one, encodes the images to latents), freeze every part of it, and take the
noise schedule and prediction type from the pipeline's own scheduler config. Noise and timesteps of step
``s`` come from a generator seeded by ``(seed, s)``, so resuming repeats nothing. ``final/`` is the adapter
folder (``adapter.json`` + ``adapter.safetensors``, the training config in its metadata).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import StrictConfig
from ..data.shapes import SPLIT_SEED_RANGES, ShapesWorldConfig, render_scene, sample_scene, t2i_world
from ..diffusion.t2i_data import ShapesT2IData, T2IDataConfig, image_to_tensor
from .loop import TrainingLoop, TrainingTask, TrainLoopConfig

PROJECTIONS = ("clp", "wiclp")
CONCEPTS = ("neti", "textual_inversion")
DEFAULT_PIPELINE = "asset:t2i/shapes"  # the shipped ShapesWorld model, from any working directory
# textual-inversion templates (Gal et al.'s object templates, the ones that read naturally for a flat render)
TEMPLATES = ("a {}", "a photo of a {}", "a rendering of a {}", "a picture of a {}", "a cropped photo of the {}",
             "the photo of a {}", "a {size} {}", "a photo of a {size} {}", "a rendering of the {size} {}",
             "a close-up photo of a {}", "a good photo of a {}", "a photo of one {}")


# ---------------------------------------------------------------------- configs
@dataclass
class FrozenPipelineConfig(StrictConfig):
    pipeline: str = DEFAULT_PIPELINE  # the frozen text-to-image pipeline folder


@dataclass
class ProjectionConfig(StrictConfig):
    kind: str = "wiclp"
    window: int = 5  # WiCLP's token window

    def __post_init__(self) -> None:
        if self.kind not in PROJECTIONS:
            raise ValueError(f"projection.kind must be one of {PROJECTIONS}, got {self.kind!r}")


def two_object_world() -> ShapesWorldConfig:
    """The T2I world with exactly two objects per scene: every caption binds two sets of attributes."""
    world = t2i_world()
    world.min_objects = world.max_objects = 2
    return world


def composition_data() -> T2IDataConfig:
    """Two-object train scenes with their canonical captions, never dropped (the projection only sees prompts)."""
    return T2IDataConfig(world=two_object_world(), caption_dropout=0.0)


@dataclass
class ProjectionTrainLoop(TrainLoopConfig):
    """The paper's optimisation: Adam 1e-5 (no weight decay), batch 8, gradient clipping 1.0, 20k steps."""

    output_dir: str = "outputs/wiclp-shapes"
    batch_size: int = 8
    learning_rate: float = 1e-5
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    max_train_steps: int = 20000
    max_grad_norm: float = 1.0
    save_every: int = 500


@dataclass
class ProjectionTrainConfig(StrictConfig):
    model: FrozenPipelineConfig = field(default_factory=FrozenPipelineConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    data: T2IDataConfig = field(default_factory=composition_data)
    train: ProjectionTrainLoop = field(default_factory=ProjectionTrainLoop)


def concept_world() -> ShapesWorldConfig:
    """Renders of the concept: one yellow cross per image (sizes and places vary), on the T2I world's canvas."""
    world = t2i_world()
    world.shapes, world.colours = ("cross",), ("yellow",)
    world.min_objects = world.max_objects = 1
    return world


@dataclass
class ConceptDataConfig(StrictConfig):
    """``num_images`` renders of ``world`` (train seeds from ``first_seed``), captioned with the templates."""

    world: ShapesWorldConfig = field(default_factory=concept_world)
    num_images: int = 5
    first_seed: int = 0
    templates: tuple[str, ...] = TEMPLATES

    def __post_init__(self) -> None:
        if isinstance(self.world, dict):
            self.world = ShapesWorldConfig.from_dict(self.world)
        self.templates = tuple(self.templates)
        if self.num_images < 1:
            raise ValueError(f"data.num_images must be >= 1, got {self.num_images}")
        bad = [t for t in self.templates if t.count("{}") != 1]
        if bad or not self.templates:
            raise ValueError(f"data.templates: every template needs exactly one '{{}}' (the concept token); got {bad}")


@dataclass
class ConceptModelConfig(StrictConfig):
    """The frozen pipeline and the concept adapter (``kind``: neti or textual_inversion), with NeTI's fields."""

    pipeline: str = DEFAULT_PIPELINE
    kind: str = "neti"
    placeholder: str = "<S*>"
    super_category: str = "shape"
    rescale: str = "output"
    output_bypass: bool = True
    nested_dropout: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in CONCEPTS:
            raise ValueError(f"model.kind must be one of {CONCEPTS}, got {self.kind!r}")


@dataclass
class ConceptTrainLoop(TrainLoopConfig):
    """NeTI's optimisation, 1000 steps: the official run is batch 2 x gradient accumulation 4 with lr 1e-3 scaled by
    that batch (``scale_lr``), i.e. an effective batch of 8 at 8e-3; here batch 8 in one step at 8e-3."""

    output_dir: str = "outputs/neti-cross"
    batch_size: int = 8
    learning_rate: float = 8e-3
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    max_train_steps: int = 1000
    save_every: int = 250


@dataclass
class ConceptTrainConfig(StrictConfig):
    model: ConceptModelConfig = field(default_factory=ConceptModelConfig)
    data: ConceptDataConfig = field(default_factory=ConceptDataConfig)
    train: ConceptTrainLoop = field(default_factory=ConceptTrainLoop)


# ---------------------------------------------------------------------- the shared frozen-pipeline task
class FrozenPipelineTask(TrainingTask):
    """Denoising loss through a frozen pipeline; the subclass conditions the UNet and owns :attr:`module`."""

    def __init__(self, cfg: StrictConfig, loop: TrainingLoop, pipeline: str) -> None:
        from diffusers import DDPMScheduler

        from ..diffusion.loading import load_pipeline

        self.cfg, self.loop, self.pipeline_name = cfg, loop, pipeline
        self.pipe = load_pipeline(pipeline)
        self.pipe.set_progress_bar_config(disable=True)
        for name in ("unet", "text_encoder", "vae"):
            part = getattr(self.pipe, name, None)
            if part is not None:
                part.requires_grad_(False).eval().to(loop.device)
        self.unet, self.tokenizer, self.text_encoder = self.pipe.unet, self.pipe.tokenizer, self.pipe.text_encoder
        self.vae = getattr(self.pipe, "vae", None)
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.uses_mask = hasattr(self.pipe, "encode_prompt") and "max_length" in self.pipe.config
        self.max_length = int(self.pipe.config["max_length"]) if self.uses_mask else self.tokenizer.model_max_length

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """prompts -> input_ids (B, L), attention mask (B, L) (None for pipelines that do not pass one)."""
        batch = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="pt")
        mask = batch["attention_mask"].to(self.loop.device) if self.uses_mask else None
        return batch["input_ids"].to(self.loop.device), mask

    def noised(self, images: torch.Tensor, index: int):
        """images (B, 3, H, W) in [-1, 1] -> (noisy input, timesteps (B,), target) for global batch ``index``."""
        from .t2i import noised_batch

        x0 = images.to(self.loop.device)
        if self.vae is not None:
            with torch.no_grad():
                x0 = self.vae.encode(x0).latent_dist.sample() * self.vae.config.scaling_factor
        return noised_batch(self.noise_scheduler, x0, self.cfg.train.seed, index, self.loop)

    def loss(self, noisy, timesteps, target, context, mask) -> torch.Tensor:
        kwargs = {"encoder_attention_mask": mask} if mask is not None else {}
        pred = self.unet(noisy, timesteps, encoder_hidden_states=context, **kwargs).sample
        return (pred.float() - target.float()).pow(2).mean()

    def save_checkpoint(self, folder: Path) -> dict:
        self.unwrapped().save_adapter(folder / "adapter")
        return {}

    def load_checkpoint(self, folder: Path, state: dict) -> None:
        from ..adapters import load_adapter_weights

        load_adapter_weights(self.unwrapped(), folder / "adapter")

    def save_final(self, folder: Path) -> None:
        training = {"command": self.loop.command, "steps": self.cfg.train.max_train_steps, "config": self.cfg.to_dict()}
        self.unwrapped().save_adapter(folder, metadata={"training": training, "pipeline": self.pipeline_name})


# ---------------------------------------------------------------------- CLP / WiCLP
class ProjectionTask(FrozenPipelineTask):
    """Only the text projection trains: projected text states -> frozen UNet -> denoising MSE."""

    def __init__(self, cfg: ProjectionTrainConfig, loop: TrainingLoop) -> None:
        from ..adapters import build_adapter
        from ..text_encoders import PromptEncoder

        super().__init__(cfg, loop, cfg.model.pipeline)
        dim = int(self.unet.config.cross_attention_dim)
        extra = {"window": cfg.projection.window} if cfg.projection.kind == "wiclp" else {}
        self.module = build_adapter(cfg.projection.kind, dim=dim, **extra).to(loop.device)
        # the states the pipeline itself conditions on: SD pipelines run CLIP without an attention mask
        self.prompts = PromptEncoder(self.text_encoder, self.tokenizer, self.max_length, cache=True,
                                     pass_mask=self.uses_mask)
        self.data = ShapesT2IData(cfg.data)

    def batches(self, start: int):
        bs, n, i = self.cfg.train.batch_size, self.loop.num_processes, self.loop.process_index
        while True:  # batch number `start` of this process = its slice of global batch `start`
            yield {**self.data.batch(start * bs * n + i * bs, bs), "index": start}
            start += 1

    def step(self, batch) -> dict[str, torch.Tensor]:
        states, mask = self.prompts(batch["prompts"])  # (B, L, d) frozen, cached
        context = self.module(states.to(self.loop.device))  # (B, L, d)
        noisy, t, target = self.noised(batch["pixel_values"], batch["index"])
        return {"loss": self.loss(noisy, t, target, context, mask.to(self.loop.device) if self.uses_mask else None)}


def train_projection(cfg: ProjectionTrainConfig, *, resume: bool = False, overwrite: bool = False,
                     command: str | None = None) -> Path:
    loop = TrainingLoop(cfg.train, run_config=cfg, resume=resume, overwrite=overwrite, command=command)
    return loop.run(ProjectionTask(cfg, loop))


# ---------------------------------------------------------------------- NeTI / textual inversion
def concept_images(data: ConceptDataConfig) -> tuple[torch.Tensor, list]:
    """The concept's training renders (N, 3, H, W) in [-1, 1] and their scenes."""
    first = SPLIT_SEED_RANGES["train"][0] + data.first_seed
    scenes = [sample_scene(first + k, data.world) for k in range(data.num_images)]
    return torch.stack([image_to_tensor(render_scene(s, data.world.image_size)) for s in scenes]), scenes


class ConceptTask(FrozenPipelineTask):
    """Only the concept adapter trains: per-(t, layer) contexts through :class:`NeTIPatch` -> frozen UNet -> MSE."""

    def __init__(self, cfg: ConceptTrainConfig, loop: TrainingLoop) -> None:
        from ..diffusion.neti import (
            NeTIConfig,
            NeTIMapper,
            NeTIPatch,
            TextualInversion,
            TextualInversionConfig,
            cross_attention_layers,
        )
        from ..diffusion.patch import patch

        super().__init__(cfg, loop, cfg.model.pipeline)
        m = cfg.model
        dim = int(self.unet.config.cross_attention_dim)
        base = self.tokenizer(m.super_category, add_special_tokens=False)["input_ids"]
        if len(base) != 1:
            raise ValueError(f"model.super_category {m.super_category!r} must be one token of the pipeline's tokenizer "
                             f"(it is {len(base)}); pick a one-word category")
        word = self.text_encoder.get_input_embeddings().weight[base[0]].detach().float()
        if m.kind == "neti":
            paths = cross_attention_layers(self.unet)
            self.module = NeTIMapper(NeTIConfig(
                token_dim=dim, num_layers=len(paths), layers=tuple(paths), placeholder=m.placeholder,
                super_category=m.super_category, norm_scale=float(word.norm()), rescale=m.rescale,
                output_bypass=m.output_bypass, nested_dropout=m.nested_dropout,
                num_train_timesteps=int(self.noise_scheduler.config.num_train_timesteps)))
        else:
            self.module = TextualInversion(TextualInversionConfig(token_dim=dim, placeholder=m.placeholder,
                                                                  super_category=m.super_category))
            with torch.no_grad():
                self.module.embedding.copy_(word)
        self.module.to(loop.device)
        self.neti = NeTIPatch(self.module, text_encoder=self.text_encoder, tokenizer=self.tokenizer, auto=False)
        self.handle = patch(self.unet, self.neti)  # kept for the task's life
        self.images, self.scenes = concept_images(cfg.data)

    def batches(self, start: int):
        bs, n, i = self.cfg.train.batch_size, self.loop.num_processes, self.loop.process_index
        data, placeholder = self.cfg.data, self.cfg.model.placeholder
        while True:
            rng = random.Random(f"{self.cfg.train.seed}/{start}")  # the global batch's draws, a function of the step
            picks = [(rng.randrange(data.num_images), rng.randrange(len(data.templates))) for _ in range(bs * n)]
            mine = picks[i * bs:(i + 1) * bs]
            prompts = []
            for image, template in mine:
                size = self.scenes[image].objects[0].size
                prompts.append(data.templates[template].replace("{size}", size).format(placeholder))
            yield {"pixel_values": self.images[[p for p, _ in mine]], "prompts": prompts, "index": start}
            start += 1

    def step(self, batch) -> dict[str, torch.Tensor]:
        ids, mask = self.tokenize(batch["prompts"])
        noisy, t, target = self.noised(batch["pixel_values"], batch["index"])
        # (B, L, d); per-layer contexts set for the UNet call, computed through the loop's (maybe DDP) module
        context = self.neti.condition(ids, mask, t, mapper=self.module)
        return {"loss": self.loss(noisy, t, target, context, mask)}


def train_concept(cfg: ConceptTrainConfig, *, resume: bool = False, overwrite: bool = False,
                  command: str | None = None) -> Path:
    loop = TrainingLoop(cfg.train, run_config=cfg, resume=resume, overwrite=overwrite, command=command)
    return loop.run(ConceptTask(cfg, loop))


__all__ = [
    "ConceptTask", "ConceptTrainConfig", "ProjectionTask", "ProjectionTrainConfig", "concept_images", "concept_world",
    "train_concept", "train_projection", "two_object_world",
]
