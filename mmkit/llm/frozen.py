"""``FrozenLM``: a frozen Hugging Face causal LM that reads image embeddings in place of ``<image>``.

A prompt holds one ``<image>`` placeholder per image. It is expanded into ``N_b`` placeholder positions
(N_b = that sample's image tokens from the connector; samples may differ); :meth:`FrozenLM.embed` writes
the image embeddings there, after checking that the counts agree. The placeholder never enters the
vocabulary, so the LM's embedding matrix is untouched.

The LM stays frozen unless a recipe asks for trainable weights of three kinds, all saved on their own as
one adapter folder (:meth:`FrozenLM.save_trainable`): rows for added special tokens
(:meth:`FrozenLM.add_special_tokens`, e.g. READ's ``<SEG>``), LoRA through peft (:meth:`FrozenLM.add_lora`),
and the whole word-embedding table and output head (:meth:`FrozenLM.train_word_embeddings`, LISA's and
READ's ``embed_tokens`` + ``lm_head``).

Training sequences are ``[prompt with image positions][target][eos]`` with the loss on the target only;
generation left-pads the prompts, encodes the whole prefix (image included) once, then decodes token by
token from the KV cache.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGE_TOKEN = "<image>"
# Where an image goes in a prompt that also holds user text: templates put IMAGE_SLOT (a private-use
# character) in place of IMAGE_TOKEN before inserting the text, so a user's literal "<image>" stays text.
IMAGE_SLOT = "\ue000"
IGNORE_INDEX = -100
TRAINABLE_KIND = "llm_trainable"  # adapter.json kind of the folder save_trainable writes


@dataclass
class LoRASpec:
    """LoRA on the LM through peft (``LoraConfig``): rank, alpha, dropout, the module names it wraps."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass
class LMOutput:
    """What one forward pass over an :class:`LMBatch` gives: ``loss`` (mean next-token cross-entropy over the
    targets, None without labels), the last layer's ``hidden_states`` (B, L, d) and the batch itself (its
    ``input_ids`` and ``image_mask`` locate the image tokens and e.g. an added ``<SEG>`` token)."""

    loss: Tensor | None
    hidden_states: Tensor
    batch: LMBatch
    extras: dict = field(default_factory=dict)


@dataclass
class LMBatch:
    """Token ids with image placeholders. All (B, L); ``labels`` is None for generation batches."""

    input_ids: Tensor
    attention_mask: Tensor
    image_mask: Tensor
    labels: Tensor | None = None

    def to(self, device: torch.device | str) -> LMBatch:
        return LMBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.image_mask.to(device),
            None if self.labels is None else self.labels.to(device),
        )


