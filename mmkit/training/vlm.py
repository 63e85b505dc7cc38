"""Train a vision->LLM connector under ``accelerate`` (the caption and VQA recipes call this).

Only the connector trains. Encoder features are cached once (``data.feature_cache``); the frozen LLM runs
forward and backward (for the gradient into its input embeddings) every step. Checkpoints hold only the
connector plus optimizer/scheduler state and are written atomically every ``save_every`` steps, at the
end, and on Ctrl-C / SIGTERM; ``resume=True`` continues from the newest one.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from ..config import StrictConfig, atomic_write_text
from ..models.vlm import CAPTION_PROMPT, VQA_PROMPT, VisionLanguageModel
from .checkpoint import GracefulStop, latest_checkpoint, load_training_state, save_checkpoint
from .config import TrainLoopConfig
from .features import cached_features
from .vlm_data import DataConfig, ExampleDataset, ImageSource, collate


@dataclass
class ModelConfig(StrictConfig):
    encoder: str = "timm:tf_efficientnet_lite0"
    token_grid: int | None = 3
    image_size: int | None = None
    llm: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    chat_template: bool = False
    connector: str = "vlap"
    connector_options: dict = field(default_factory=dict)
    caption_prompt: str = CAPTION_PROMPT
    vqa_prompt: str = VQA_PROMPT


@dataclass
class TrainConfig(TrainLoopConfig):
    output_dir: str = "outputs/caption-vlap"
    max_train_steps: int = 2000
    gradient_accumulation_steps: int = 1
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


def source_features(source: ImageSource, encoder, encoder_info: dict, cache_dir: str) -> torch.Tensor:
    """Encoder tokens (num_images, N, D) for every image of ``source``, cached on disk.

    ``encoder_info`` = {"spec": ..., "token_grid": ..., "image_size": ...} identifies the features.
    """
    signature = {"encoder": encoder_info, "data": source.signature()}
    digest = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{source.config.source}-{source.config.split}-{digest}.safetensors"
    return cached_features(path, encoder=encoder, ids=source.ids(), load=source.image, signature=signature)


def build_model(cfg: VLMTrainConfig, encoder, llm, caption_texts: list[str]) -> VisionLanguageModel:
    from ..connectors import build_connector
    from ..losses import word_frequency_prior

    connector = build_connector(
        cfg.model.connector, vision_dim=encoder.dim, llm_dim=llm.hidden_size, **cfg.model.connector_options
    )
    if getattr(connector.config, "prior", None) == "frequency":
        ids = [llm.caption_token_ids(t) for t in caption_texts]
        connector.set_prior(
            word_frequency_prior(ids, llm.vocab_size, temperature=connector.config.prior_temperature)
        )
    return VisionLanguageModel(
        encoder, connector, llm, caption_prompt=cfg.model.caption_prompt, vqa_prompt=cfg.model.vqa_prompt
    )


def train_vlm(cfg: VLMTrainConfig, *, resume: bool = False, command: str | None = None) -> Path:
    """Run training; returns the folder of the final connector (``output_dir/final``)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    tc = cfg.train
    accelerator = Accelerator(
        gradient_accumulation_steps=tc.gradient_accumulation_steps, mixed_precision=tc.mixed_precision
    )
    set_seed(tc.seed)
    out_dir = Path(tc.output_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")

    encoder, llm = load_components(cfg.model)
    source = ImageSource(cfg.data)
    examples = source.examples(caption_prompt=cfg.model.caption_prompt, vqa_prompt=cfg.model.vqa_prompt)
    if tc.cache_features:
        features = source_features(source, encoder, encoder_meta(cfg.model), cfg.data.feature_cache)
    else:
        features = None
    captions = [ex.target for ex in examples if ex.kind == "caption"] or [ex.align for ex in examples if ex.align]
    model = build_model(cfg, encoder, llm, captions)
    model.llm.to(accelerator.device)

    if features is not None:
        dataset = ExampleDataset(examples, features)
        collate_fn = collate
    else:  # uncached: encode the images of every batch (slow; for comparison and huge datasets)
        dataset = _UncachedExamples(examples, source)
        collate_fn = _UncachedCollate(encoder)
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(tc.seed))
    loader = DataLoader(dataset, batch_size=tc.batch_size, sampler=sampler, collate_fn=collate_fn, drop_last=True)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, tc.warmup_steps, tc.max_train_steps)
    model.connector, optimizer, loader, scheduler = accelerator.prepare(model.connector, optimizer, loader, scheduler)

    step = 0
    if resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None:
            accelerator.print(f"--resume: no checkpoint in {out_dir}; starting from scratch")
        else:
            from ..connectors import load_weights_into

            load_weights_into(accelerator.unwrap_model(model.connector), ckpt)
            step = load_training_state(ckpt, optimizer=optimizer, scheduler=scheduler)["step"]
            accelerator.print(f"resumed from {ckpt} at step {step}")

    llm_name = cfg.model.llm
    meta = {
        "encoder": encoder_meta(cfg.model),
        "training": {"command": command, "data": source.signature(), "steps": tc.max_train_steps},
    }

    def write_connector(folder: Path) -> None:
        unwrapped = accelerator.unwrap_model(model.connector)
        VisionLanguageModel(None, unwrapped, model.llm, caption_prompt=model.caption_prompt,
                            vqa_prompt=model.vqa_prompt).save_connector(folder, llm_name=llm_name, extra=meta)

    def checkpoint(at: int) -> None:
        if accelerator.is_main_process:
            save_checkpoint(out_dir, at, write_adapter=write_connector, optimizer=optimizer, scheduler=scheduler,
                            state={"seed": tc.seed}, keep=tc.keep_checkpoints)

    log_path = out_dir / "log.jsonl"
    steps_per_epoch = max(1, len(loader))
    progress = tqdm(total=tc.max_train_steps, initial=step, desc="training connector", unit="step",
                    disable=not accelerator.is_main_process)
    model.connector.train()
    started = time.perf_counter()
    with GracefulStop(lambda: checkpoint(step), accelerator.print, lambda: f"step {step} to {out_dir}") as stop:
        try:
            while step < tc.max_train_steps:
                epoch, offset = divmod(step, steps_per_epoch)
                sampler.generator.manual_seed(tc.seed + epoch)
                batches = accelerator.skip_first_batches(loader, offset) if offset else loader
                for batch in batches:
                    with accelerator.accumulate(model.connector):
                        out = model(batch["features"], batch["prompt"], batch["target"], alignment_texts=batch["align"])
                        accelerator.backward(out["loss"])
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad()
                    step += 1
                    progress.update(1)
                    if step % tc.log_every == 0 or step == tc.max_train_steps:
                        record = {"step": step, "lr": scheduler.get_last_lr()[0],
                                  "elapsed_s": round(time.perf_counter() - started, 1)}
                        record.update({k: round(float(v.detach()), 4) for k, v in out.items()})
                        progress.set_postfix(loss=record["loss"])
                        if accelerator.is_main_process:
                            with open(log_path, "a") as fh:
                                fh.write(json.dumps(record) + "\n")
                    if step % tc.save_every == 0:
                        checkpoint(step)
                    stop.check()
                    if step >= tc.max_train_steps:
                        break
        finally:
            progress.close()
    checkpoint(step)
    final = out_dir / "final"
    if accelerator.is_main_process:
        write_connector(final)
    accelerator.wait_for_everyone()
    return final


class _UncachedExamples(torch.utils.data.Dataset):
    def __init__(self, examples, source: ImageSource) -> None:
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
    import sys

    from .config import parse_recipe_args

    cfg, args = parse_recipe_args(
        VLMTrainConfig, default_config,
        description="Train a vision->LLM connector (run under `accelerate launch` for multi-GPU).",
        epilog="Extra arguments are dotted overrides, e.g. train.learning_rate=1e-4 model.connector=linear",
        argv=argv,
    )
    command = " ".join(["accelerate launch", *sys.argv]) if argv is None else " ".join(argv)
    final = train_vlm(cfg, resume=args.resume, command=command)
    print(f"connector saved to {final}")
    return final
