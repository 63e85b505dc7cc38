"""Is VLAP's assignment objective teaching the connector anything? Measurements on real batches.

VLAP (METHODS.md s1) trains the connector with ``map_weight * L_map + L_cap``, where L_map asks the visual
codes to predict the Sinkhorn assignment of the caption's codes. Whether that helps depends on the targets
carrying per-sample information; on ShapesWorld + SmolLM2 they barely do, and the gradient of L_map is
nearly the same vector every batch (README, "Measured"). This module measures both, for any model and data,
before or after training:

- ``target_entropy``: mean entropy (nats) of the text-side assignments q_t, next to ``log K``;
- ``own_caption_mass`` / ``other_caption_mass``: mass q_t puts on the (distinct) tokens of the sample's
  own caption vs on those of the next caption in the batch (equal = the targets do not tell captions apart);
  these three for the connector's own reading of the assignment step (``assignment``), and under
  ``readings`` for each reading VLAP offers (``prior_weighted``: the official code; ``balanced``: the
  paper's transport polytope), with ``readings_total_variation``, the mean total-variation distance
  between the two readings' q_t on the same captions;
- ``map_gradient_consistency``: ``||mean_b g_b|| / mean_b ||g_b||`` over the batches' gradients of the
  weighted L_map on the connector; 1.0 = the same direction every batch, about ``1/sqrt(batches)`` =
  batch-specific, zero-mean signal (``independent_consistency``);
- with the caption loss too (one LLM forward/backward per batch): ``map_to_caption_gradient_norm``
  (``||grad map_weight*L_map|| / ||grad L_cap||``, batch mean), their mean cosine, and
  ``caption_gradient_consistency`` (the same ratio as above for L_cap, for scale).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..losses.assignment import prototype_scores


def _flat_grad(loss: Tensor, params: list[torch.nn.Parameter], *, retain_graph: bool = False) -> Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain_graph)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])


def assignment_diagnostics(
    model,
    features: Tensor,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    batches: int = 8,
    with_caption_loss: bool = True,
    seed: int = 0,
) -> dict:
    """Diagnostics of a VLAP-style connector in ``model`` (a ``VisionLanguageModel``).

    features: (num_images, N, Dv) encoder tokens; texts[i]: the caption of image i. Draws ``batches``
    random batches of ``batch_size`` pairs (seeded). Returns a dict of floats (see the module docstring).
    """
    connector = model.connector
    if not hasattr(connector, "assign"):
        raise ValueError(
            f"assignment diagnostics need a connector with an assignment objective (e.g. 'vlap'); "
            f"got {type(connector).__name__}"
        )
    if features.shape[0] != len(texts):
        raise ValueError(f"{features.shape[0]} images for {len(texts)} captions")
    if not 2 <= batch_size <= len(texts):
        raise ValueError(f"batch_size must be in [2, {len(texts)}] (Sinkhorn needs a batch), got {batch_size}")
    if batches < 2:
        raise ValueError(f"batches must be >= 2 to measure gradient consistency, got {batches}")
    llm = model.llm
    prototypes = llm.word_embeddings().detach()  # (K, d)
    num_prototypes = prototypes.shape[0]
    params = [p for p in connector.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)

    readings = list(getattr(connector, "readings", (connector.config.assignment,)))
    own_reading = connector.config.assignment
    stats = {r: {"entropy": [], "own": [], "other": []} for r in readings}
    total_variation: list[float] = []
    map_grads, cap_grads, ratios, cosines = [], [], [], []
    for _ in range(batches):
        idx = torch.randperm(len(texts), generator=generator)[:batch_size].tolist()
        batch_texts = [texts[i] for i in idx]
        embeds, _ = model.image_embeds(features[idx].float())  # (B, N, d)
        text_features = llm.text_features(batch_texts)  # (B, d)

        with torch.no_grad():
            code_t = prototype_scores(text_features, prototypes)  # (B, K)
            token_ids = [sorted(set(llm.caption_token_ids(t))) for t in batch_texts]
            targets = {}
            for reading in readings:
                q_t = targets[reading] = connector.assign(code_t, reading=reading)  # (B, K), as training would
                st = stats[reading]
                st["entropy"].append(float(-(q_t * q_t.clamp_min(1e-30).log()).sum(-1).mean()))
                for b in range(batch_size):
                    st["own"].append(float(q_t[b, token_ids[b]].sum()))
                    st["other"].append(float(q_t[b, token_ids[(b + 1) % batch_size]].sum()))
            if len(readings) == 2:
                first, second = (targets[r] for r in readings)
                total_variation.append(float(0.5 * (first - second).abs().sum(-1).mean()))

        weighted_map = connector.config.map_weight * connector.map_loss(embeds, text_features, prototypes)
        g_map = _flat_grad(weighted_map, params, retain_graph=with_caption_loss)  # embeds reused below
        map_grads.append(g_map)
        if with_caption_loss:
            lm_batch = llm.build_batch([model.caption_prompt] * batch_size, embeds.shape[1], batch_texts)
            g_cap = _flat_grad(llm.caption_loss(lm_batch.to(llm.device), embeds), params)
            cap_grads.append(g_cap)
            ratios.append(float(g_map.norm() / g_cap.norm().clamp_min(1e-30)))
            cosines.append(float(torch.nn.functional.cosine_similarity(g_map, g_cap, dim=0)))

    def consistency(grads: list[Tensor]) -> float:
        g = torch.stack(grads)  # (batches, P)
        return float(g.mean(0).norm() / g.norm(dim=1).mean().clamp_min(1e-30))

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    per_reading = {r: {"target_entropy": mean(st["entropy"]), "own_caption_mass": mean(st["own"]),
                       "other_caption_mass": mean(st["other"])} for r, st in stats.items()}
    out = {
        "batches": batches,
        "batch_size": batch_size,
        "prototypes": num_prototypes,
        "assignment": own_reading,
        **per_reading[own_reading],
        "max_entropy": math.log(num_prototypes),
        "readings": per_reading,
        "map_gradient_consistency": consistency(map_grads),
        "independent_consistency": 1.0 / math.sqrt(batches),
    }
    if total_variation:
        out["readings_total_variation"] = mean(total_variation)
    if with_caption_loss:
        out["map_to_caption_gradient_norm"] = sum(ratios) / len(ratios)
        out["map_caption_gradient_cosine"] = sum(cosines) / len(cosines)
        out["caption_gradient_consistency"] = consistency(cap_grads)
    return out


def format_diagnostics(d: dict) -> str:
    """A few readable lines for the command line."""
    lines = []
    for reading, r in d.get("readings", {d.get("assignment", "?"): d}).items():
        used = " (this connector's)" if reading == d.get("assignment") else ""
        lines += [
            f"{reading}{used}: text-side assignment entropy {r['target_entropy']:.2f} nats (uniform over "
            f"{d['prototypes']} prototypes: {d['max_entropy']:.2f}); q_t mass on own caption tokens "
            f"{r['own_caption_mass']:.4f} vs another caption's {r['other_caption_mass']:.4f}",
        ]
    if "readings_total_variation" in d:
        lines.append(f"mean total variation between the two readings' q_t {d['readings_total_variation']:.3f}")
    lines.append(
        f"L_map gradient consistency    {d['map_gradient_consistency']:.3f} over {d['batches']} batches "
        f"(1 = same direction every batch; independent batches ~{d['independent_consistency']:.3f})"
    )
    if "map_to_caption_gradient_norm" in d:
        lines.append(
            f"|grad weighted L_map| / |grad L_cap| {d['map_to_caption_gradient_norm']:.4f}, "
            f"cosine {d['map_caption_gradient_cosine']:+.3f}; L_cap gradient consistency "
            f"{d['caption_gradient_consistency']:.3f}"
        )
    return "\n".join(lines)
