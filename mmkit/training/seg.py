"""Train READ (or its ``<SEG>``-only baseline) on a referring-segmentation source, on the shared loop.

What trains: the connector, the ``<SEG>`` row and LoRA of the LLM, the ``<SEG>`` head and SAM's mask decoder.
Frozen and cached once: the image encoder's tokens (``data.feature_cache``) and SAM's image embeddings (same
folder, keyed by the SAM checkpoint). One example is (image, expression, the named object's mask); the prompt
and answer templates hold ``{expression}`` and ``<SEG>``. Checkpoints and ``final/`` are READ bundles
(:meth:`~mmkit.heads.seg.ReadModel.save_pretrained`).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..assets import DEFAULT_SAM, resolve_asset
from ..config import StrictConfig
from ..data.features import cached_features, source_features
from ..data.sources import DataConfig, Referral, ReferringSource, open_source
from ..heads.sam_prompt import load_sam, resolve_sam
from ..heads.seg import ReadModel, SegConfig, view_boxes
from .loop import TrainingLoop, TrainingTask, TrainLoopConfig
from .vlm import ModelConfig, encoder_meta, load_components

SEG_PROMPT = "<image> Please segment {expression}."
SEG_ANSWER = "It is <SEG>."


@dataclass
class SegModelConfig(ModelConfig):
    """The VLM's fields (encoder, grid, LLM, connector) plus SAM and READ's own; a 7 x 7 image-token grid by
    default (READ's points need a grid finer than the captioning demo's 3 x 3)."""

    token_grid: int | None = 7
    connector: str = "linear"
    sam: str = DEFAULT_SAM  # a SamModel folder, hub id or "asset:" name; recipes/segment/pretrain_sam.py makes one
    seg: SegConfig = field(default_factory=SegConfig)
    seg_prompt: str = SEG_PROMPT
    seg_answer: str = SEG_ANSWER
    # A READ bundle (folder or "asset:" name) whose trained parts (connector, LoRA and <SEG> row, head, mask
    # decoder) start this run, with a fresh optimiser: READ's official code starts from a trained <SEG>-only
    # model (SESAME) and turns SasP on. Its encoder, LLM and SAM must be this run's (see init_bundle).
    init_from: str | None = None

    def __post_init__(self) -> None:
        if "{expression}" not in self.seg_prompt or "<image>" not in self.seg_prompt:
            raise ValueError(f"model.seg_prompt must hold '<image>' and '{{expression}}', got {self.seg_prompt!r}")
        if self.seg.seg_token not in self.seg_answer:
            raise ValueError(f"model.seg_answer must hold {self.seg.seg_token!r}, got {self.seg_answer!r}")
        if self.init_from and self.connector_init:
            raise ValueError("model.init_from (a READ bundle, connector included) and model.connector_init (a "
                             "connector checkpoint) both set the connector's start; give one")


@dataclass
class SegTrainConfig(TrainLoopConfig):
    output_dir: str = "outputs/segment-read"
    learning_rate: float = 3e-4  # LISA's
    max_train_steps: int = 1000
    refs_per_image: int = 2  # referring expressions drawn per image for the training examples


@dataclass
class SegRecipeConfig(StrictConfig):
    model: SegModelConfig = field(default_factory=SegModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(source="shapesworld_refer", size=4000, tasks={}))
    train: SegTrainConfig = field(default_factory=SegTrainConfig)

    def __post_init__(self) -> None:
        if self.model.seg.head_input_norm == "batch" and self.train.batch_size < 2:
            raise ValueError(f"model.seg.head_input_norm='batch' standardises over each process's batch, and "
                             f"train.batch_size={self.train.batch_size} has no spread to measure (its statistics would "
                             "never move); use train.batch_size >= 2 (with fewer gradient_accumulation_steps) or "
                             "head_input_norm='none'")


class SamEmbedder:
    """SAM's frozen image encoder behind the feature-cache interface: images -> (B, s * s, C) tokens."""

    def __init__(self, sam) -> None:
        self.sam = sam
        self.size = int(sam.config.prompt_encoder_config.image_size)

    @torch.no_grad()
    def encode(self, images):
        from ..data.promptable import sam_pixels

        pixels = torch.stack([sam_pixels(im.convert("RGB").resize((self.size, self.size))) for im in images])
        from ..encoders.base import EncoderOutput

        emb = self.sam.get_image_embeddings(pixels.to(self.sam.device))  # (B, C, s, s)
        tokens = emb.flatten(2).transpose(1, 2)  # (B, s * s, C)
        return EncoderOutput(tokens=tokens, pooled=tokens.mean(1))

    def embeddings(self, images) -> torch.Tensor:
        """SAM's image embeddings (B, C, s, s) of PIL images, as the mask decoder takes them."""
        return embedding_grid(self.encode(images).tokens)


