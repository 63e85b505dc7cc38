"""Train the ShapesWorld text-to-image model: a pixel-space UNet conditioned on frozen MiniLM states.

    python recipes/generate/train.py --config recipes/generate/configs/shapes_t2i.yaml
    python recipes/generate/train.py --max_train_steps 2 --output_dir /tmp/smoke     # smoke test
    python recipes/generate/train.py --resume                                        # after a stop
    python recipes/generate/train.py train.learning_rate=2e-4 model.layers_per_block=2   # dotted overrides

(``accelerate launch recipes/generate/train.py ...`` works too.) What it does, every number in the yaml:
v-prediction on a DDPM cosine schedule (``squaredcos_cap_v2``), AdamW with linear warm-up then a
constant rate, gradient clipping, an EMA of the UNet weights with warm-up (the EMA weights are what is
sampled and saved), 10% of captions dropped to "" for classifier-free guidance, MiniLM embeddings of
the captions cached in memory. Sample ``i`` of step ``s`` is train scene ``s * batch_size + i``, and the
noise of step ``s`` comes from a generator seeded by ``(seed, s)``, so resuming repeats nothing.

Output folder: ``log.jsonl`` (loss, lr, s/step, judge scores of the sample grids), ``samples/step-*.png``
(+ ``.json`` with prompts and scores), ``step-XXXXXX/`` checkpoints (``unet/``, ``unet_ema/``,
``optimizer.pt``, ``scheduler.pt``, ``state.json``; written atomically every ``save_every`` steps, at the
end and on Ctrl-C / SIGTERM), ``final/`` (a ``PixelTextToImagePipeline`` folder with the EMA UNet).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmkit.config import StrictConfig, atomic_write_text
from mmkit.diffusion.pixel_pipeline import SAMPLERS
from mmkit.diffusion.t2i_data import T2IDataConfig
from mmkit.text_encoders import DEFAULT_TEXT_ENCODER
from mmkit.training.checkpoint import GracefulStop
from mmkit.training.config import TrainLoopConfig

DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "shapes_t2i.yaml")
PREDICTIONS = ("v_prediction", "epsilon")


@dataclass
class ModelConfig(StrictConfig):
    """The UNet (diffusers ``UNet2DConditionModel`` arguments) and its text encoder.

    The first down block and the last up block must carry cross-attention: they hold the
    highest-resolution self-attention that ToMe / AgentSD patch. ``text_time_embedding`` adds the
    attention-pooled prompt to the timestep embedding (``addition_embed_type="text"``), so every
    ResNet block sees the prompt, not only the attention layers. ``head_dim`` is the width of one
    attention head; each block gets ``channels // head_dim`` heads (diffusers' own
    ``attention_head_dim`` argument of this UNet is, despite its name, the number of heads).
    """

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    head_dim: int = 32
    norm_num_groups: int = 16
    text_time_embedding: bool = True
    text_time_heads: int = 6
    text_encoder: str = DEFAULT_TEXT_ENCODER
    max_length: int = 20

    def __post_init__(self) -> None:
        if len(self.down_block_types) != len(self.block_out_channels) or len(self.up_block_types) != len(
            self.block_out_channels
        ):
            raise ValueError(
                f"ModelConfig: need one down and one up block per entry of block_out_channels "
                f"{self.block_out_channels}, got {len(self.down_block_types)} down / {len(self.up_block_types)} up"
            )
        if any(c % self.head_dim for c in self.block_out_channels):
            raise ValueError(
                f"ModelConfig: head_dim {self.head_dim} must divide every entry of block_out_channels "
                f"{self.block_out_channels}"
            )
        if not self.down_block_types[0].startswith("CrossAttn") or not self.up_block_types[-1].startswith("CrossAttn"):
            raise ValueError(
                "ModelConfig: the first down block and the last up block must be CrossAttn* blocks (ToMe and "
                f"AgentSD patch the highest-resolution self-attention); got {self.down_block_types[0]} / "
                f"{self.up_block_types[-1]}"
            )


@dataclass
class NoiseConfig(StrictConfig):
    """Training noise schedule and the sampler saved with the model.

    beta_schedule: diffusers name (``squaredcos_cap_v2`` = the cosine schedule; its last step has
    near-zero SNR, which is why prediction_type is ``v_prediction``: epsilon cannot recover the image
    there). snr_gamma: Min-SNR-gamma loss weighting (null = plain v-MSE). sampler / sample_steps /
    guidance_scale: the scheduler saved in ``final/`` and used for the sample grids.
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"
    snr_gamma: float | None = None
    sampler: str = "ddim"
    sample_steps: int = 50
    guidance_scale: float = 3.0

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTIONS:
            raise ValueError(f"NoiseConfig.prediction_type: got {self.prediction_type!r}; accepted: {list(PREDICTIONS)}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"NoiseConfig.sampler: got {self.sampler!r}; accepted: {list(SAMPLERS)}")


@dataclass
class TrainConfig(TrainLoopConfig):
    output_dir: str = "outputs/t2i-shapes"
    batch_size: int = 32
    learning_rate: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    warmup_steps: int = 500
    max_train_steps: int = 12000
    ema_max_decay: float = 0.9999
    ema_power: float = 0.75
    ema_inv_gamma: float = 1.0
    save_every: int = 500
    sample_every: int = 500
    sample_prompts: int = 16
    sample_seed: int = 1234
    cache_text: bool = True
    num_threads: int | None = None


@dataclass
class T2ITrainConfig(StrictConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    data: T2IDataConfig = field(default_factory=T2IDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------- builders
def build_unet(model: ModelConfig, image_size: int, cross_attention_dim: int):
    """A randomly initialised pixel-space ``UNet2DConditionModel`` (3 -> 3 channels)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        layers_per_block=model.layers_per_block,
        block_out_channels=tuple(model.block_out_channels),
        down_block_types=tuple(model.down_block_types),
        up_block_types=tuple(model.up_block_types),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=tuple(c // model.head_dim for c in model.block_out_channels),  # = heads per block
        norm_num_groups=model.norm_num_groups,
        addition_embed_type="text" if model.text_time_embedding else None,
        addition_embed_type_num_heads=model.text_time_heads,
    )


def build_noise_scheduler(noise: NoiseConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=noise.num_train_timesteps, beta_schedule=noise.beta_schedule,
        prediction_type=noise.prediction_type, clip_sample=True, clip_sample_range=1.0,
    )


def build_sampler(noise: NoiseConfig, sampler: str | None = None):
    """The inference scheduler (``noise.sampler`` unless given) on the training schedule; see
    :func:`mmkit.diffusion.pixel_pipeline.pixel_sampler` for the choices."""
    from mmkit.diffusion.pixel_pipeline import pixel_sampler

    return pixel_sampler(sampler or noise.sampler, num_train_timesteps=noise.num_train_timesteps,
                         beta_schedule=noise.beta_schedule, prediction_type=noise.prediction_type)


def loss_weights(noise_scheduler, timesteps: torch.Tensor, noise: NoiseConfig) -> torch.Tensor | None:
    """Per-sample weights of the MSE for Min-SNR-gamma (Hang et al. 2023), or None for plain MSE."""
    if noise.snr_gamma is None:
        return None
    alpha_bar = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha_bar / (1 - alpha_bar)
    weight = snr.clamp(max=noise.snr_gamma)
    return weight / (snr + 1) if noise.prediction_type == "v_prediction" else weight / snr.clamp(min=1e-8)


# ---------------------------------------------------------------------- training
def train(cfg: T2ITrainConfig, *, resume: bool = False, command: str | None = None) -> Path:
    """Run training; returns the final pipeline folder ``output_dir/final``."""
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm
    from transformers import get_constant_schedule_with_warmup

    from mmkit.diffusion.t2i_data import ShapesT2IData
    from mmkit.text_encoders import PromptEncoder, load_text_encoder
    from mmkit.training.checkpoint import latest_checkpoint, load_training_state, save_checkpoint

    tc, nc = cfg.train, cfg.noise
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    accelerator = Accelerator(mixed_precision=tc.mixed_precision)
    out_dir = Path(tc.output_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")

    text_encoder, tokenizer = load_text_encoder(cfg.model.text_encoder)
    text_encoder.to(accelerator.device)
    prompts_encoder = PromptEncoder(text_encoder, tokenizer, cfg.model.max_length, cache=tc.cache_text)
    data = ShapesT2IData(cfg.data)
    torch.manual_seed(tc.seed)
    unet = build_unet(cfg.model, cfg.data.world.image_size, prompts_encoder.dim)
    noise_scheduler = build_noise_scheduler(nc)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2),
                                  weight_decay=tc.weight_decay)
    lr_scheduler = get_constant_schedule_with_warmup(optimizer, tc.warmup_steps)

    # EMA hyper-parameters come from the config; a checkpoint holds the EMA weights as a plain UNet folder
    # (unet_ema/) and the EMA step count in state.json.
    ema = EMAModel(unet.parameters(), decay=tc.ema_max_decay, use_ema_warmup=True, inv_gamma=tc.ema_inv_gamma,
                   power=tc.ema_power)
    step = 0
    ckpt = latest_checkpoint(out_dir) if resume else None
    if resume and ckpt is None:
        accelerator.print(f"--resume: no checkpoint in {out_dir}; starting from scratch")
    if ckpt is not None:
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(ckpt / "unet").state_dict())
        ema_weights = UNet2DConditionModel.from_pretrained(ckpt / "unet_ema")
        ema.shadow_params = [p.detach().clone() for p in ema_weights.parameters()]
        state = load_training_state(ckpt, optimizer=optimizer, scheduler=lr_scheduler)
        step, ema.optimization_step = state["step"], state["ema_optimization_step"]
        accelerator.print(f"resumed from {ckpt} at step {step}")
    ema.to(accelerator.device)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    raw_unet = accelerator.unwrap_model(unet)
    n_params = sum(p.numel() for p in raw_unet.parameters())
    accelerator.print(f"UNet: {n_params / 1e6:.2f}M parameters; text encoder {cfg.model.text_encoder} (frozen)")

    grid_prompts = _grid_prompts(cfg)

    def write_checkpoint(folder: Path) -> None:
        raw_unet.save_pretrained(folder / "unet", safe_serialization=True)
        with_ema(lambda: raw_unet.save_pretrained(folder / "unet_ema", safe_serialization=True))

    def checkpoint(at: int) -> None:
        if accelerator.is_main_process:
            state = {"seed": tc.seed, "samples_seen": at * tc.batch_size, "ema_optimization_step": ema.optimization_step}
            save_checkpoint(out_dir, at, write_adapter=write_checkpoint, optimizer=optimizer, scheduler=lr_scheduler,
                            state=state, keep=tc.keep_checkpoints)

    def with_ema(fn):
        ema.store(raw_unet.parameters())
        ema.copy_to(raw_unet.parameters())
        try:
            return fn()
        finally:
            ema.restore(raw_unet.parameters())

    def pipeline():
        from mmkit.diffusion.pixel_pipeline import PixelTextToImagePipeline

        pipe = PixelTextToImagePipeline(unet=raw_unet, scheduler=build_sampler(nc), text_encoder=text_encoder,
                                        tokenizer=tokenizer, text_encoder_source=cfg.model.text_encoder,
                                        max_length=cfg.model.max_length)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample_grid(at: int) -> dict:
        raw_unet.eval()
        try:
            record = with_ema(lambda: _sample_grid(pipeline(), grid_prompts, cfg, out_dir / "samples", at))
        finally:
            raw_unet.train()
        return record

    log_path = out_dir / "log.jsonl"
    progress = tqdm(total=tc.max_train_steps, initial=step, desc="training t2i UNet", unit="step",
                    disable=not accelerator.is_main_process)
    unet.train()
    window = {"loss": 0.0, "n": 0, "data_s": 0.0, "text_s": 0.0, "t0": time.perf_counter(), "encoded": 0}
    started = time.perf_counter()
    with GracefulStop(lambda: checkpoint(step), accelerator.print, lambda: f"step {step} to {out_dir}") as stop:
        try:
            while step < tc.max_train_steps:
                t_data = time.perf_counter()
                batch = data.batch(step * tc.batch_size, tc.batch_size)
                t_text = time.perf_counter()
                context, mask = prompts_encoder(batch["prompts"])  # (B, L, D), (B, L)
                t_model = time.perf_counter()
                x0 = batch["pixel_values"].to(accelerator.device)  # (B, 3, H, W) in [-1, 1]
                g = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
                noise = torch.randn(x0.shape, generator=g).to(x0.device)
                timesteps = torch.randint(0, nc.num_train_timesteps, (x0.shape[0],), generator=g).to(x0.device)
                noisy = noise_scheduler.add_noise(x0, noise, timesteps)
                target = noise if nc.prediction_type == "epsilon" else noise_scheduler.get_velocity(x0, noise, timesteps)
                pred = unet(noisy, timesteps, encoder_hidden_states=context.to(accelerator.device),
                            encoder_attention_mask=mask.to(accelerator.device)).sample
                per_sample = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
                weights = loss_weights(noise_scheduler, timesteps, nc)
                loss = (per_sample * weights).mean() if weights is not None else per_sample.mean()
                accelerator.backward(loss)
                if tc.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(unet.parameters(), tc.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                ema.step(raw_unet.parameters())
                step += 1
                progress.update(1)
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"loss is {loss_value} at step {step}; lower train.learning_rate")
                window["loss"] += loss_value
                window["n"] += 1
                window["data_s"] += t_text - t_data
                window["text_s"] += t_model - t_text
                if step % tc.log_every == 0 or step == tc.max_train_steps:
                    now = time.perf_counter()
                    record = {
                        "step": step, "loss": round(window["loss"] / window["n"], 5),
                        "lr": lr_scheduler.get_last_lr()[0], "ema_decay": round(ema.cur_decay_value or 0.0, 5),
                        "s_per_step": round((now - window["t0"]) / window["n"], 3),
                        "data_s_per_step": round(window["data_s"] / window["n"], 4),
                        "text_s_per_step": round(window["text_s"] / window["n"], 4),
                        "prompts_encoded": prompts_encoder.encoded - window["encoded"],
                        "elapsed_s": round(now - started, 1),
                    }
                    progress.set_postfix(loss=record["loss"])
                    _append(accelerator, log_path, record)
                    window.update(loss=0.0, n=0, data_s=0.0, text_s=0.0, t0=time.perf_counter(),
                                  encoded=prompts_encoder.encoded)
                if tc.sample_every > 0 and step % tc.sample_every == 0 and accelerator.is_main_process:
                    _append(accelerator, log_path, {"step": step, "samples": sample_grid(step)})
                    window["t0"] = time.perf_counter()  # sampling time is not training time
                if step % tc.save_every == 0:
                    checkpoint(step)
                stop.check()
        finally:
            progress.close()
    if not (out_dir / f"step-{step:06d}").is_dir():
        checkpoint(step)
    final = out_dir / "final"
    if accelerator.is_main_process:
        with_ema(lambda: pipeline().save_pretrained(final))
        training = {"command": command, "steps": step, "parameters": n_params, "config": cfg.to_dict()}
        atomic_write_text(final / "training.json", json.dumps(training, indent=2) + "\n")
        if tc.sample_every > 0 and step % tc.sample_every != 0:
            _append(accelerator, log_path, {"step": step, "samples": sample_grid(step)})
    accelerator.wait_for_everyone()
    return final


def _append(accelerator, path: Path, record: dict) -> None:
    if accelerator.is_main_process:
        with open(path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def _grid_prompts(cfg: T2ITrainConfig) -> list:
    from mmkit.diffusion.t2i_data import held_out_prompts

    return held_out_prompts(cfg.train.sample_prompts, cfg.data.world, split="test")


def _sample_grid(pipe, prompts: list, cfg: T2ITrainConfig, folder: Path, step: int) -> dict:
    """Sample the fixed held-out prompts with fixed seeds, save a PNG grid and score it with the judge."""
    from mmkit.eval.shapes_judge import JudgeConfig, prompt_following, prompt_following_accuracy
    from mmkit.generate_cli import image_grid

    tc, nc = cfg.train, cfg.noise
    texts = [c for _, c in prompts]
    generators = [torch.Generator().manual_seed(tc.sample_seed + i) for i in range(len(texts))]
    t0 = time.perf_counter()
    images = pipe(texts, num_inference_steps=nc.sample_steps, guidance_scale=nc.guidance_scale,
                  generator=generators, output_type="pt").images  # (N, 3, H, W) in [0, 1]
    seconds = time.perf_counter() - t0
    judge_cfg = JudgeConfig.for_world(cfg.data.world)
    results = [prompt_following(img, scene, judge_cfg) for img, (scene, _) in zip(images, prompts)]
    scores = prompt_following_accuracy(results)
    folder.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(folder / f"step-{step:06d}.png")
    summary = {"step": step, "sample_s": round(seconds, 1), **{k: v for k, v in scores.items()}}
    detail = [{"prompt": t, **{k: r[k] for k in ("all", "objects", "colour", "shape", "count", "relation")}}
              for t, r in zip(texts, results)]
    atomic_write_text(folder / f"step-{step:06d}.json", json.dumps({"summary": summary, "images": detail}, indent=2))
    return summary


# ---------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> Path:
    from mmkit.training.config import parse_recipe_args

    cfg, args = parse_recipe_args(
        T2ITrainConfig, DEFAULT, description="Train the ShapesWorld pixel-space text-to-image UNet.",
        epilog="Extra arguments are dotted overrides, e.g. train.learning_rate=2e-4 model.block_out_channels=[32,64,64]",
        argv=argv,
    )
    command = " ".join(["python", *sys.argv]) if argv is None else " ".join(["train.py", *argv])
    final = train(cfg, resume=args.resume, command=command)
    print(f"pipeline saved to {final}")
    return final


if __name__ == "__main__":
    main()
