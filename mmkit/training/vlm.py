"""Train a vision->LLM connector on the shared loop (the caption and VQA recipes call this).

Only the connector trains. Encoder features are cached once (``data.feature_cache``); the frozen LLM runs
forward and backward (for the gradient into its input embeddings) every step. Checkpoints hold only the
connector (plus the optimizer / scheduler state the loop adds); see :mod:`mmkit.training.loop`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from ..config import StrictConfig
from ..data.features import source_features
from ..data.sources import DataConfig, DataSource, open_source
from ..models.vlm import CAPTION_PROMPT, VQA_PROMPT, VisionLanguageModel
from .loop import TrainingLoop, TrainingTask, TrainLoopConfig, recipe_command
from .vlm_data import ExampleDataset, collate


@dataclass
class ModelConfig(StrictConfig):
    encoder: str = "timm:tf_efficientnet_lite0"
    token_grid: int | None = 3
    image_size: int | None = None
    llm: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    chat_template: bool = False
    connector: str = "vlap"
    connector_options: dict = field(default_factory=dict)
    connector_init: str | None = None  # pretrained weights to start from (qformer: a BLIP-2 / InstructBLIP checkpoint)
    caption_prompt: str = CAPTION_PROMPT
    vqa_prompt: str = VQA_PROMPT


@dataclass
class TrainConfig(TrainLoopConfig):
    output_dir: str = "outputs/caption-vlap"
    max_train_steps: int = 2000
    cache_features: bool = True


@dataclass
class VLMTrainConfig(StrictConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def encoder_kwargs(model_cfg: ModelConfig) -> dict:
    return {"token_grid": model_cfg.token_grid, "image_size": model_cfg.image_size}


def encoder_meta(model_cfg: ModelConfig) -> dict:
    """What ``load_encoder`` needs to rebuild the encoder: stored in the connector's metadata."""
    return {"spec": model_cfg.encoder, **encoder_kwargs(model_cfg)}


def load_components(model_cfg: ModelConfig, *, with_encoder: bool = True):
    """(encoder or None, FrozenLM) named by the config."""
    from ..encoders import load_encoder
    from ..llm import FrozenLM

    encoder = load_encoder(model_cfg.encoder, **encoder_kwargs(model_cfg)) if with_encoder else None
    llm = FrozenLM.from_pretrained(model_cfg.llm, chat_template=model_cfg.chat_template)
    return encoder, llm


def build_model(cfg: VLMTrainConfig, encoder, llm, caption_texts: list[str]) -> VisionLanguageModel:
    """The model of ``cfg`` around a fresh connector, prepared on the training captions (VLAP's prior)."""
    from ..connectors import build_connector

    connector = build_connector(
        cfg.model.connector, vision_dim=encoder.dim, llm_dim=llm.hidden_size, **cfg.model.connector_options
    )
    if cfg.model.connector_init:
        fresh = connector.init_from_checkpoint(cfg.model.connector_init)
        print(f"connector initialised from {cfg.model.connector_init} (kept as initialised: {', '.join(fresh)})")
    connector.prepare(llm=llm, texts=caption_texts)
    return VisionLanguageModel(
        encoder, connector, llm, caption_prompt=cfg.model.caption_prompt, vqa_prompt=cfg.model.vqa_prompt
    )


