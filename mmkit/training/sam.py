"""A small SAM of our own: transformers' ``SamModel`` trained on ShapesWorld promptable segmentation.

No SAM weights exist offline, and READ uses SAM frozen (image encoder) with a trained mask decoder, so mmkit
trains a small one the same way SAM was trained, on the shared loop: random points or a jittered box on one
object -> that object's exact mask, BCE + Dice on the mask and MSE on the predicted IoU. The result is a
plain ``SamModel.save_pretrained`` folder: ``SamModel.from_pretrained(path)`` and every mmkit SAM path load
it like a released checkpoint (``facebook/sam-vit-base`` and friends load the same way for users).

    python recipes/segment/pretrain_sam.py                       # recipes/segment/configs/sam_shapes.yaml
    python recipes/segment/eval_sam.py --sam outputs/sam-shapes/final
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import StrictConfig, atomic_write_text
from ..data.promptable import PromptableConfig, PromptableShapes, mask_box, sample_points
from ..heads.sam_prompt import decode_masks, upscale_masks
from ..heads.seg import dice_loss
from .loop import TrainingLoop, TrainingTask, TrainLoopConfig


@dataclass
class SamSizes(StrictConfig):
    """The small SAM's sizes (``SamVisionConfig`` / ``SamPromptEncoderConfig`` / ``SamMaskDecoderConfig``).
    ``init``: a SAM checkpoint (name or folder) to start from instead (its sizes win)."""

    patch_size: int = 8
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    mlp_dim: int = 512
    window_size: int = 4
    global_attn_indexes: tuple[int, ...] = (1, 3)
    prompt_dim: int = 256  # the neck's output and the prompt / decoder width (256 in every released SAM)
    decoder_mlp_dim: int = 1024
    decoder_heads: int = 8
    position_scale: float = 1.0  # std of the fixed random Fourier matrix of positions (SAM's scale 1.0)
    init: str | None = None

    def __post_init__(self) -> None:
        self.global_attn_indexes = tuple(int(i) for i in self.global_attn_indexes)
        if any(i >= self.num_hidden_layers or i < 0 for i in self.global_attn_indexes):
            raise ValueError(f"SamSizes.global_attn_indexes {self.global_attn_indexes} must name layers "
                             f"0..{self.num_hidden_layers - 1}")
        if not self.position_scale > 0:
            raise ValueError(f"SamSizes.position_scale must be > 0, got {self.position_scale}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"SamSizes.hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")


@dataclass
class SamTrainConfig(TrainLoopConfig):
    output_dir: str = "outputs/sam-shapes"
    learning_rate: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    max_train_steps: int = 6000
    max_grad_norm: float = 1.0
    save_every: int = 100
    eval_every: int = 500
    box_fraction: float = 0.5  # share of batches prompted with a box (the others with points)
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    eval_size: int = 200  # held-out scenes for the periodic one-point mIoU

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.box_fraction <= 1.0:
            raise ValueError(f"train.box_fraction must be in [0, 1], got {self.box_fraction}")


@dataclass
class SamPretrainConfig(StrictConfig):
    model: SamSizes = field(default_factory=SamSizes)
    data: PromptableConfig = field(default_factory=PromptableConfig)
    train_size: int = 20_000
    train: SamTrainConfig = field(default_factory=SamTrainConfig)


def build_sam(sizes: SamSizes, image_size: int):
    """A ``SamModel`` with these sizes for square images of ``image_size`` pixels (random init), or the
    checkpoint ``sizes.init`` names."""
    from transformers import (
        SamConfig,
        SamMaskDecoderConfig,
        SamModel,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    if sizes.init:
        return SamModel.from_pretrained(sizes.init, dtype=torch.float32)
    if image_size % sizes.patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of the SAM patch size {sizes.patch_size}")
    vision = SamVisionConfig(
        hidden_size=sizes.hidden_size, output_channels=sizes.prompt_dim, num_hidden_layers=sizes.num_hidden_layers,
        num_attention_heads=sizes.num_attention_heads, mlp_dim=sizes.mlp_dim, image_size=image_size,
        patch_size=sizes.patch_size, window_size=sizes.window_size, global_attn_indexes=list(sizes.global_attn_indexes),
        num_pos_feats=sizes.prompt_dim // 2,
    )
    prompt = SamPromptEncoderConfig(hidden_size=sizes.prompt_dim, image_size=image_size, patch_size=sizes.patch_size)
    decoder = SamMaskDecoderConfig(hidden_size=sizes.prompt_dim, mlp_dim=sizes.decoder_mlp_dim,
                                   num_attention_heads=sizes.decoder_heads, iou_head_hidden_dim=sizes.prompt_dim)
    sam = SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder))
    # The random Fourier matrix that encodes point / box / pixel positions: SAM draws it from N(0, 1) (scale 1.0)
    # and keeps it fixed (a buffer). transformers draws it with scale hidden_size // 2 (released checkpoints
    # overwrite it); from scratch that makes the encodings of neighbouring pixels unrelated, and the trained model
    # ignored its prompts (one-point and box mIoU both 48.1%: the union of the objects). So: SAM's own.
    with torch.no_grad():
        sam.shared_image_embedding.positional_embedding.normal_(0.0, sizes.position_scale)
    sam.shared_image_embedding.positional_embedding.requires_grad_(False)  # tied to the prompt encoder's copy
    return sam


def iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-mask IoU of (B, H, W) bool masks; an empty union counts as 1 (both empty)."""
    inter = (pred & target).flatten(1).sum(1).float()
    union = (pred | target).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def sam_losses(sam, batch: dict, device, weights: tuple[float, float, float]) -> dict[str, torch.Tensor]:
    """BCE + Dice on the up-scaled mask logits and MSE of the predicted IoU against the true one."""
    pixels = batch["pixel_values"].to(device)
    masks = batch["masks"].to(device)
    embeddings = sam.vision_encoder(pixels).last_hidden_state  # (B, C, s, s); the encoder trains here
    if batch["prompt"] == "box":
        logits, iou_pred = decode_masks(sam, embeddings, None, None, boxes=batch["boxes"].to(device))
    else:
        logits, iou_pred = decode_masks(sam, embeddings, batch["points"].to(device), batch["labels"].to(device))
    logits = upscale_masks(logits, tuple(masks.shape[-2:]))[:, 0]  # (B, H, W)
    target = masks.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    dice = dice_loss(logits, target).mean()
    true_iou = iou(logits.detach() > 0, masks)
    iou_mse = F.mse_loss(iou_pred[:, 0].float(), true_iou)
    wb, wd, wi = weights
    return {"loss": wb * bce + wd * dice + wi * iou_mse, "bce_loss": bce, "dice_loss": dice, "iou_mse": iou_mse,
            "train_iou": true_iou.mean()}