def embedding_grid(tokens: torch.Tensor) -> torch.Tensor:
    """(B, s * s, C) SAM embedding tokens, as cached -> (B, C, s, s) embeddings."""
    side = int(round(tokens.shape[1] ** 0.5))
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)


def sam_fingerprint(sam, name: str) -> dict:
    """What identifies a SAM's image encoder for the embedding cache: its name, its config and, for a local
    folder, the size and modification time of its weight files (re-training into the same folder changes it)."""
    info = {"name": str(name), "config": hashlib.sha256(sam.config.to_json_string().encode()).hexdigest()[:16]}
    folder = Path(resolve_asset(str(name)))
    if folder.is_dir():
        info["files"] = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.glob("*.safetensors"))}
    return info


def sam_embeddings(source, sam, name: str, cache_dir: str | Path) -> torch.Tensor:
    """SAM image embeddings (N, C, s, s) of every image of ``source``, cached next to the encoder features (held
    in memory: about 2 MiB per image at float32 for a released SAM's 256 x 64 x 64, 64 KiB for the small one)."""
    signature = {"sam": sam_fingerprint(sam, name), "data": source.signature()}
    digest = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"sam-{source.config.source}-{source.config.split}-{digest}.safetensors"
    tokens = cached_features(path, encoder=SamEmbedder(sam), ids=source.ids(), load=source.image, signature=signature)
    return embedding_grid(tokens)


def build_read(cfg: SegRecipeConfig, encoder, llm, sam) -> ReadModel:
    from ..connectors import build_connector
    from ..models import VisionLanguageModel

    connector = build_connector(cfg.model.connector, vision_dim=encoder.dim, llm_dim=llm.hidden_size,
                                **cfg.model.connector_options)
    if cfg.model.connector_init:
        connector.init_from_checkpoint(cfg.model.connector_init)
    vlm = VisionLanguageModel(encoder, connector, llm, caption_prompt=cfg.model.caption_prompt,
                              vqa_prompt=cfg.model.vqa_prompt)
    return ReadModel(vlm, sam, cfg.model.seg)


# SegConfig fields that shape or scale the weights a bundle hands on: a run started from it must share them.
INIT_MUST_MATCH = ("seg_token", "prompt_dim", "head_input_norm", "lora_r", "lora_alpha", "lora_targets")


def _local(name) -> str:
    """A name as compared across runs: an existing local path (after an optional "hf:"-style prefix) made
    absolute, anything else (a hub id) as is."""
    text = str(name)
    prefix, sep, rest = text.partition(":")
    for head, path in ((prefix + sep, rest), ("", text)) if sep else (("", text),):
        if path and Path(path).expanduser().exists():
            return head + str(Path(path).expanduser().resolve())
    return text


def init_bundle(cfg: SegRecipeConfig) -> dict:
    """The adapter folders of ``model.init_from``, the READ bundle a run starts from, after checking (before any
    caching) that it was trained on this run's frozen parts (encoder and its grid, LLM, SAM) with the seg
    settings its weights depend on (:data:`INIT_MUST_MATCH`); SasP and the loss terms may differ."""
    from ..heads.seg import saved_seg_config
    from ..models.bundle import read_bundle

    name, model = cfg.model.init_from, cfg.model
    bundle = read_bundle(resolve_asset(name))
    if bundle["kind"] != "read":
        raise ValueError(f"model.init_from: {name} holds a {bundle['kind']!r} model, not a READ bundle "
                         "(a recipes/segment/train.py output folder or checkpoint)")
    parts = bundle["parts"]
    saved_encoder, wanted_encoder = parts.get("encoder") or {}, encoder_meta(model)
    theirs = {"encoder": _local(saved_encoder.get("spec")), "llm": _local((parts.get("llm") or {}).get("name")),
              "sam": _local(resolve_asset((parts.get("sam") or {}).get("name") or "(none)"))}
    ours = {"encoder": _local(model.encoder), "llm": _local(model.llm), "sam": _local(resolve_asset(model.sam))}
    for key in sorted(set(saved_encoder) & set(wanted_encoder) - {"spec"}):  # token_grid, image_size
        theirs[f"encoder {key}"], ours[f"encoder {key}"] = saved_encoder[key], wanted_encoder[key]
    differ = [f"{k} (bundle {theirs[k]!r}, run {ours[k]!r})" for k in ours if theirs[k] != ours[k]]
    if differ:
        raise ValueError(f"model.init_from: {name} was trained on other frozen parts than this run's: "
                         f"{', '.join(differ)}; set model.encoder / token_grid / llm / sam to the bundle's")
    saved, wanted = saved_seg_config(parts.get("seg", {})).to_dict(), model.seg.to_dict()
    differ = [f"{k} (bundle {saved[k]!r}, run {wanted[k]!r})" for k in INIT_MUST_MATCH if saved[k] != wanted[k]]
    if differ:
        raise ValueError(f"model.init_from: {name} has other weights than this run's settings make: "
                         f"{', '.join(differ)}; set model.seg.<field> to the bundle's (SasP and the loss terms may differ)")
    if saved["word_embeddings"] == "all" and wanted["word_embeddings"] != "all":
        raise ValueError(f"model.init_from: {name} trained the LLM's whole word-embedding table, which this run "
                         "would then train too; set model.seg.word_embeddings=all (a bundle with only its new rows "
                         "trained starts either kind of run)")
    return bundle["adapters"]