class VLMTask(TrainingTask):
    """Train the connector of a :class:`VisionLanguageModel` (frozen encoder and LLM) on captions / QA.

    Batches follow a ``RandomSampler`` reseeded with ``seed + epoch`` at each epoch, so a resumed run sees
    exactly the batches an unbroken one would. Checkpoints and ``final/`` hold the connector folder.
    """

    def __init__(self, cfg: VLMTrainConfig, loop: TrainingLoop) -> None:
        tc = cfg.train
        self.cfg, self.loop = cfg, loop
        encoder, llm = load_components(cfg.model)
        source = open_source(cfg.data)
        examples = source.examples(caption_prompt=cfg.model.caption_prompt, vqa_prompt=cfg.model.vqa_prompt)
        if len(examples) < tc.batch_size:
            raise ValueError(f"train.batch_size {tc.batch_size} is larger than the {len(examples)} training examples "
                             f"of {cfg.data.source}/{cfg.data.split}; lower train.batch_size or raise data.size")
        features = source_features(source, encoder, encoder_meta(cfg.model), cfg.data.feature_cache) \
            if tc.cache_features else None
        captions = [ex.target for ex in examples if ex.kind == "caption"] or [ex.align for ex in examples if ex.align]
        self.model = build_model(cfg, encoder, llm, captions)
        self.model.llm.to(loop.device)
        if features is not None:
            dataset, collate_fn = ExampleDataset(examples, features), collate
        else:  # uncached: encode the images of every batch (slow; for comparison and huge datasets)
            dataset, collate_fn = _UncachedExamples(examples, source), _UncachedCollate(encoder)
        self.sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(tc.seed))
        loader = DataLoader(dataset, batch_size=tc.batch_size, sampler=self.sampler, collate_fn=collate_fn,
                            drop_last=True)
        self.loader = loop.accelerator.prepare(loader)
        self.meta = {
            "encoder": encoder_meta(cfg.model),
            "training": {"command": loop.command, "data": source.signature(), "steps": tc.max_train_steps},
        }

    @property
    def module(self) -> nn.Module:
        return self.model.connector

    @module.setter
    def module(self, prepared: nn.Module) -> None:  # the loop hands back the accelerate-wrapped connector
        self.model.connector = prepared

    def batches(self, start: int):
        per_epoch = len(self.loader)
        if per_epoch == 0:
            raise ValueError("the training data holds no complete batch; lower train.batch_size")
        while True:
            epoch, offset = divmod(start, per_epoch)
            self.sampler.generator.manual_seed(self.cfg.train.seed + epoch)
            epoch_batches = self.loop.accelerator.skip_first_batches(self.loader, offset) if offset else self.loader
            for batch in epoch_batches:
                yield batch
                start += 1

    def step(self, batch) -> dict[str, torch.Tensor]:
        return self.model(batch["features"], batch["prompt"], batch["target"], alignment_texts=batch["align"])

    def _write_bundle(self, folder: Path) -> None:
        model = VisionLanguageModel(None, self.unwrapped(), self.model.llm, caption_prompt=self.model.caption_prompt,
                                    vqa_prompt=self.model.vqa_prompt)
        model.save_pretrained(folder, llm_name=self.cfg.model.llm, encoder=self.meta["encoder"],
                              metadata={"training": self.meta["training"]})

    def save_checkpoint(self, folder: Path) -> dict:
        self._write_bundle(folder)
        return {}

    def load_checkpoint(self, folder: Path, state: dict) -> None:
        from ..connectors import load_weights_into
        from ..models.bundle import read_bundle

        load_weights_into(self.unwrapped(), read_bundle(folder)["adapters"]["connector"])

    def save_final(self, folder: Path) -> None:
        self._write_bundle(folder)


def train_vlm(cfg: VLMTrainConfig, *, resume: bool = False, overwrite: bool = False, command: str | None = None) -> Path:
    """Run training; returns the folder of the final connector (``output_dir/final``)."""
    from ..connectors.base import check_connector_init, check_connector_options

    check_connector_options(cfg.model.connector, cfg.model.connector_options)  # before minutes of feature caching
    if cfg.model.connector_init:
        check_connector_init(cfg.model.connector, cfg.model.connector_init)
    loop = TrainingLoop(cfg.train, run_config=cfg, resume=resume, overwrite=overwrite, command=command)
    return loop.run(VLMTask(cfg, loop))


class _UncachedExamples(torch.utils.data.Dataset):
    def __init__(self, examples, source: DataSource) -> None:
        self.examples, self.source = examples, source

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, j: int) -> dict:
        ex = self.examples[j]
        return {"image": self.source.image(ex.index), "prompt": ex.prompt, "target": ex.target, "align": ex.align}


class _UncachedCollate:
    def __init__(self, encoder) -> None:
        self.encoder = encoder

    def __call__(self, items: list[dict]) -> dict:
        return {
            "features": self.encoder.encode([it["image"] for it in items]).tokens,
            "prompt": [it["prompt"] for it in items],
            "target": [it["target"] for it in items],
            "align": [it["align"] for it in items],
        }



def recipe_main(default_config: str, argv: list[str] | None = None) -> Path:
    """Command line shared by the caption and VQA recipes (each passes its default yaml)."""
    from .config import parse_recipe_args

    cfg, args = parse_recipe_args(
        VLMTrainConfig, default_config,
        description="Train a vision->LLM connector (run under `accelerate launch` for multi-GPU).",
        epilog="Extra arguments are dotted overrides, e.g. train.learning_rate=1e-4 model.connector=linear",
        argv=argv,
    )
    final = train_vlm(cfg, resume=args.resume, overwrite=args.overwrite, command=recipe_command(argv, "train.py"))
    print(f"connector saved to {final}")
    return final
