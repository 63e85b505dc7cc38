"""``VisionLanguageModel``: frozen vision encoder -> trainable connector -> frozen LLM.

Only the connector trains and only the connector is saved (``connector.safetensors`` + ``connector.json``,
the JSON also records the encoder spec, the LLM name and the prompts, so ``from_connector`` rebuilds the
whole model from the folder).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..connectors.base import Connector, load_connector, read_connector_json
from ..llm.frozen import IMAGE_TOKEN, FrozenLM
from ..losses.assignment import prototype_scores

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
    def from_connector(
        cls,
        directory: str | os.PathLike,
        *,
        encoder: nn.Module | None = None,
        llm: FrozenLM | None = None,
        load_encoder: bool = True,
    ) -> VisionLanguageModel:
        """Rebuild the model around a saved connector; encoder and LLM come from its metadata unless given."""
        connector, meta = load_connector(directory)
        if encoder is None and load_encoder:
            if "encoder" not in meta:
                raise ValueError(f"{directory}: connector metadata names no encoder; pass encoder=")
            from ..encoders import load_encoder as _load_encoder

            enc = meta["encoder"]
            encoder = _load_encoder(enc["spec"], **{k: v for k, v in enc.items() if k != "spec"})
        if llm is None:
            if "llm" not in meta:
                raise ValueError(f"{directory}: connector metadata names no LLM; pass llm=")
            llm = FrozenLM.from_pretrained(meta["llm"]["name"], chat_template=meta["llm"].get("chat_template", False))
        prompts = meta.get("prompts", {})
        return cls(
            encoder, connector, llm,
            caption_prompt=prompts.get("caption", CAPTION_PROMPT), vqa_prompt=prompts.get("vqa", VQA_PROMPT),
        )

    def save_connector(self, directory: str | os.PathLike, *, llm_name: str, extra: dict | None = None) -> Path:
        meta = {
            "llm": {"name": llm_name, "chat_template": self.llm.chat_template},
            "prompts": {"caption": self.caption_prompt, "vqa": self.vqa_prompt},
        }
        if self.encoder is not None and hasattr(self.encoder, "spec"):
            meta["encoder"] = {"spec": self.encoder.spec, **getattr(self.encoder, "load_kwargs", {})}
        meta.update(extra or {})
        return self.connector.save(directory, metadata=meta)

    @staticmethod
    def connector_metadata(directory: str | os.PathLike) -> dict:
        return read_connector_json(directory).get("metadata", {})

    # ------------------------------------------------------------------ pieces
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.connector.parameters() if p.requires_grad]

    @torch.no_grad()
    def image_features(self, images: Sequence) -> Tensor:
        """Frozen encoder tokens (B, N, Dv) for PIL images / paths."""
        if self.encoder is None:
            raise ValueError("this model was built without an encoder; pass precomputed features instead")
        return self.encoder.encode(images).tokens

    def image_embeds(self, features: Tensor) -> Tensor:
        """(B, N, Dv) -> (B, N', d) LLM input embeddings."""
        dtype = self.llm.word_embeddings().dtype
        return self.connector(features.to(self.connector_device)).to(dtype)

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
    ) -> dict[str, Tensor]:
        """Losses for one batch. features (B, N, Dv); ``alignment_texts[i]`` is the caption paired with
        image i for the connector's auxiliary objective (None to skip that sample)."""
        embeds = self.image_embeds(features)  # (B, N, d)
        batch = self.llm.build_batch(prompts, embeds.shape[1], targets).to(self.llm.device)
        out = {"caption_loss": self.llm.caption_loss(batch, embeds)}
        total = out["caption_loss"]
        if self.connector.needs_text_features and alignment_texts is not None:
            keep = [i for i, t in enumerate(alignment_texts) if t]
            if len(keep) >= 2:  # Sinkhorn's equipartition needs a batch
                text_features = self.llm.text_features([alignment_texts[i] for i in keep])
                aux = self.connector.auxiliary_loss(embeds[keep], text_features, self.llm.word_embeddings())
                out.update({k: v for k, v in aux.items() if k != "weighted"})
                total = total + aux["weighted"]
        out["loss"] = total
        return out

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        features: Tensor | None = None,
        images: Sequence | None = None,
        max_new_tokens: int = 24,
        **sampling,
    ) -> list[str]:
        if features is None:
            if images is None:
                raise ValueError("generate needs images= or features=")
            features = self.image_features(images)
        if features.shape[0] != len(prompts):
            raise ValueError(f"{features.shape[0]} images for {len(prompts)} prompts")
        embeds = self.image_embeds(features)
        batch = self.llm.build_batch(prompts, embeds.shape[1]).to(self.llm.device)
        return self.llm.generate(batch, embeds, max_new_tokens=max_new_tokens, **sampling)

    def caption(self, *, images: Sequence | None = None, features: Tensor | None = None, **kw) -> list[str]:
        n = features.shape[0] if features is not None else len(images)
        return self.generate([self.caption_prompt] * n, images=images, features=features, **kw)

    def answer(
        self, questions: Sequence[str], *, images: Sequence | None = None, features: Tensor | None = None, **kw
    ) -> list[str]:
        prompts = [self.vqa_prompt.format(question=q.strip()) for q in questions]
        return self.generate(prompts, images=images, features=features, max_new_tokens=kw.pop("max_new_tokens", 6), **kw)

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
            prototype_scores(self.image_embeds(features[i : i + batch_size]).mean(1), prototypes)
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