class FrozenLM(nn.Module):
    """A causal LM with every parameter frozen, plus placeholder expansion, merging and generation.

    Args:
        model: a ``transformers`` causal LM (``AutoModelForCausalLM``).
        tokenizer: its tokenizer.
        chat_template: wrap prompts in the tokenizer's chat template (user turn + generation prompt).
        text_feature_memo: how many :meth:`text_features` rows to remember (the LM is frozen, so a text's
            features never change; VLAP asks for every training caption once per epoch). 0 turns it off.
    """

    def __init__(
        self, model: nn.Module, tokenizer, *, chat_template: bool = False, text_feature_memo: int = 65536
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        if text_feature_memo < 0:
            raise ValueError(f"text_feature_memo must be >= 0, got {text_feature_memo}")
        self.text_feature_memo = text_feature_memo
        self._memo: OrderedDict[str, Tensor] = OrderedDict()  # text -> (d,) fp32 features on the CPU
        self.model.requires_grad_(False)
        self.model.eval()
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos_token_id; mmkit needs one to end targets and generation")
        self.eos_token_id = int(eos)
        self.pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
        # Any id works as the placeholder: its embedding is overwritten before the LM sees it.
        self.placeholder_id = self.pad_token_id
        self.special_tokens: list[str] = []
        self.new_rows: nn.Parameter | None = None  # (n, d) rows of the added special tokens
        self.lora: LoRASpec | None = None
        self.word_embeddings_train = False  # whether the original embedding table / output head train too
        self._newline_ids: Tensor | None = None

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, chat_template: bool = False
    ) -> FrozenLM:
        from .loading import load_causal_lm

        model, tokenizer = load_causal_lm(name_or_path, dtype=dtype)
        return cls(model, tokenizer, chat_template=chat_template)

    def train(self, mode: bool = True) -> FrozenLM:
        super().train(mode)
        self.model.eval()  # frozen: the LM's own dropout stays off even while adapters train
        if self.lora is not None and self.lora.dropout > 0:  # LoRA's dropout follows the mode, as in peft
            for name, module in self.model.named_modules():
                if "lora_dropout" in name:
                    module.train(mode)
        return self

    # ------------------------------------------------------------------ properties
    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def word_embeddings(self) -> Tensor:
        """The input word-embedding matrix (V, d) (VLAP's prototypes)."""
        return self.model.get_input_embeddings().weight

    # ------------------------------------------------------------------ the only trainable parts
    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Add ``tokens`` (e.g. ``["<SEG>"]``) to the tokenizer with new embedding rows, the only LM rows that
        train unless :meth:`train_word_embeddings` is on (initialised to the mean of the existing rows; tied LMs
        score them with the same rows). Returns their ids. Can be called once."""
        from .new_tokens import NewTokenEmbedding, NewTokenHead

        if self.new_rows is not None:
            raise ValueError(f"special tokens were already added ({self.special_tokens}); add them all in one call")
        tokens = list(tokens)
        if not tokens or len(set(tokens)) != len(tokens) or IMAGE_TOKEN in tokens:
            raise ValueError(f"special tokens must be distinct, non-empty and not {IMAGE_TOKEN!r}; got {tokens}")
        known = [t for t in tokens if t in self.tokenizer.get_vocab()]
        if known:
            raise ValueError(f"{known} already in the tokenizer's vocabulary; pick new token strings")
        self.tokenizer.add_tokens(tokens, special_tokens=True)
        ids = torch.tensor(self.tokenizer.convert_tokens_to_ids(tokens))
        base_in, base_out = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        init = base_in.weight.detach().mean(0, keepdim=True).repeat(len(tokens), 1)
        self.new_rows = nn.Parameter(init.clone())
        vocab = max(base_in.weight.shape[0], int(ids.max()) + 1)
        self.model.set_input_embeddings(NewTokenEmbedding(base_in, ids, self.new_rows))
        self.model.set_output_embeddings(NewTokenHead(base_out, ids, self.new_rows, vocab))
        self.special_tokens = tokens
        self._no_memo()
        return ids.tolist()

    def add_lora(self, spec: LoRASpec | None = None) -> None:
        """Wrap the LM's ``spec.target_modules`` with LoRA through peft (``inject_adapter_in_model``)."""
        from peft import LoraConfig, inject_adapter_in_model

        if self.lora is not None:
            raise ValueError("LoRA is already on this LM")
        spec = spec or LoRASpec()
        config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                            target_modules=list(spec.target_modules))
        try:
            inject_adapter_in_model(config, self.model)
        except ValueError as err:
            raise ValueError(f"LoRA target modules {list(spec.target_modules)} not found in the LM ({err})") from None
        if self.new_rows is not None:  # peft marks everything but LoRA frozen, added token rows included
            self.new_rows.requires_grad_(True)
        for weight in self.word_embedding_parameters().values() if self.word_embeddings_train else ():
            weight.requires_grad_(True)
        self.lora = spec
        self.train(self.training)  # new LoRA modules start in training mode whatever this LM's mode is
        self._no_memo()

    def train_word_embeddings(self) -> None:
        """Train the LM's original word-embedding table and output head as well (one matrix when the LM ties
        them, as SmolLM2 does): what LISA's and READ's code do (``embed_tokens`` and ``lm_head`` trainable).
        They are then saved with the other trainable weights (the table's full size). Calling it again is a
        no-op."""
        for weight in self.word_embedding_parameters().values():
            weight.requires_grad_(True)
        self.word_embeddings_train = True
        self._no_memo()

    def word_embedding_parameters(self) -> dict[str, nn.Parameter]:
        """The original (V, d) embedding table as ``embed_tokens`` and, when the LM does not tie its output
        head to it, the head's weight as ``lm_head`` (the parameters under the added-token wrappers)."""
        table = getattr(self.model.get_input_embeddings(), "base", self.model.get_input_embeddings()).weight
        head = getattr(self.model.get_output_embeddings(), "base", self.model.get_output_embeddings())
        out = {"embed_tokens": table}
        if head is not None and head.weight is not table:
            out["lm_head"] = head.weight
        return out

    def _no_memo(self) -> None:
        self.text_feature_memo = 0  # the LM now changes while training: remembered features would go stale
        self._memo.clear()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The added token rows, the LoRA weights and the word embeddings if they train (empty for a plain
        frozen LM)."""
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The trainable weights with plain keys: ``new_tokens``, ``embed_tokens`` (+ ``lm_head`` when untied)
        and the LoRA tensors under their module paths."""
        state = {}
        if self.new_rows is not None:
            state["new_tokens"] = self.new_rows.detach()
        if self.word_embeddings_train:
            state.update({k: v.detach() for k, v in self.word_embedding_parameters().items()})
        if self.lora is not None:
            from peft import get_peft_model_state_dict

            state.update(get_peft_model_state_dict(self.model, save_embedding_layers=False))
        return state

    def save_trainable(self, directory: str | os.PathLike, *, metadata: dict | None = None) -> Path:
        """Write the added tokens, LoRA and (when they train) the word embeddings as an adapter folder
        (``adapter.json`` + ``adapter.safetensors``)."""
        from safetensors.torch import save

        from ..config import atomic_write_bytes, atomic_write_text

        directory = Path(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        atomic_write_bytes(directory / "adapter.safetensors", save(state))
        config = {"special_tokens": self.special_tokens, "lora": None if self.lora is None else vars(self.lora),
                  "word_embeddings": self.word_embeddings_train}
        payload = {"kind": TRAINABLE_KIND, "config": config, "metadata": metadata or {}}
        atomic_write_text(directory / "adapter.json", json.dumps(payload, indent=2, sort_keys=True, default=list) + "\n")
        return directory

    def load_trainable(self, directory: str | os.PathLike) -> None:
        """Add the tokens / LoRA / trainable word embeddings a :meth:`save_trainable` folder describes (unless
        already there) and load them. A folder saved with the word embeddings frozen leaves this LM's own (its
        pretrained ones) in place, trainable or not."""
        from ..adapters import read_safetensors

        directory = Path(directory)
        path = directory / "adapter.json"
        payload = json.loads(path.read_text()) if path.is_file() else {}
        if payload.get("kind") != TRAINABLE_KIND:
            raise ValueError(f"{path} does not describe an LM's trainable weights (kind {payload.get('kind')!r}, "
                             f"expected {TRAINABLE_KIND!r})")
        config = payload["config"]
        if config.get("special_tokens") and not self.special_tokens:
            self.add_special_tokens(config["special_tokens"])
        if config.get("special_tokens", []) != self.special_tokens:
            raise ValueError(f"{path} holds rows for {config['special_tokens']}, this LM has {self.special_tokens}")
        if config.get("lora") and self.lora is None:
            spec = dict(config["lora"])
            spec["target_modules"] = tuple(spec["target_modules"])
            self.add_lora(LoRASpec(**spec))
        if config.get("word_embeddings"):
            self.train_word_embeddings()
        state = read_safetensors(directory / "adapter.safetensors")
        expected = {k: tuple(v.shape) for k, v in self.trainable_state_dict().items()
                    if config.get("word_embeddings") or k not in ("embed_tokens", "lm_head")}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if expected != got:
            raise ValueError(f"{directory} does not fit this LM: it holds {got}, the LM's trainable weights are {expected}")
        with torch.no_grad():
            if "new_tokens" in state:
                self.new_rows.copy_(state.pop("new_tokens"))
            for name, weight in self.word_embedding_parameters().items():
                if name in state:
                    weight.copy_(state.pop(name))
        if self.lora is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, state)

    # ------------------------------------------------------------------ tokenisation
    def format_prompt(self, prompt: str) -> str:
        if not self.chat_template:
            return prompt
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("chat_template=True but the tokenizer defines no chat template")
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def caption_token_ids(self, text: str) -> list[int]:
        """Token ids of a caption on its own, as ``text_features`` encodes it (stripped, one leading space)."""
        return self._encode_text(" " + text.strip())

    def prompt_ids(self, prompt: str, num_image_tokens: int, num_images: int = 1) -> tuple[list[int], list[bool]]:
        """Token ids of one formatted prompt with each ``<image>`` expanded to ``num_image_tokens`` slots."""
        text = self.format_prompt(prompt)
        pieces = text.split(IMAGE_SLOT if IMAGE_SLOT in text else IMAGE_TOKEN)
        if len(pieces) - 1 != num_images:
            raise ValueError(
                f"prompt {prompt!r} has {len(pieces) - 1} '{IMAGE_TOKEN}' placeholders for {num_images} image(s); "
                f"put exactly one '{IMAGE_TOKEN}' per image in the prompt"
            )
        ids: list[int] = []
        is_image: list[bool] = []
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if getattr(self.tokenizer, "add_bos_token", False) and bos is not None and not self.chat_template:
            ids.append(int(bos))
            is_image.append(False)
        for i, piece in enumerate(pieces):
            piece_ids = self._encode_text(piece)
            ids += piece_ids
            is_image += [False] * len(piece_ids)
            if i < len(pieces) - 1:
                ids += [self.placeholder_id] * num_image_tokens
                is_image += [True] * num_image_tokens
        return ids, is_image

    def target_ids(self, target: str) -> list[int]:
        """Target tokens + eos. Plain prompts end without a space, so the target gets a leading one."""
        text = target.strip()
        if not self.chat_template:
            text = " " + text
        return self._encode_text(text) + [self.eos_token_id]

    def build_batch(
        self,
        prompts: Sequence[str],
        num_image_tokens: int | Sequence[int],
        targets: Sequence[str] | None = None,
        *,
        padding_side: str | None = None,
    ) -> LMBatch:
        """Pad a batch. ``num_image_tokens``: one count for every sample, or one per sample (connectors whose
        token count depends on the input). Training (with targets) pads on the right; generation on the left."""
        if targets is not None and len(targets) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        counts = [num_image_tokens] * len(prompts) if isinstance(num_image_tokens, int) else list(num_image_tokens)
        if len(counts) != len(prompts) or any(int(c) < 0 for c in counts):
            raise ValueError(f"num_image_tokens must be one count >= 0 or one per prompt ({len(prompts)}), got "
                             f"{num_image_tokens!r}")
        side = padding_side or ("right" if targets is not None else "left")
        rows = []
        for i, prompt in enumerate(prompts):
            ids, img = self.prompt_ids(prompt, int(counts[i]))
            labels = [IGNORE_INDEX] * len(ids)
            if targets is not None:
                tgt = self.target_ids(targets[i])
                ids, img, labels = ids + tgt, img + [False] * len(tgt), labels + tgt
            rows.append((ids, img, labels))
        length = max(len(r[0]) for r in rows)
        B = len(rows)
        input_ids = torch.full((B, length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros(B, length, dtype=torch.long)
        image_mask = torch.zeros(B, length, dtype=torch.bool)
        labels = torch.full((B, length), IGNORE_INDEX, dtype=torch.long)
        for b, (ids, img, lab) in enumerate(rows):
            span = slice(0, len(ids)) if side == "right" else slice(length - len(ids), length)
            input_ids[b, span] = torch.tensor(ids)
            attention[b, span] = 1
            image_mask[b, span] = torch.tensor(img)
            labels[b, span] = torch.tensor(lab)
        return LMBatch(input_ids, attention, image_mask, labels if targets is not None else None)

    # ------------------------------------------------------------------ embedding and losses
    def embed(self, batch: LMBatch, image_embeds: Tensor | None, image_mask: Tensor | None = None) -> Tensor:
        """(B, L, d) input embeddings with the image slots filled from ``image_embeds`` (B, N, d); with
        ``image_mask`` (B, N), only each sample's True tokens fill its slots, in order."""
        embeds = self.model.get_input_embeddings()(batch.input_ids)  # (B, L, d)
        if image_embeds is not None and image_mask is not None:
            image_embeds = image_embeds[image_mask.to(torch.bool)].unsqueeze(0)  # (1, sum of counts, d)
        slots = int(batch.image_mask.sum())
        given = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        if slots != given:
            shape = None if image_embeds is None else tuple(image_embeds.shape)
            raise ValueError(
                f"the prompts have {slots} image positions but the connector gave {given} embeddings "
                f"(image_embeds {shape}); each prompt needs one '{IMAGE_TOKEN}' and the batch one image per prompt"
            )
        if slots == 0:
            return embeds
        if image_embeds.shape[-1] != embeds.shape[-1]:
            raise ValueError(
                f"image embeddings have width {image_embeds.shape[-1]} but the LM's hidden size is {embeds.shape[-1]}"
            )
        embeds = embeds.masked_scatter(batch.image_mask.unsqueeze(-1), image_embeds.to(embeds.dtype))
        return embeds

    def forward(self, batch: LMBatch, image_embeds: Tensor | None, image_mask: Tensor | None = None, *,
                keep_layers: tuple[int, ...] = ()) -> LMOutput:
        """One pass over ``batch`` with the image slots filled: the last hidden states (B, L, d) and, when the
        batch has targets, their mean next-token cross-entropy (the prompt and image are context only).
        ``keep_layers``: also return these layers' outputs in ``extras["layers"]`` ({k: (B, L, d)}; k as in
        transformers' ``hidden_states``: 0 the input embeddings, k the output of decoder layer k)."""
        embeds = self.embed(batch, image_embeds, image_mask)
        decoded = self.model.get_decoder()(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                                           output_hidden_states=bool(keep_layers))
        hidden = decoded.last_hidden_state  # (B, L, d)
        extras = {}
        if keep_layers:
            states = decoded.hidden_states
            for k in keep_layers:
                if not -len(states) <= k < len(states):
                    raise ValueError(f"keep_layers: layer {k} does not exist; this LM has {len(states) - 1} decoder "
                                     f"layers (0 is the input embeddings, {len(states) - 1} the last)")
            extras["layers"] = {k: states[k] for k in keep_layers}
        loss = None
        if batch.labels is not None:
            # position t predicts token t + 1: keep only positions whose next token is a target
            next_labels = batch.labels[:, 1:]
            keep = next_labels != IGNORE_INDEX  # (B, L-1)
            logits = self.model.get_output_embeddings()(hidden[:, :-1][keep])  # (T, V)
            loss = F.cross_entropy(logits.float(), next_labels[keep])
        return LMOutput(loss=loss, hidden_states=hidden, batch=batch, extras=extras)

    def caption_loss(self, batch: LMBatch, image_embeds: Tensor | None, image_mask: Tensor | None = None) -> Tensor:
        """Mean next-token cross-entropy over target tokens (see :meth:`forward`)."""
        if batch.labels is None:
            raise ValueError("caption_loss needs a batch built with targets")
        return self(batch, image_embeds, image_mask).loss

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> Tensor:
        """Mean-pooled last hidden states of each text on its own (B, d): VLAP's text representation.

        Rows already computed come from the memo (least recently used rows are dropped beyond
        ``text_feature_memo``); only new texts run through the LM, in one padded batch.
        """
        keys = [t.strip() for t in texts]
        new = [k for k in dict.fromkeys(keys) if k not in self._memo]
        fresh = dict(zip(new, self._compute_text_features(new))) if new else {}
        dtype = self.model.get_input_embeddings().weight.dtype
        rows = [fresh[k] if k in fresh else self._memo[k].to(self.device, dtype) for k in keys]
        if self.text_feature_memo:
            for k in keys:
                if k in fresh:
                    self._memo[k] = fresh[k].detach().float().cpu()
                self._memo.move_to_end(k)
            while len(self._memo) > self.text_feature_memo:
                self._memo.popitem(last=False)
        return torch.stack(rows) if rows else torch.empty(0, self.hidden_size, device=self.device, dtype=dtype)

    def _compute_text_features(self, texts: Sequence[str]) -> Tensor:
        rows = [self.caption_token_ids(t) for t in texts]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, d)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        batch: LMBatch,
        image_embeds: Tensor | None,
        *,
        image_mask: Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        stop_at_newline: bool = True,
    ) -> list[str]:
        """Decode continuations of a left-padded batch. The prefix is encoded once; then one token per step.
        Each row stops at eos and, with ``stop_at_newline``, at the first line break (the text after it,
        e.g. a second "Question:", is dropped)."""
        ids = self.generate_ids(
            batch, image_embeds, image_mask=image_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_p=top_p, generator=generator, stop_at_newline=stop_at_newline,
        )
        texts = [self.tokenizer.decode(row[row != self.pad_token_id], skip_special_tokens=True) for row in ids]
        if stop_at_newline:
            texts = [t.strip().split("\n", 1)[0] for t in texts]
        return [t.strip() for t in texts]

    def newline_token_ids(self) -> Tensor:
        """Ids of every vocabulary token whose text holds a line break (computed once per LM)."""
        if self._newline_ids is None:
            vocab = self.tokenizer.get_vocab()
            found = [i for tok, i in vocab.items() if "\n" in self.tokenizer.convert_tokens_to_string([tok])]
            self._newline_ids = torch.tensor(sorted(found), dtype=torch.long)
        return self._newline_ids

    @torch.no_grad()
    def generate_ids(
        self,
        batch: LMBatch,
        image_embeds: Tensor | None,
        *,
        image_mask: Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        stop_at_eos: bool = True,
        stop_at_newline: bool = False,
    ) -> Tensor:
        """(B, T) new token ids (eos and everything after it replaced by the pad id; with ``stop_at_newline``,
        a row also finishes after its first token holding a line break)."""
        mask = batch.attention_mask
        if (mask[:, -1] == 0).any():
            raise ValueError("generation needs left-padded prompts (build_batch(..., padding_side='left'))")
        embeds = self.embed(batch, image_embeds, image_mask)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        cache_kwarg = _cache_name(out)
        cache, logits = getattr(out, cache_kwarg), out.logits[:, -1]
        B = embeds.shape[0]
        finished = torch.zeros(B, dtype=torch.bool, device=embeds.device)
        newline = self.newline_token_ids().to(embeds.device) if stop_at_newline else None
        next_pos = positions[:, -1:] + 1
        new_tokens = []
        for _ in range(max_new_tokens):
            token = _choose(logits, do_sample, temperature, top_p, generator)  # (B,)
            token = torch.where(finished, torch.full_like(token, self.pad_token_id), token)
            if stop_at_eos:
                finished = finished | (token == self.eos_token_id)
                token = torch.where(token == self.eos_token_id, torch.full_like(token, self.pad_token_id), token)
            new_tokens.append(token)
            if newline is not None:
                finished = finished | torch.isin(token, newline)
            if finished.all():
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = self.model(
                input_ids=token[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                **{cache_kwarg: cache},
            )
            cache, logits = getattr(out, cache_kwarg), out.logits[:, -1]
            next_pos = next_pos + 1
        if not new_tokens:
            return torch.empty(B, 0, dtype=torch.long)
        return torch.stack(new_tokens, dim=1)


def _cache_name(out) -> str:
    """What the model calls its KV cache, read off its output's fields: ``cache`` since transformers renamed it
    (5.x, where passing ``past_key_values`` warns and goes in 5.40), ``past_key_values`` before. The decode loop
    passes the cache back under the same name."""
    import dataclasses

    return "cache" if "cache" in {f.name for f in dataclasses.fields(out)} else "past_key_values"


def _choose(
    logits: Tensor, do_sample: bool, temperature: float, top_p: float, generator: torch.Generator | None
) -> Tensor:
    """Greedy or nucleus sampling over (B, V) logits -> (B,)."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