class SegTask(TrainingTask):
    """One batch: cached encoder tokens and SAM embeddings of the images, the prompts / answers, the masks."""

    def __init__(self, cfg: SegRecipeConfig, loop: TrainingLoop) -> None:
        self.cfg, self.loop = cfg, loop
        tc = cfg.train
        source = open_source(cfg.data)
        if not isinstance(source, ReferringSource):
            raise ValueError(f"data.source={cfg.data.source} has no referring expressions with masks; accepted: "
                             "shapesworld_refer, refcoco")
        self.source = source
        self.examples = source.segmentation_examples(tc.refs_per_image)
        if len(self.examples) < tc.batch_size * loop.num_processes:
            raise ValueError(f"train.batch_size {tc.batch_size} x {loop.num_processes} processes is more than the "
                             f"{len(self.examples)} referring examples of {cfg.data.source}/{cfg.data.split}; lower it "
                             "or raise data.size")
        self.encoder_meta = encoder_meta(cfg.model)
        start = init_bundle(cfg) if cfg.model.init_from else None  # (train_seg checked it before the loop)
        encoder, llm = load_components(cfg.model)
        sam = load_sam(cfg.model.sam)
        self.features = source_features(source, encoder, self.encoder_meta, cfg.data.feature_cache)
        self.sam_embeddings = sam_embeddings(source, sam, cfg.model.sam, cfg.data.feature_cache)
        self.mask_size = int(sam.config.prompt_encoder_config.image_size)
        torch.manual_seed(tc.seed)
        self.model = build_read(cfg, encoder, llm, sam)
        if start is not None:  # (a resumed run then loads its own checkpoint over these)
            self._load_weights(start)
            loop.print(f"READ initialised from {cfg.model.init_from} (connector, the LLM's trained weights, head, "
                       "mask decoder)")
        self._boxes = self._view_boxes(encoder)  # SasP's token grid in SAM's frame, per image size
        self.model.vlm.encoder = None  # features and boxes are computed; the encoder is named in the bundle
        self.model.to(loop.device)
        self._module = _Trainable(self.model)

    @property
    def module(self) -> nn.Module:
        return self._module

    @module.setter
    def module(self, prepared: nn.Module) -> None:
        self._module = prepared

    def describe(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        mode = "READ (SasP points + <SEG>)" if self.cfg.model.seg.sasp is not None else "<SEG> only (LISA)"
        return f"{mode}: {n / 1e6:.2f}M trainable parameters, {len(self.examples)} referring examples"

    def parameters(self) -> list[nn.Parameter]:
        return self.model.trainable_parameters()

    def batches(self, start: int):
        bs, n, rank = self.cfg.train.batch_size, self.loop.num_processes, self.loop.process_index
        per_epoch = len(self.examples) // (bs * n)
        while True:
            epoch, offset = divmod(start, per_epoch)
            order = list(range(len(self.examples)))
            random.Random(self.cfg.train.seed + epoch).shuffle(order)
            first = (offset * n + rank) * bs
            yield self.batch([self.examples[j] for j in order[first:first + bs]])
            start += 1

    def _view_boxes(self, encoder) -> dict[tuple[int, int], list[float]]:
        """Where the token grid lies in SAM's frame (the encoder's crop) for every image size of the source, so
        that training does not hold the encoder (a large ViT's weights) for them; empty without SasP's
        crop-aware grid."""
        sasp = self.cfg.model.seg.sasp
        if sasp is None or sasp.grid_view != "encoder":
            return {}
        sizes = sorted({tuple(self.source.image_size(i)) for i in range(len(self.source))})
        return {size: view_boxes(encoder, [size], 1, self.mask_size)[0].tolist()
                for size in tqdm(sizes, desc="token grid per image size", disable=len(sizes) < 100, leave=False)}

    def grid_boxes(self, refs: list[Referral]) -> torch.Tensor:
        """(B, 4): where each image's token grid lies in SAM's frame, from the boxes computed per image size."""
        return torch.tensor([self._boxes[tuple(self.source.image_size(r.index))] for r in refs])

    def batch(self, refs: list[Referral]) -> dict:
        idx = torch.tensor([r.index for r in refs])
        masks = np.stack([self.source.mask(r.index, r, self.mask_size) for r in refs])
        sasp = self.cfg.model.seg.sasp
        boxes = self.grid_boxes(refs) if sasp is not None and sasp.grid_view == "encoder" else None
        return {
            "grid_boxes": boxes,
            "features": self.features[idx],
            "sam_embeddings": self.sam_embeddings[idx],
            "prompts": [self.cfg.model.seg_prompt.replace("{expression}", r.expression) for r in refs],
            "targets": [self.cfg.model.seg_answer] * len(refs),
            "masks": torch.from_numpy(masks),
        }

    def step(self, batch) -> dict[str, torch.Tensor]:
        device = self.loop.device
        boxes = batch["grid_boxes"]
        out = self.module(batch["features"].to(device), batch["prompts"], batch["targets"],
                          batch["sam_embeddings"].to(device), batch["masks"].to(device),
                          grid_boxes=None if boxes is None else boxes.to(device))
        return out.losses

    def _save(self, folder: Path) -> None:
        self.model.save_pretrained(folder, llm_name=self.cfg.model.llm, sam_name=resolve_sam(self.cfg.model.sam),
                                   encoder=self.encoder_meta, seg_prompt=self.cfg.model.seg_prompt,
                                   seg_answer=self.cfg.model.seg_answer,
                                   metadata={"training": {"command": self.loop.command, "data": self.source.signature(),
                                                          "steps": self.cfg.train.max_train_steps,
                                                          "init_from": self.cfg.model.init_from}})

    def save_checkpoint(self, folder: Path) -> dict:
        self._save(folder)
        return {}

    def load_checkpoint(self, folder: Path, state: dict) -> None:
        from ..adapters import AdapterMismatch
        from ..heads.seg import saved_seg_config
        from ..models.bundle import read_bundle

        bundle = read_bundle(folder)
        saved, wanted = saved_seg_config(bundle["parts"]["seg"]).to_dict(), self.model.config.to_dict()
        differ = [f"{k} (saved {saved.get(k)!r}, model {wanted.get(k)!r})" for k in sorted(set(saved) | set(wanted))
                  if saved.get(k) != wanted.get(k)]
        if differ:  # same tensors, other maths (e.g. a field added since the checkpoint was written)
            raise AdapterMismatch(f"{folder} was trained with other READ settings than this run's: {', '.join(differ)};"
                                  " give the run the saved settings (model.seg...) to continue it")
        self._load_weights(bundle["adapters"])

    def _load_weights(self, folders: dict) -> None:
        """Copy a bundle's adapter folders into this run's model (each loader checks kind, settings and shapes)."""
        from ..adapters import load_adapter, load_adapter_weights
        from ..connectors import load_weights_into

        load_weights_into(self.model.vlm.connector, folders["connector"])
        self.model.vlm.llm.load_trainable(folders["llm"])
        load_adapter_weights(self.model.head, folders["head"])
        decoder, _ = load_adapter(folders["mask_decoder"])
        self.model.sam.mask_decoder.load_state_dict(decoder.decoder.state_dict())

    def save_final(self, folder: Path) -> None:
        self._save(folder)


class _Trainable(nn.Module):
    """The module the loop prepares: READ's forward, with the trainable parameters reachable for DDP."""

    def __init__(self, model: ReadModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def train_seg(cfg: SegRecipeConfig, *, resume: bool = False, overwrite: bool = False,
              command: str | None = None) -> Path:
    """Run training; returns ``output_dir/final`` (a READ bundle)."""
    from ..connectors.base import check_connector_options

    check_connector_options(cfg.model.connector, cfg.model.connector_options)
    if cfg.model.init_from:
        init_bundle(cfg)  # a wrong bundle is refused before the loop claims output_dir
    loop = TrainingLoop(cfg.train, run_config=cfg, resume=resume, overwrite=overwrite, command=command)
    return loop.run(SegTask(cfg, loop))
