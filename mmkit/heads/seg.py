"""READ (Qian et al., CVPR 2025) on LISA: a ``<SEG>`` token whose LLM state prompts SAM, with Similarity as
Points (SasP).

The model is a :class:`~mmkit.models.VisionLanguageModel` (frozen encoder, connector, LLM with LoRA and a new
``<SEG>`` row) plus a frozen SAM image encoder and a trained SAM mask decoder:

1. The LLM reads ``prompt + answer`` with the image tokens in place; the answer holds ``<SEG>``.
2. The hidden state that *predicts* ``<SEG>`` (the position just before it, LISA's and READ's choice: the
   state the LM had when it decided to emit the token) -> MLP (d -> d -> 256) -> one extra sparse prompt.
3. SasP (``config.sasp``; None gives LISA's ``<SEG>``-only baseline, the same model with no points): that
   state's raw dot products with the last-layer states at the image positions, on the image-token grid ->
   up to 30 labelled point prompts, moved by DtoC so the mask loss reaches the map (:mod:`.sasp`).
4. SAM's mask decoder on the cached image embeddings with points + ``<SEG>`` prompt -> mask logits, up-scaled
   to the ground-truth size.

Loss ``ce_weight * CE + bce_weight * BCE + dice_weight * Dice`` (1.0 / 2.0 / 0.5, the paper's), BCE per pixel
and Dice per mask as LISA computes them (``dice_smooth``: LISA's code scales the sums by 1/1000 and adds 1e-6,
the same as adding 1e-3 to the unscaled sums; it keeps empty masks well defined). The connector
trains on this loss only: a connector's own objective (VLAP's assignment term) is not added here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters import Adapter, AdapterConfig, register_adapter
from ..config import StrictConfig
from ..llm.frozen import LMOutput, LoRASpec
from .sam_prompt import decode_masks, load_sam, sam_input_size, upscale_masks
from .sasp import PADDING, SasPConfig, sasp_points, similarity_map

SEG_TOKEN = "<SEG>"
WORD_EMBEDDINGS = ("new_rows", "all")  # SegConfig.word_embeddings


@dataclass
class SegConfig(StrictConfig):
    """READ's defaults; ``sasp=None`` is the ``<SEG>``-only (LISA) baseline."""

    seg_token: str = SEG_TOKEN
    prompt_dim: int = 256  # SAM's prompt width (256 for every released SAM)
    sasp: SasPConfig | None = field(default_factory=SasPConfig)
    grid: tuple[int, int] | None = None  # the image-token grid; None: square from the token count
    ce_weight: float = 1.0
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    dice_smooth: float = 1e-3  # added to both Dice sums (LISA / READ: eps 1e-6 at scale 1/1000)
    lora_r: int = 8  # 0: no LoRA (only the <SEG> row, the head and the mask decoder train)
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    train_mask_decoder: bool = True
    head_input_norm: str = "none"  # SegHeadConfig.input_norm: "none" (LISA / READ) or "batch"
    # which LLM embedding rows train: "new_rows", only the added <SEG> row (mmkit's default, the LLM stays as
    # released); "all", the whole embed_tokens table and lm_head as well (LISA's and READ's official code; the
    # bundle then holds the table, 28M parameters for SmolLM2-135M)
    word_embeddings: str = "new_rows"

    def __post_init__(self) -> None:
        for name in ("ce_weight", "bce_weight", "dice_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"SegConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.dice_smooth <= 0:
            raise ValueError(f"SegConfig.dice_smooth must be > 0 (it keeps Dice defined on empty masks), "
                             f"got {self.dice_smooth}")
        if self.lora_r < 0:
            raise ValueError(f"SegConfig.lora_r must be >= 0, got {self.lora_r}")
        if isinstance(self.sasp, dict):
            self.sasp = SasPConfig.from_dict(self.sasp)
        if self.grid is not None:
            self.grid = tuple(int(g) for g in self.grid)
            if len(self.grid) != 2 or min(self.grid) < 1:
                raise ValueError(f"SegConfig.grid must be two positive ints (rows, cols), got {self.grid}")
        self.lora_targets = tuple(self.lora_targets)
        check_input_norm(self.head_input_norm, "SegConfig.head_input_norm")
        if self.word_embeddings not in WORD_EMBEDDINGS:
            raise ValueError(f"SegConfig.word_embeddings must be one of {WORD_EMBEDDINGS}, got {self.word_embeddings!r}")


def saved_seg_config(seg: dict) -> SegConfig:
    """A bundle's ``parts["seg"]`` as the :class:`SegConfig` it was trained with: fields added since it was
    written take the value those runs used, not today's default."""
    seg = dict(seg)
    if isinstance(seg.get("sasp"), dict) and "grid_view" not in seg["sasp"]:
        # saved before SasPConfig.grid_view existed: trained with the grid over the whole frame; keep it so
        seg["sasp"] = {**seg["sasp"], "grid_view": "image"}
    seg.setdefault("dice_smooth", 1.0)  # saved before the field existed: trained with smoothing 1
    seg.setdefault("head_input_norm", "none")  # saved before the field existed: LISA's head
    seg.setdefault("word_embeddings", "new_rows")  # saved before the field existed: only the <SEG> row trained
    return SegConfig.from_dict(seg)


class BatchStandardise(nn.Module):
    """Each channel of the ``<SEG>`` state centred and scaled by its statistics over the batch's rows that hold
    a ``<SEG>`` (``keep``), running averages (momentum 0.1) at evaluation: ``BatchNorm1d`` without affine terms,
    with the same buffer names. Why it can matter: states of one prompt template differ little from expression
    to expression (cosine ~0.99 between two expressions of a scene), so a plain Linear sees mostly their shared
    part; centring per channel removes it. A batch with fewer than two kept rows uses the running statistics
    and leaves them as they were (no host read decides it). Statistics are per process: under DDP, ``torch``
    broadcasts rank 0's buffers with the model."""

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:  # (B, d), (B,) bool -> (B, d)
        if not self.training:
            return (x - self.running_mean) / torch.sqrt(self.running_var + self.eps)
        w = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device) if keep is None else keep.to(x.dtype)[:, None]
        n = w.sum()
        mean = (x * w).sum(0) / n.clamp_min(1.0)  # (d,)
        var = ((x - mean).square() * w).sum(0) / n.clamp_min(1.0)  # biased, as BatchNorm normalises
        enough = n >= 2
        with torch.no_grad():
            unbiased = var * n / (n - 1).clamp_min(1.0)  # as BatchNorm's running variance
            m = self.momentum
            self.running_mean.copy_(torch.where(enough, (1 - m) * self.running_mean + m * mean, self.running_mean))
            self.running_var.copy_(torch.where(enough, (1 - m) * self.running_var + m * unbiased, self.running_var))
            self.num_batches_tracked.add_(enough.long())
        mean = torch.where(enough, mean, self.running_mean)
        var = torch.where(enough, var, self.running_var)
        return (x - mean) / torch.sqrt(var + self.eps)


