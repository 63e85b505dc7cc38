"""Trainable rows for tokens added to a frozen LM (READ's ``<SEG>``), leaving every original row frozen.

:class:`NewTokenEmbedding` wraps the LM's input embedding and :class:`NewTokenHead` its output layer: ids in
``new_ids`` read (and are scored by) the rows of one shared parameter ``new`` (n, d); everything else goes
through the untouched frozen modules. ``new_ids`` may lie inside the frozen table (tokenizers whose
vocabulary is padded) or past its end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NewTokenEmbedding(nn.Module):
    """``ids (B, L) -> (B, L, d)``: the frozen ``base`` table, with ``new_ids`` reading rows of ``new``."""

    def __init__(self, base: nn.Embedding, new_ids: Tensor, new: nn.Parameter) -> None:
        super().__init__()
        self.base = base
        self.new = new  # (n, d), the only trainable rows
        self.register_buffer("new_ids", new_ids.long(), persistent=False)  # (n,)
        self.num_base = base.weight.shape[0]

    @property
    def weight(self) -> Tensor:
        """The full (V', d) table as the LM sees it (frozen rows, then or over them the new ones)."""
        size = max(self.num_base, int(self.new_ids.max()) + 1)
        table = F.pad(self.base.weight, (0, 0, 0, size - self.num_base))
        return table.index_copy(0, self.new_ids, self.new.to(table.dtype))

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    def forward(self, ids: Tensor) -> Tensor:
        out = self.base(ids.clamp(max=self.num_base - 1))  # (B, L, d)
        match = ids.unsqueeze(-1) == self.new_ids  # (B, L, n)
        rows = self.new.to(out.dtype)[match.to(torch.long).argmax(-1)]  # (B, L, d)
        return torch.where(match.any(-1, keepdim=True), rows, out)


class NewTokenHead(nn.Module):
    """``hidden (..., d) -> logits (..., V')``: the frozen ``base`` head, with the ``new_ids`` columns scored
    by ``new`` (the same parameter as the input rows when the LM ties its embeddings)."""

    def __init__(self, base: nn.Module, new_ids: Tensor, new: nn.Parameter, vocab_size: int) -> None:
        super().__init__()
        self.base = base
        self.new = new
        self.register_buffer("new_ids", new_ids.long(), persistent=False)
        self.vocab_size = vocab_size

    def forward(self, hidden: Tensor) -> Tensor:
        logits = self.base(hidden)  # (..., V)
        logits = F.pad(logits, (0, self.vocab_size - logits.shape[-1]), value=float("-inf"))
        scores = hidden @ self.new.to(hidden.dtype).t()  # (..., n)
        return logits.index_copy(-1, self.new_ids, scores.to(logits.dtype))
