"""``VisionLanguageModel``: frozen vision encoder -> trainable connector -> frozen LLM.

Only the connector trains and only the connector is saved: :meth:`VisionLanguageModel.save_pretrained`
writes a bundle (``bundle.json`` naming the encoder spec, the LLM and the prompts, plus the connector's
adapter folder; see :mod:`mmkit.models.bundle`), and :meth:`VisionLanguageModel.from_pretrained` rebuilds
the whole model from it (or from a single connector folder written by older mmkit).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..connectors.base import Connector, LossContext, load_connector, masked_mean
from ..llm.frozen import IMAGE_SLOT, IMAGE_TOKEN, FrozenLM
from ..losses.assignment import prototype_scores
from .bundle import read_bundle, write_bundle

CAPTION_PROMPT = f"{IMAGE_TOKEN}Caption:"
VQA_PROMPT = f"{IMAGE_TOKEN}Question: {{question}} Answer:"


class VisionLanguageModel(nn.Module):
    """Frozen encoder + connector + frozen LLM.

    ``encoder`` may be None when training from cached features (B, N, Dv).
    """

    def __init__(
        self,
        encoder: nn.Module | None,
        connector: Connector,
        llm: FrozenLM,
        *,
        caption_prompt: str = CAPTION_PROMPT,
        vqa_prompt: str = VQA_PROMPT,
    ) -> None:
        super().__init__()
        cfg = connector.config
        if encoder is not None and getattr(encoder, "dim", cfg.vision_dim) != cfg.vision_dim:
            raise ValueError(
                f"connector expects vision features of width {cfg.vision_dim} but encoder "
                f"{getattr(encoder, 'spec', type(encoder).__name__)} gives {encoder.dim}"
            )
        if cfg.llm_dim != llm.hidden_size:
            raise ValueError(
                f"connector maps into width {cfg.llm_dim} but the LLM's hidden size is {llm.hidden_size}"
            )
        self.encoder = encoder
        self.connector = connector
        self.llm = llm
        self.caption_prompt = caption_prompt
        self.vqa_prompt = vqa_prompt

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        encoder: nn.Module | None = None,
        llm: FrozenLM | None = None,
        load_encoder: bool = True,
    ) -> VisionLanguageModel:
        """Rebuild the model from a bundle folder (or an older single-connector folder): the connector's
        weights from the folder, the encoder and the LLM from the specs it names unless given."""
        bundle = read_bundle(directory)
        if "connector" not in bundle["adapters"]:
            raise ValueError(f"{directory}: the bundle holds no connector (adapters: {sorted(bundle['adapters'])})")
        connector, _ = load_connector(bundle["adapters"]["connector"])
        parts = bundle["parts"]
        if encoder is None and load_encoder:
            if "encoder" not in parts:
                raise ValueError(f"{directory}: the bundle names no encoder; pass encoder=")
            from ..encoders import load_encoder as _load_encoder

            enc = parts["encoder"]
            encoder = _load_encoder(enc["spec"], **{k: v for k, v in enc.items() if k != "spec"})
        if llm is None:
            if "llm" not in parts:
                raise ValueError(f"{directory}: the bundle names no LLM; pass llm=")
            llm = FrozenLM.from_pretrained(parts["llm"]["name"], chat_template=parts["llm"].get("chat_template", False))
        prompts = parts.get("prompts", {})
        return cls(
            encoder, connector, llm,
            caption_prompt=prompts.get("caption", CAPTION_PROMPT), vqa_prompt=prompts.get("vqa", VQA_PROMPT),
        )

    from_connector = from_pretrained  # the name earlier versions used

    def save_pretrained(
        self, directory: str | os.PathLike, *, llm_name: str, encoder: dict | None = None, metadata: dict | None = None
    ) -> Path:
        """Write a bundle: the connector's adapter folder plus ``bundle.json`` naming the encoder (its spec, or
        ``encoder`` = {"spec": ..., load options}), the LLM ``llm_name`` and the prompts."""
        parts = {
            "llm": {"name": llm_name, "chat_template": self.llm.chat_template},
            "prompts": {"caption": self.caption_prompt, "vqa": self.vqa_prompt},
        }
        if encoder is not None:
            parts["encoder"] = encoder
        elif self.encoder is not None and hasattr(self.encoder, "spec"):
            parts["encoder"] = {"spec": self.encoder.spec, **getattr(self.encoder, "load_kwargs", {})}
        return write_bundle(directory, kind="vlm", parts=parts, adapters={"connector": self.connector},
                            metadata=metadata)

    @staticmethod
    def bundle_parts(directory: str | os.PathLike) -> dict:
        """The frozen parts a saved model names: {"encoder": {"spec", ...}, "llm": {"name", ...}, "prompts"}."""
        return read_bundle(directory)["parts"]

    # ------------------------------------------------------------------ pieces
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.connector.parameters() if p.requires_grad]

    @torch.no_grad()
    def image_features(self, images: Sequence) -> Tensor:
        """Frozen encoder tokens (B, N, Dv) for PIL images / paths."""
        if self.encoder is None:
            raise ValueError("this model was built without an encoder; pass precomputed features instead")
        return self.encoder.encode(images).tokens

    def image_embeds(self, features: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Encoder tokens (B, N, Dv) with an optional (B, N) mask -> LLM input embeddings (B, M, d) and their
        (B, M) mask (None: every sample has all M)."""
        dtype = self.llm.word_embeddings().dtype
        device = self.connector_device
        tokens, out_mask = self.connector(features.to(device), None if mask is None else mask.to(device))
        return tokens.to(dtype), out_mask

    @property
    def connector_device(self) -> torch.device:
        return next(self.connector.parameters()).device

    # ------------------------------------------------------------------ training
    def forward(
        self,
        features: Tensor,
        prompts: Sequence[str],
        targets: Sequence[str],
        *,
        alignment_texts: Sequence[str | None] | None = None,
        feature_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Losses for one batch. features (B, N, Dv) (+ ``feature_mask`` (B, N)); ``alignment_texts[i]`` is the
        caption paired with image i for the connector's own objective (None to skip that sample).
        Returns {"loss", "caption_loss", and the connector's logged terms}."""
        embeds, mask = self.image_embeds(features, feature_mask)  # (B, M, d), (B, M) or None
        batch = self.llm.build_batch(prompts, _token_counts(embeds, mask), targets).to(self.llm.device)
        out = {"caption_loss": self.llm.caption_loss(batch, embeds, mask)}
        total = out["caption_loss"]
        from accelerate.utils import extract_model_from_parallel

        # training under DDP / FSDP puts the wrapped connector here: its forward syncs, its objective is the model's
        connector = extract_model_from_parallel(self.connector)
        aux = connector.losses(embeds, mask, LossContext(llm=self.llm, texts=alignment_texts))
        if aux is not None:
            out.update(aux.logged)
            total = total + aux.total
        out["loss"] = total
        return out

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        images: Sequence | str | os.PathLike | None = None,
        features: Tensor | None = None,
        feature_mask: Tensor | None = None,
        max_new_tokens: int = 24,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        stop_at_newline: bool = True,
    ) -> list[str]:
        """Continue each prompt (one ``<image>`` each) about its image; returns one string per prompt.

        images: paths, PIL images or (H, W, 3) arrays (one per prompt; a single one is accepted as is), or
        features: precomputed encoder tokens (B, N, Dv) (+ ``feature_mask`` (B, N)). Greedy by default;
        ``do_sample`` with ``temperature`` / ``top_p`` (and a ``generator`` for repeatability) samples. A
        continuation ends at eos, after ``max_new_tokens``, or at its first line break (``stop_at_newline``).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if features is None:
            if images is None:
                raise ValueError("generate needs images= or features=")
            encoded = self.encoder.encode(_as_list(images)) if self.encoder is not None else None
            if encoded is None:
                raise ValueError("this model was built without an encoder; pass features= instead")
            features, feature_mask = encoded.tokens, encoded.mask
        if features.shape[0] != len(prompts):
            raise ValueError(f"{features.shape[0]} images for {len(prompts)} prompts")
        embeds, mask = self.image_embeds(features, feature_mask)
        batch = self.llm.build_batch(prompts, _token_counts(embeds, mask)).to(self.llm.device)
        return self.llm.generate(batch, embeds, image_mask=mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                 temperature=temperature, top_p=top_p, generator=generator,
                                 stop_at_newline=stop_at_newline)

    def caption(
        self,
        *,
        images: Sequence | str | os.PathLike | None = None,
        features: Tensor | None = None,
        max_new_tokens: int = 24,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> list[str]:
        """One caption per image (paths, PIL images, arrays; or ``features`` (B, N, Dv)), with the model's
        caption prompt. See :meth:`generate` for the decoding options."""
        n = features.shape[0] if features is not None else len(_as_list(images)) if images is not None else 0
        return self.generate([self.caption_prompt] * n, images=images, features=features, max_new_tokens=max_new_tokens,
                             do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator)

    def answer(
        self,
        questions: Sequence[str] | str,
        *,
        images: Sequence | str | os.PathLike | None = None,
        features: Tensor | None = None,
        max_new_tokens: int = 6,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> list[str]:
        """Answer ``questions[i]`` about image i (or ``features[i]``), with the model's VQA prompt. Questions are
        plain text: a literal ``<image>`` or ``{`` in them is kept as text. See :meth:`generate`."""
        questions = [questions] if isinstance(questions, str) else list(questions)
        empty = [i for i, q in enumerate(questions) if not q.strip()]
        if empty:
            raise ValueError(f"question {empty[0]} is empty; ask something about the image")
        template = self.vqa_prompt.replace(IMAGE_TOKEN, IMAGE_SLOT)
        prompts = [template.replace("{question}", q.strip()) for q in questions]
        return self.generate(prompts, images=images, features=features, max_new_tokens=max_new_tokens,
                             do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator)

    @torch.no_grad()
    def retrieval_similarity(
        self, features: Tensor, texts: Sequence[str], *, method: str = "cosine", batch_size: int = 64
    ) -> Tensor:
        """(num_images, num_texts) image-text scores in the LLM's word-embedding space.

        Both sides are expressed as assignment logits over the LLM's word embeddings (the VLAP codes):
        ``code_v = cos(mean(W f_v), E)``, ``code_t = cos(mean text hidden state, E)``.
        method="cosine": cosine similarity of the two code vectors (comparable for any connector);
        method="assignment": minus VLAP's swapped-prediction loss of the pair,
        ``1/2 [q_t . log softmax(code_v / tau) + q_v . log softmax(code_t / tau)]``, with the targets ``q``
        from the connector's own ``assign`` (the reading it was trained with; a balanced transport couples
        the ``batch_size`` images or texts of one chunk, like a training batch). Needs a connector with
        ``assign`` (VLAP).
        """
        if method not in ("cosine", "assignment"):
            raise ValueError(f"method must be 'cosine' or 'assignment', got {method!r}")
        if method == "assignment" and not hasattr(self.connector, "assign"):
            raise ValueError(f"method='assignment' needs a connector with assignment targets (e.g. 'vlap'); "
                             f"this one is {self.connector.kind!r}: use method='cosine'")
        prototypes = self.llm.word_embeddings()
        code_v = torch.cat([
            prototype_scores(masked_mean(*self.image_embeds(features[i : i + batch_size])), prototypes)
            for i in range(0, features.shape[0], batch_size)
        ])  # (I, V)
        code_t = torch.cat([
            prototype_scores(self.llm.text_features(texts[i : i + batch_size]), prototypes)
            for i in range(0, len(texts), batch_size)
        ])  # (T, V)
        if method == "cosine":
            return F.normalize(code_v, dim=-1) @ F.normalize(code_t, dim=-1).t()
        connector = self.connector
        tau = connector.config.tau
        q_v = torch.cat([connector.assign(code_v[i : i + batch_size]) for i in range(0, len(code_v), batch_size)])
        q_t = torch.cat([connector.assign(code_t[i : i + batch_size]) for i in range(0, len(code_t), batch_size)])
        log_p_v = F.log_softmax(code_v / tau, dim=-1)  # (I, V)
        log_p_t = F.log_softmax(code_t / tau, dim=-1)  # (T, V)
        return 0.5 * (log_p_v @ q_t.t() + q_v @ log_p_t.t())


def _token_counts(embeds: Tensor, mask: Tensor | None) -> int | list[int]:
    """Image tokens per sample: all of ``embeds``' (B, M, d) when there is no mask, else each row's True count
    (read on the host: the prompt layout depends on it)."""
    return embeds.shape[1] if mask is None else mask.sum(dim=1).tolist()


def _as_list(images) -> list:
    """One input given on its own (a path, a PIL image, an (H, W, 3) array, a clip) -> [it]; lists as they are."""
    if isinstance(images, (list, tuple)) or getattr(images, "ndim", 0) == 4:
        return list(images)
    return [images]
