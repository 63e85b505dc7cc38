"""VLAP assignment diagnostics on tiny real classes: the numbers match direct computations."""

import math

import pytest
import torch

from mmkit.connectors import build_connector
from mmkit.eval.assignment_diagnostics import assignment_diagnostics, format_diagnostics
from mmkit.llm import FrozenLM
from mmkit.losses import prior_weighted_assignment, prototype_scores, sinkhorn
from mmkit.models import VisionLanguageModel

CAPTIONS = ["a red circle", "a blue star", "a green square", "two red stars", "a big circle", "a blue square"]


@pytest.fixture(scope="module")
def llm(tiny_parts):
    return FrozenLM.from_pretrained(tiny_parts / "llm")


def make(llm, kind="vlap", **options):
    connector = build_connector(kind, vision_dim=10, llm_dim=llm.hidden_size, **options)
    connector.prepare(llm=llm, texts=CAPTIONS)
    return VisionLanguageModel(None, connector, llm, caption_prompt="<image> caption :")


@pytest.mark.parametrize("assignment", ["prior_weighted", "balanced"])
def test_full_batch_numbers_match_direct_computation(llm, assignment):
    model = make(llm, assignment=assignment)
    features = torch.randn(6, 3, 10)
    d = assignment_diagnostics(model, features, CAPTIONS, batch_size=6, batches=3)
    # Every batch is the whole set in some order: both readings and the batch-mean loss are permutation
    # equivariant, so the L_map gradient is the same vector each time.
    assert d["map_gradient_consistency"] == pytest.approx(1.0, abs=1e-5)
    prototypes = llm.word_embeddings().detach()
    code_t = prototype_scores(llm.text_features(CAPTIONS), prototypes)
    kw = dict(eps=0.01, iterations=3, prototype_marginal=model.connector.prior)
    direct = {"balanced": sinkhorn(code_t, **kw), "prior_weighted": prior_weighted_assignment(code_t, **kw)}
    ids = [sorted(set(llm.tokenizer(" " + t, add_special_tokens=False)["input_ids"])) for t in CAPTIONS]
    assert d["assignment"] == assignment and set(d["readings"]) == set(direct)
    for reading, q in direct.items():
        r = d["readings"][reading]
        assert r["target_entropy"] == pytest.approx(float(-(q * q.clamp_min(1e-30).log()).sum(-1).mean()), rel=1e-5)
        own = sum(float(q[b, ids[b]].sum()) for b in range(6)) / 6  # the batch order does not change the mean
        assert r["own_caption_mass"] == pytest.approx(own, rel=1e-5)
        assert 0 <= r["other_caption_mass"] <= 1
    assert d["target_entropy"] == d["readings"][assignment]["target_entropy"]  # the connector's own reading
    tv = float(0.5 * (direct["balanced"] - direct["prior_weighted"]).abs().sum(-1).mean())
    assert d["readings_total_variation"] == pytest.approx(tv, rel=1e-5)
    assert d["max_entropy"] == pytest.approx(math.log(llm.vocab_size))
    assert d["map_to_caption_gradient_norm"] > 0 and -1 <= d["map_caption_gradient_cosine"] <= 1
    assert d["caption_gradient_consistency"] == pytest.approx(1.0, abs=1e-5)  # same batch, same gradient
    text = format_diagnostics(d)
    assert "consistency" in text and f"{assignment} (this connector's)" in text and "total variation" in text


def test_sub_batches_give_batch_specific_gradients(llm):
    model = make(llm)
    d = assignment_diagnostics(model, torch.randn(6, 3, 10), CAPTIONS, batch_size=3, batches=6,
                               with_caption_loss=False)
    assert d["map_gradient_consistency"] < 0.99
    assert "map_to_caption_gradient_norm" not in d


def test_clear_errors(llm):
    with pytest.raises(ValueError, match="assignment objective"):
        assignment_diagnostics(make(llm, "linear"), torch.randn(6, 3, 10), CAPTIONS)
    with pytest.raises(ValueError, match="batch_size"):
        assignment_diagnostics(make(llm), torch.randn(6, 3, 10), CAPTIONS, batch_size=7)
    with pytest.raises(ValueError, match="6 images for 5 captions"):
        assignment_diagnostics(make(llm), torch.randn(6, 3, 10), CAPTIONS[:5])