class NoInputNorm(nn.Module):
    """LISA's head reads the state as it is."""

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        return x


HEAD_INPUT_NORMS = {"none": lambda dim: NoInputNorm(), "batch": BatchStandardise}


def check_input_norm(name: str, field_name: str) -> None:
    if name not in HEAD_INPUT_NORMS:
        raise ValueError(f"{field_name}={name!r}; accepted: {sorted(HEAD_INPUT_NORMS)}")


@dataclass
class SegHeadConfig(AdapterConfig):
    llm_dim: int = 576
    prompt_dim: int = 256
    input_norm: str = "none"  # "none": LISA's head as published; "batch": BatchStandardise first

    def __post_init__(self) -> None:
        check_input_norm(self.input_norm, "SegHeadConfig.input_norm")


class SegHead(Adapter):
    """LISA's projection of the ``<SEG>`` state to a SAM prompt: Linear(d, d) -> ReLU -> Linear(d, out),
    optionally after a per-channel standardisation of the state (``input_norm="batch"``; LISA has none)."""

    kind = "seg_head"
    family = "head"
    config_class = SegHeadConfig

    def __init__(self, config: SegHeadConfig) -> None:
        super().__init__(config)
        d = config.llm_dim
        self.norm = HEAD_INPUT_NORMS[config.input_norm](d)
        self.net = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, config.prompt_dim))

    def forward(self, state: Tensor, keep: Tensor | None = None) -> Tensor:  # (B, d), (B,) bool -> (B, prompt_dim)
        """``keep``: the rows whose state is real (a ``<SEG>`` was found); only they shape batch statistics."""
        return self.net(self.norm(state, keep))