@torch.no_grad()
def one_point_miou(sam, data: PromptableShapes, *, device="cpu", batch_size: int = 16, box: bool = False) -> dict:
    """Held-out mIoU over every object of ``data``'s scenes from one positive point (a pixel of the object
    drawn with the scene's seed) or, with ``box``, from the object's tight box."""
    sam.eval()
    scores: list[float] = []
    pending: list[tuple[torch.Tensor, tuple, np.ndarray]] = []

    def flush():
        if not pending:
            return
        pixels = torch.stack([p for p, _, _ in pending]).to(device)
        emb = sam.vision_encoder(pixels).last_hidden_state
        masks = torch.from_numpy(np.stack([m for _, _, m in pending])).to(device)
        prompts = torch.tensor([b for _, b, _ in pending], dtype=torch.float32, device=device)
        if box:
            logits, _ = decode_masks(sam, emb, None, None, boxes=prompts)
        else:
            ones = torch.ones(len(pending), 1, dtype=torch.long, device=device)
            logits, _ = decode_masks(sam, emb, prompts[:, None], ones)
        pred = upscale_masks(logits, tuple(masks.shape[-2:]))[:, 0] > 0
        scores.extend(iou(pred, masks).tolist())
        pending.clear()

    for index in range(len(data)):
        pixels, masks = data.scene_sample(index)
        rng = random.Random(data.world.seed_of(index))
        for mask in masks:
            if not mask.any():
                continue
            prompt = mask_box(mask) if box else sample_points(mask, rng, 1, 0)[0][:2]
            pending.append((pixels, tuple(prompt), mask))
            if len(pending) == batch_size:
                flush()
    flush()
    return {"miou": float(np.mean(scores)) if scores else float("nan"), "objects": len(scores)}


class SamPretrainTask(TrainingTask):
    def __init__(self, cfg: SamPretrainConfig, loop: TrainingLoop) -> None:
        self.cfg, self.loop = cfg, loop
        self.data = PromptableShapes(cfg.data, split="train", size=cfg.train_size)
        self.held_out = PromptableShapes(cfg.data, split="val", size=cfg.train.eval_size)
        torch.manual_seed(cfg.train.seed)
        self.module = build_sam(cfg.model, cfg.data.image_size)
        self.module.train()

    def describe(self) -> str:
        n = sum(p.numel() for p in self.unwrapped().parameters())
        return f"SamModel: {n / 1e6:.2f}M parameters, {self.cfg.data.image_size} px images"

    def batches(self, start: int):
        bs, n, i = self.cfg.train.batch_size, self.loop.num_processes, self.loop.process_index
        while True:
            rng = random.Random(self.cfg.train.seed * 7919 + start)
            prompt = "box" if rng.random() < self.cfg.train.box_fraction else "points"
            yield self.data.batch(start * bs * n + i * bs, bs, prompt)
            start += 1

    def step(self, batch) -> dict[str, torch.Tensor]:
        tc = self.cfg.train
        return sam_losses(self.module, batch, self.loop.device, (tc.bce_weight, tc.dice_weight, tc.iou_weight))

    def save_checkpoint(self, folder: Path) -> dict:
        self.unwrapped().save_pretrained(folder / "sam", safe_serialization=True)
        return {}

    def load_checkpoint(self, folder: Path, state: dict) -> None:
        from transformers import SamModel

        # through from_pretrained: the saved file holds SAM's tied positional matrix once
        self.unwrapped().load_state_dict(SamModel.from_pretrained(folder / "sam").state_dict())

    def save_final(self, folder: Path) -> None:
        self.unwrapped().save_pretrained(folder, safe_serialization=True)
        training = {"command": self.loop.command, "steps": self.cfg.train.max_train_steps,
                    "config": self.cfg.to_dict()}
        atomic_write_text(folder / "training.json", json.dumps(training, indent=2) + "\n")

    def evaluate(self, step: int) -> dict | None:
        if not self.loop.is_main_process:
            return None
        sam = self.unwrapped()
        try:
            out = one_point_miou(sam, self.held_out, device=self.loop.device)
        finally:
            sam.train()
        return {"val_one_point_miou": round(out["miou"], 4)}


def train_sam(cfg: SamPretrainConfig, *, resume: bool = False, overwrite: bool = False,
              command: str | None = None) -> Path:
    """Pre-train the small SAM; returns ``output_dir/final`` (a ``SamModel`` folder)."""
    loop = TrainingLoop(cfg.train, run_config=cfg, resume=resume, overwrite=overwrite, command=command)
    return loop.run(SamPretrainTask(cfg, loop))
