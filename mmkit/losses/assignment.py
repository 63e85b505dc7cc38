"""Optimal-transport assignment to prototypes (Sinkhorn-Knopp) and VLAP's swapped prediction loss."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def sinkhorn(
    scores: Tensor, *, eps: float = 0.01, iterations: int = 3, prototype_marginal: Tensor | None = None
) -> Tensor:
    """Soft assignment of B samples to K prototypes under equipartition constraints.

    scores: (B, K) similarities. Solves (approximately, ``iterations`` alternating projections) for
    ``Q = diag(u) exp(scores^T / eps) diag(w)`` (K x B) whose rows sum to the prototype marginal
    (uniform 1/K by default) and columns to 1/B. Computed in the log domain, so ``eps = 0.01`` with
    cosine scores cannot overflow. Returns (B, K), each row a distribution over prototypes.
    """
    B, K = scores.shape
    log_q = scores.t().double() / eps  # (K, B)
    if prototype_marginal is None:
        log_r = torch.full((K, 1), -math.log(K), dtype=torch.float64, device=scores.device)
    else:
        if prototype_marginal.shape != (K,):
            raise ValueError(f"prototype_marginal must have shape ({K},), got {tuple(prototype_marginal.shape)}")
        log_r = prototype_marginal.double().clamp_min(1e-300).log().unsqueeze(1)
        log_r = log_r - torch.logsumexp(log_r, dim=0)
    log_c = -math.log(B)
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) + log_r  # rows -> prototype marginal
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) + log_c  # columns -> 1/B
    return (log_q - log_c).exp().t().to(scores.dtype)  # (B, K); columns of Q scaled to sum to 1


@torch.no_grad()
def prior_weighted_assignment(
    scores: Tensor, *, eps: float = 0.01, iterations: int = 3, prototype_marginal: Tensor | None = None
) -> Tensor:
    """Per-sample assignment of B samples to K prototypes, each sample's scores tilted by the prior.

    What VLAP's official ``distributed_sinkhorn`` computes on its (B, K) path: starting from
    ``Q = exp(scores^T / eps)`` (K x B), each of the ``iterations`` rounds multiplies every prototype row by
    its prior and renormalises every column; prototype rows are never normalised, so samples do not share
    mass. The closed form, computed here in the log domain (no overflow at eps = 0.01)::

        q[b] = softmax(scores[b] / eps + iterations * log prior)

    With a uniform prior (``prototype_marginal=None``) this is ``softmax(scores[b] / eps)``. Returns (B, K).
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    K = scores.shape[1]
    logits = scores.double() / eps  # (B, K)
    if prototype_marginal is not None:
        if prototype_marginal.shape != (K,):
            raise ValueError(f"prototype_marginal must have shape ({K},), got {tuple(prototype_marginal.shape)}")
        logits = logits + iterations * prototype_marginal.double().clamp_min(1e-300).log()
    return torch.softmax(logits, dim=-1).to(scores.dtype)


def swapped_prediction_loss(code_a: Tensor, code_b: Tensor, q_a: Tensor, q_b: Tensor, *, tau: float) -> Tensor:
    """-1/2 [ sum q_b log softmax(code_a / tau) + sum q_a log softmax(code_b / tau) ], batch mean.

    code_*: (B, K) scores of each modality; q_*: (B, K) their (detached) Sinkhorn assignments.
    """
    loss_a = -(q_b * F.log_softmax(code_a / tau, dim=-1)).sum(-1).mean()
    loss_b = -(q_a * F.log_softmax(code_b / tau, dim=-1)).sum(-1).mean()
    return 0.5 * (loss_a + loss_b)


def prototype_scores(x: Tensor, prototypes: Tensor) -> Tensor:
    """Cosine similarity of (B, d) vectors to (K, d) prototypes -> (B, K)."""
    return F.normalize(x, dim=-1) @ F.normalize(prototypes, dim=-1).t()


def word_frequency_prior(token_ids: Iterable[Iterable[int]], vocab_size: int, temperature: float = 0.25) -> Tensor:
    """Prototype marginal from word frequencies: ``softmax(freq / temperature)`` over the vocabulary.

    ``freq`` is each token's count in the training texts divided by the largest count (so in [0, 1]):
    the most frequent word gets e^(1/T) times the weight of an unseen one (about 55x at T = 0.25).
    """
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for ids in token_ids:
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        if ids.numel():
            if int(ids.max()) >= vocab_size or int(ids.min()) < 0:
                raise ValueError(f"token id out of range [0, {vocab_size}) in the frequency counts")
            counts += torch.bincount(ids, minlength=vocab_size).double()
    if counts.max() <= 0:
        raise ValueError("word_frequency_prior got no tokens; pass the training captions' token ids")
    freq = counts / counts.max()
    return torch.softmax(freq / temperature, dim=0).float()