@dataclass
class MaskDecoderConfig(AdapterConfig):
    """The fields of transformers' ``SamMaskDecoderConfig`` (a trained SAM mask decoder saved as an adapter)."""

    decoder: dict = field(default_factory=dict)


class SamMaskDecoderAdapter(Adapter):
    """SAM's mask decoder as an adapter folder (READ trains it; the rest of SAM stays the named checkpoint)."""

    kind = "sam_mask_decoder"
    family = "head"
    config_class = MaskDecoderConfig

    def __init__(self, config: MaskDecoderConfig, decoder: nn.Module | None = None) -> None:
        super().__init__(config)
        if decoder is None:
            from transformers import SamMaskDecoderConfig
            from transformers.models.sam.modeling_sam import SamMaskDecoder

            decoder = SamMaskDecoder(SamMaskDecoderConfig(**config.decoder))
        self.decoder = decoder

    @classmethod
    def of(cls, sam) -> SamMaskDecoderAdapter:
        """The adapter view of ``sam.mask_decoder`` (shares its parameters)."""
        keep = ("hidden_size", "hidden_act", "mlp_dim", "num_hidden_layers", "num_attention_heads",
                "attention_downsample_rate", "num_multimask_outputs", "iou_head_depth", "iou_head_hidden_dim",
                "layer_norm_eps")
        cfg = sam.config.mask_decoder_config.to_dict()
        return cls(MaskDecoderConfig(decoder={k: cfg[k] for k in keep if k in cfg}), sam.mask_decoder)


class _LMTrainable:
    """Bundle entry for the LLM's trained part (added rows + LoRA, and the word embeddings when they train),
    written by ``FrozenLM.save_trainable``."""

    def __init__(self, llm) -> None:
        self.llm = llm

    def save_adapter(self, directory, *, metadata: dict | None = None):
        return self.llm.save_trainable(directory, metadata=metadata)


def dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """1 - (2|P.T| + s) / (|P| + |T| + s) per mask: (B, H, W) logits and {0, 1} targets -> (B,). The smoothing
    term keeps an empty target well defined (an empty prediction then scores 0)."""
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1).to(p.dtype)
    return 1 - (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)


@dataclass
class SegOutput:
    """What :meth:`ReadModel.forward` gives: the losses, the mask logits (B, H, W) and the SAM prompts used."""

    losses: dict[str, Tensor]
    mask_logits: Tensor
    coords: Tensor | None
    labels: Tensor | None
    found: Tensor  # (B,) bool: the answer held <SEG>


def view_boxes(encoder, image_sizes: Sequence[tuple[int, int]] | None, batch: int, side: int) -> Tensor:
    """(B, 4) x0, y0, x1, y1: the part of each photo the encoder keeps (:meth:`VisionEncoder.view_box`), in
    SAM's ``side`` x ``side`` input frame (mmkit resizes a photo to that square for SAM, and its masks with it).
    ``image_sizes``: (width, height) per photo; None: square photos."""
    sizes = [(side, side)] * batch if image_sizes is None else [(int(w), int(h)) for w, h in image_sizes]
    if len(sizes) != batch:
        raise ValueError(f"{len(sizes)} image sizes for a batch of {batch}")
    boxes = []
    for w, h in sizes:
        x0, y0, x1, y1 = encoder.view_box(w, h)
        boxes.append([x0 * side / w, y0 * side / h, x1 * side / w, y1 * side / h])
    return torch.tensor(boxes, dtype=torch.float32)


class ReadModel(nn.Module):
    """VLM + ``<SEG>`` head + SAM. ``vlm``: a :class:`~mmkit.models.VisionLanguageModel`; ``sam``: a
    transformers ``SamModel`` (its image encoder stays frozen; image embeddings are computed outside, once)."""

    def __init__(self, vlm, sam, config: SegConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or SegConfig()
        width = int(sam.config.prompt_encoder_config.hidden_size)
        if width != config.prompt_dim:
            raise ValueError(f"this SAM's prompts are {width} wide but SegConfig.prompt_dim is {config.prompt_dim}; "
                             "set prompt_dim to the SAM checkpoint's prompt_encoder_config.hidden_size")
        self.vlm, self.sam = vlm, sam
        llm = vlm.llm
        if config.seg_token in llm.special_tokens:
            self.seg_id = llm.tokenizer.convert_tokens_to_ids(config.seg_token)
        else:
            (self.seg_id,) = llm.add_special_tokens([config.seg_token])
        if config.lora_r > 0 and llm.lora is None:
            llm.add_lora(LoRASpec(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                                  target_modules=config.lora_targets))
        if config.word_embeddings == "all":
            llm.train_word_embeddings()
        elif llm.word_embeddings_train:
            raise ValueError("this LLM trains its whole word-embedding table but SegConfig.word_embeddings is "
                             "'new_rows'; set word_embeddings='all' (or start from an LLM whose table is frozen)")
        layer = None if config.sasp is None else config.sasp.layer
        depth = getattr(getattr(llm.model, "config", None), "num_hidden_layers", None)
        if layer is not None and depth is not None and not -(depth + 1) <= layer <= depth:
            raise ValueError(f"SasPConfig.layer={layer}, but the LLM has {depth} decoder layers (0: the input "
                             f"embeddings, {depth}: the last; None: the last after the final norm)")
        self.head = SegHead(SegHeadConfig(llm_dim=llm.hidden_size, prompt_dim=config.prompt_dim,
                                          input_norm=config.head_input_norm))
        for p in sam.parameters():
            p.requires_grad_(False)
        if config.train_mask_decoder:
            for p in sam.mask_decoder.parameters():
                p.requires_grad_(True)

    # ------------------------------------------------------------------ pieces
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapters: the connector, the LLM's LoRA and new rows (or all word embeddings), the head, SAM's
        mask decoder."""
        params = self.vlm.trainable_parameters() + list(self.vlm.llm.trainable_parameters())
        params += list(self.head.parameters()) + [p for p in self.sam.mask_decoder.parameters() if p.requires_grad]
        seen, out = set(), []
        for p in params:
            if id(p) not in seen and p.requires_grad:
                seen.add(id(p))
                out.append(p)
        return out

    def seg_states(self, out: LMOutput, layer: int | None = None) -> tuple[Tensor, Tensor]:
        """The state predicting each sample's first ``<SEG>``: (B, d), and (B,) bool whether there is one.
        ``layer``: from that kept layer (``out.extras["layers"]``) instead of the last."""
        hidden = self._states(out, layer)
        ids = out.batch.input_ids.to(hidden.device)  # (B, L)
        is_seg = ids[:, 1:] == self.seg_id  # position t predicts token t + 1
        found = is_seg.any(1)
        first = torch.argmax(is_seg.to(torch.int8), dim=1)  # first True (0 when none; masked by ``found``)
        states = hidden[:, :-1].gather(1, first[:, None, None].expand(-1, 1, hidden.shape[-1]))
        return states[:, 0], found

    def image_states(self, out: LMOutput, num_tokens: int, layer: int | None = None) -> Tensor:
        """The states at the image positions (last layer, or the kept ``layer``): (B, num_tokens, d), in
        image-token order (a stable sort of the image mask finds them without a host read)."""
        hidden = self._states(out, layer)
        mask = out.batch.image_mask.to(hidden.device)  # (B, L)
        order = torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :num_tokens]
        return hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))

    @staticmethod
    def _states(out: LMOutput, layer: int | None) -> Tensor:
        return out.hidden_states if layer is None else out.extras["layers"][layer]

    @property
    def sasp_layer(self) -> int | None:
        """The LLM layer SasP compares states at (None: the last, after the final norm, as READ does)."""
        return None if self.config.sasp is None else self.config.sasp.layer

    def _run_llm(self, batch, embeds: Tensor) -> LMOutput:
        layer = self.sasp_layer
        return self.vlm.llm(batch, embeds, keep_layers=() if layer is None else (layer,))

    def similarity(self, out: LMOutput, num_tokens: int) -> Tensor:
        """SasP's raw map, ``<SEG>`` state . image states on the token grid (at SasP's layer): (B, h, w).
        Defined for the ``<SEG>``-only baseline too (READ's premise is that such a model's map already marks
        the target)."""
        seg, _ = self.seg_states(out, self.sasp_layer)
        image = self.image_states(out, num_tokens, self.sasp_layer).float()
        return similarity_map(seg.float(), image, self.grid(image.shape[1]))

    def _has_grid(self, num_tokens: int) -> bool:
        """Whether the image tokens lie on a grid (always with SasP; a <SEG>-only model may have any count)."""
        return self.config.grid is not None or int(round(num_tokens**0.5)) ** 2 == num_tokens

    def grid(self, num_tokens: int) -> tuple[int, int]:
        if self.config.grid is not None:
            if self.config.grid[0] * self.config.grid[1] != num_tokens:
                raise ValueError(f"SegConfig.grid {self.config.grid} does not hold the {num_tokens} image tokens")
            return self.config.grid
        side = int(round(num_tokens**0.5))
        if side * side != num_tokens:
            raise ValueError(f"{num_tokens} image tokens are not a square grid; set SegConfig.grid=(rows, cols)")
        return side, side

    def grid_boxes(self, image_sizes: Sequence[tuple[int, int]] | None, batch: int) -> Tensor:
        """Where each photo's token grid lies in SAM's square input frame: (B, 4) x0, y0, x1, y1 (the encoder
        sees its ``view_box`` of the photo; SAM sees all of it, resized to the square). ``image_sizes``:
        (width, height) per photo; None: square photos. Needs ``vlm.encoder``."""
        encoder = self.vlm.encoder
        if encoder is None:
            raise ValueError("SasP's grid_view='encoder' places the token grid on the encoder's crop of the photo, "
                             "and this model has no encoder: load it with one, pass grid_boxes, or use "
                             "SasPConfig(grid_view='image')")
        return view_boxes(encoder, image_sizes, batch, sam_input_size(self.sam))

    def prompts_for(self, out: LMOutput, num_tokens: int, grid_boxes: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """SAM prompts from one LLM pass with ``num_tokens`` image tokens per sample: the ``<SEG>`` prompt
        (B, 256), ``found`` (B,), points (B, P, 2) and labels (B, P) (None without SasP). ``grid_boxes``:
        (B, 4) where the token grid lies in SAM's frame (:func:`view_boxes`); None: from ``vlm.encoder`` for
        square photos (``grid_view='encoder'``)."""
        seg, found = self.seg_states(out)
        extra = self.head(seg.float(), found)
        coords = labels = None
        if self.config.sasp is not None:
            layer = self.sasp_layer
            image = self.image_states(out, num_tokens, layer).float()
            if layer is not None:
                seg, _ = self.seg_states(out, layer)
            size = sam_input_size(self.sam)
            box = None
            if self.config.sasp.grid_view == "encoder":
                box = self.grid_boxes(None, image.shape[0]) if grid_boxes is None else grid_boxes
                box = box.to(image.device)
            coords, labels = sasp_points(seg.float(), image, grid=self.grid(image.shape[1]), image_size=(size, size),
                                         config=self.config.sasp, box=box)
            labels = torch.where(found[:, None], labels, torch.full_like(labels, PADDING))
        return extra, found, coords, labels

    def _grid_embeds(self, features: Tensor, feature_mask: Tensor | None) -> Tensor:
        """Connector output (B, N, d) with the same N for every sample (READ's image-token grid)."""
        embeds, mask = self.vlm.image_embeds(features, feature_mask)
        if mask is not None:
            raise ValueError("READ needs a connector that gives every image the same token grid (e.g. linear, vlap); "
                             f"{self.vlm.connector.kind!r} gives ragged token counts")
        return embeds

    def teacher_forced_seg_states(self, features: Tensor, prompts: Sequence[str], targets: Sequence[str], *,
                                  feature_mask: Tensor | None = None, layers: Sequence[int | None] = (None,)
                                  ) -> tuple[list[Tensor], Tensor]:
        """The state predicting each ``targets`` answer's first ``<SEG>`` when the LLM reads ``prompts`` +
        ``targets``, as in training, at each of ``layers`` (None: the last, after the final norm, as the head
        reads it; k: transformers' ``hidden_states[k]``, the output of decoder layer k, as ``SasPConfig.layer``;
        k = the depth is the last after the final norm again), from one LLM pass: a list of (B, d), and (B,)
        bool whether the answer holds one. For probes: call it in eval mode (LoRA dropout is active otherwise)."""
        if not layers:
            raise ValueError("teacher_forced_seg_states needs at least one layer (None: the last)")
        embeds = self._grid_embeds(features, feature_mask)
        llm = self.vlm.llm
        keep = tuple(k for k in layers if k is not None)
        out = llm(llm.build_batch(prompts, embeds.shape[1], targets).to(llm.device), embeds, keep_layers=keep)
        picked = [self.seg_states(out, k) for k in layers]  # ``found`` is the same at every layer
        return [state for state, _ in picked], picked[0][1]

    # ------------------------------------------------------------------ training
    def forward(
        self,
        features: Tensor,
        prompts: Sequence[str],
        targets: Sequence[str],
        sam_embeddings: Tensor,
        masks: Tensor,
        *,
        feature_mask: Tensor | None = None,
        grid_boxes: Tensor | None = None,
    ) -> SegOutput:
        """features (B, N, Dv) encoder tokens; targets hold ``<SEG>``; sam_embeddings (B, C, s, s) from SAM's
        frozen image encoder; masks (B, H, W) {0, 1} ground truth; grid_boxes (B, 4): where the token grid
        lies in SAM's frame (:func:`view_boxes`, for training on cached features without the encoder).
        Samples whose target lacks ``<SEG>`` add only CE."""
        cfg = self.config
        embeds = self._grid_embeds(features, feature_mask)
        llm = self.vlm.llm
        batch = llm.build_batch(prompts, embeds.shape[1], targets).to(llm.device)
        out = self._run_llm(batch, embeds)
        extra, found, coords, labels = self.prompts_for(out, embeds.shape[1], grid_boxes)
        logits, _ = decode_masks(self.sam, sam_embeddings, coords, labels, extra=extra)
        logits = upscale_masks(logits, tuple(masks.shape[-2:]))[:, 0]  # (B, H, W)
        target = masks.to(logits.dtype)
        keep = found.to(logits.dtype)
        denom = keep.sum().clamp_min(1.0)
        bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1) * keep).sum()
        bce = bce / denom
        dice = (dice_loss(logits, target, cfg.dice_smooth) * keep).sum() / denom
        loss = cfg.ce_weight * out.loss + cfg.bce_weight * bce + cfg.dice_weight * dice
        return SegOutput({"loss": loss, "ce_loss": out.loss, "bce_loss": bce, "dice_loss": dice}, logits, coords,
                         labels, found)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, directory, *, llm_name: str, sam_name: str, encoder: dict | None = None,
                        seg_prompt: str | None = None, seg_answer: str | None = None, metadata: dict | None = None):
        """A bundle: the connector, the LLM's rows + LoRA, the head and SAM's mask decoder as adapter folders;
        the encoder, the LLM (``llm_name``) and SAM (``sam_name``, whose image encoder stays frozen) named, and
        the prompt template and answer it was trained with (``seg_prompt`` with ``{expression}``, ``seg_answer``
        with ``<SEG>``)."""
        from ..models.bundle import write_bundle

        vlm = self.vlm
        parts = {
            "llm": {"name": llm_name, "chat_template": vlm.llm.chat_template},
            "prompts": {"caption": vlm.caption_prompt, "vqa": vlm.vqa_prompt},
            "sam": {"name": str(sam_name)},
            "seg": self.config.to_dict(),
        }
        if seg_prompt is not None:
            parts["seg_prompt"] = seg_prompt
        if seg_answer is not None:
            parts["seg_answer"] = seg_answer
        if encoder is not None:
            parts["encoder"] = encoder
        elif vlm.encoder is not None and hasattr(vlm.encoder, "spec"):
            parts["encoder"] = {"spec": vlm.encoder.spec, **getattr(vlm.encoder, "load_kwargs", {})}
        adapters = {"connector": vlm.connector, "llm": _LMTrainable(vlm.llm), "head": self.head,
                    "mask_decoder": SamMaskDecoderAdapter.of(self.sam)}
        return write_bundle(directory, kind="read", parts=parts, adapters=adapters, metadata=metadata)

    @classmethod
    def from_pretrained(cls, directory, *, encoder=None, llm=None, sam=None, load_encoder: bool = True) -> ReadModel:
        """Rebuild a saved READ model: the frozen parts from the names in ``bundle.json`` (unless given), the
        trained parts from its adapter folders. Returned in eval mode, as transformers' ``from_pretrained``
        (dropout off; with ``head_input_norm="batch"`` the running statistics are used, never moved): call
        ``.train()`` to fine-tune it further."""
        from ..adapters import load_adapter, load_adapter_weights
        from ..models import VisionLanguageModel
        from ..models.bundle import read_bundle

        bundle = read_bundle(directory)
        if bundle["kind"] != "read":
            raise ValueError(f"{directory} holds a {bundle['kind']!r} model, not a READ segmentation model")
        parts, folders = bundle["parts"], bundle["adapters"]
        if sam is None:
            sam = load_sam(parts["sam"]["name"])
        vlm = VisionLanguageModel.from_pretrained(directory, encoder=encoder, llm=llm, load_encoder=load_encoder)
        vlm.llm.load_trainable(folders["llm"])
        config = saved_seg_config(parts["seg"])
        model = cls(vlm, sam, config)  # finds the <SEG> row and LoRA the trainable folder added
        load_adapter_weights(model.head, folders["head"])
        decoder, _ = load_adapter(folders["mask_decoder"])
        saved, target = decoder.decoder.state_dict(), model.sam.mask_decoder.state_dict()
        differ = [f"{k} saved {tuple(v.shape)}, this SAM {tuple(target[k].shape)}" for k, v in saved.items()
                  if k in target and v.shape != target[k].shape]
        differ += [f"{k} only in the saved decoder" for k in saved.keys() - target.keys()]
        differ += [f"{k} only in this SAM" for k in target.keys() - saved.keys()]
        if differ:
            more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
            raise ValueError(f"{folders['mask_decoder']} does not fit the mask decoder of SAM {parts['sam']['name']!r}: "
                             f"{'; '.join(sorted(differ)[:3])}{more}. Load the bundle with the SAM it was trained on.")
        model.sam.mask_decoder.load_state_dict(saved)
        return model.eval()

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def segment(
        self,
        features: Tensor,
        prompts: Sequence[str],
        sam_embeddings: Tensor,
        size: tuple[int, int],
        *,
        max_new_tokens: int = 16,
        feature_mask: Tensor | None = None,
        without_points: bool = False,
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[dict]:
        """Answer each prompt, then segment: one dict per sample with ``text``, ``mask`` ((H, W) bool, or None
        when the answer holds no ``<SEG>``: "no mask"), the SAM ``points`` / ``labels`` used, and SasP's raw
        ``similarity`` map (h, w) of the ``<SEG>`` state, that ``seg_state`` (d,) and the ``prompt`` (256,) the
        head made of it (these three None without ``<SEG>``). ``image_sizes``: the photos'
        (width, height) (None: square). ``without_points``: also decode from the ``<SEG>`` prompt alone (SasP's
        points dropped, the same answer and states) into ``mask_without_points``: an ablation of what the points
        add (only SAM's decoder again)."""
        llm = self.vlm.llm
        embeds = self._grid_embeds(features, feature_mask)
        batch = llm.build_batch(prompts, embeds.shape[1]).to(llm.device)
        ids = llm.generate_ids(batch, embeds, max_new_tokens=max_new_tokens, stop_at_newline=True)
        answers = [llm.tokenizer.decode(row[row != llm.pad_token_id], skip_special_tokens=False).strip() for row in ids]
        answers = [a.split("\n", 1)[0].strip() for a in answers]
        # one teacher-forced pass over prompt + answer gives the states (the same as training reads them)
        full = llm.build_batch(prompts, embeds.shape[1], answers).to(llm.device)
        out = self._run_llm(full, embeds)
        boxes = None
        if self.config.sasp is not None and self.config.sasp.grid_view == "encoder":
            boxes = self.grid_boxes(image_sizes, embeds.shape[0])
        extra, found, coords, labels = self.prompts_for(out, embeds.shape[1], boxes)
        sim = self.similarity(out, embeds.shape[1]) if self._has_grid(embeds.shape[1]) else None
        seg, _ = self.seg_states(out)  # (B, d): the state the head turned into ``extra``
        logits, _ = decode_masks(self.sam, sam_embeddings, coords, labels, extra=extra)
        masks = upscale_masks(logits, size)[:, 0] > 0
        bare = None
        if without_points:
            bare_logits, _ = decode_masks(self.sam, sam_embeddings, None, None, extra=extra)
            bare = upscale_masks(bare_logits, size)[:, 0] > 0
        results = []
        for i, text in enumerate(answers):
            has = bool(found[i])
            results.append({
                "text": text,
                "mask": masks[i].cpu() if has else None,
                "points": None if coords is None or not has else coords[i].cpu(),
                "labels": None if labels is None or not has else labels[i].cpu(),
                "similarity": sim[i].cpu() if has and sim is not None else None,
                "seg_state": seg[i].float().cpu() if has else None,
                "prompt": extra[i].cpu() if has else None,
            })
            if bare is not None:
                results[-1]["mask_without_points"] = bare[i].cpu() if has else None
        return results


register_adapter(SegHead)
register_adapter(SamMaskDecoderAdapter)
