"""Connectors: linear and VLAP, Sinkhorn against the textbook marginals, persistence."""

import math

import pytest
import torch

from mmkit.connectors import build_connector, load_connector, load_weights_into
from mmkit.losses import sinkhorn, swapped_prediction_loss, word_frequency_prior


def reference_sinkhorn(scores, eps, iters, r=None):
    """Independent plain-domain Sinkhorn-Knopp in float64 (SwAV's formulation)."""
    Q = torch.exp((scores.double() - scores.double().max()) / eps).t()  # (K, B)
    K, B = Q.shape
    r = torch.full((K,), 1.0 / K, dtype=torch.float64) if r is None else r.double() / r.double().sum()
    Q /= Q.sum()
    for _ in range(iters):
        Q *= (r / Q.sum(1)).unsqueeze(1)
        Q *= ((1.0 / B) / Q.sum(0)).unsqueeze(0)
    return (Q * B).t()


@pytest.mark.parametrize("prior", [False, True])
def test_sinkhorn_matches_reference_and_marginals(prior):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 11, generator=g) * 2 - 1
    r = torch.rand(11, generator=g) + 0.5 if prior else None
    for eps, iters in ((0.5, 3), (0.05, 3)):
        ours = sinkhorn(scores, eps=eps, iterations=iters, prototype_marginal=r).double()
        ref = reference_sinkhorn(scores, eps, iters, r)
        assert torch.allclose(ours, ref, atol=1e-9)
    # converged: textbook marginals hold (rows of Q^T -> 1/B scaled to 1; prototype mass -> r)
    q = sinkhorn(scores, eps=0.3, iterations=500, prototype_marginal=r).double()
    assert torch.allclose(q.sum(1), torch.ones(6, dtype=torch.float64), atol=1e-6)
    target = torch.full((11,), 1 / 11, dtype=torch.float64) if r is None else r.double() / r.double().sum()
    assert torch.allclose(q.sum(0) / 6, target, atol=1e-6)


def test_sinkhorn_is_stable_at_tiny_eps_and_large_vocab():
    scores = torch.rand(16, 49152) * 2 - 1
    q = sinkhorn(scores, eps=0.01, iterations=3)
    assert torch.isfinite(q).all() and torch.allclose(q.sum(1), torch.ones(16), atol=1e-4)


def test_swapped_prediction_loss_formula():
    a, b = torch.randn(3, 7), torch.randn(3, 7)
    qa, qb = torch.softmax(torch.randn(3, 7), -1), torch.softmax(torch.randn(3, 7), -1)
    tau = 0.1
    manual = -0.5 * ((qb * torch.log_softmax(a / tau, -1)).sum(-1).mean() + (qa * torch.log_softmax(b / tau, -1)).sum(-1).mean())
    assert torch.allclose(swapped_prediction_loss(a, b, qa, qb, tau=tau), manual)


def test_word_frequency_prior():
    prior = word_frequency_prior([[1, 1, 2], [1]], vocab_size=5, temperature=0.25)
    assert torch.allclose(prior.sum(), torch.tensor(1.0))
    assert prior[1] > prior[2] > prior[0]
    assert math.isclose((prior[1] / prior[0]).item(), math.exp(4), rel_tol=1e-5)
    with pytest.raises(ValueError, match="no tokens"):
        word_frequency_prior([[]], 5)


def test_vlap_loss_trains_only_the_projection():
    c = build_connector("vlap", vision_dim=10, llm_dim=8, prior="uniform")
    protos = torch.randn(30, 8)
    out = c.auxiliary_loss(c(torch.randn(4, 3, 10)), torch.randn(4, 8), protos)
    out["weighted"].backward()
    assert c.proj.weight.grad.abs().sum() > 0
    assert torch.allclose(out["weighted"], 0.1 * out["map_loss"])
    with pytest.raises(ValueError, match="set_prior"):
        build_connector("vlap", vision_dim=10, llm_dim=8).auxiliary_loss(torch.randn(4, 3, 8), torch.randn(4, 8), protos)


def test_save_load_round_trip_and_errors(tmp_path):
    for kind in ("linear", "vlap"):
        c = build_connector(kind, vision_dim=6, llm_dim=4)
        c.save(tmp_path / kind, metadata={"llm": {"name": "x"}})
        back, meta = load_connector(tmp_path / kind)
        assert type(back) is type(c) and meta == {"llm": {"name": "x"}}
        x = torch.randn(2, 3, 6)
        assert torch.equal(back(x), c(x))
        assert set(back.state_dict()) == {"proj.weight", "proj.bias"}  # no wrapper prefixes
    with pytest.raises(ValueError, match="unknown connector kind 'mlp'"):
        build_connector("mlp", vision_dim=1, llm_dim=1)
    with pytest.raises(ValueError, match="unknown key 'tua'; did you mean 'tau'"):
        build_connector("vlap", vision_dim=1, llm_dim=1, tua=0.1)
    with pytest.raises(FileNotFoundError, match="connector.json"):
        load_connector(tmp_path / "missing")
    # weights that do not fit the config
    bad = build_connector("linear", vision_dim=5, llm_dim=4)
    bad.save(tmp_path / "bad")
    good_json = (tmp_path / "linear" / "connector.json").read_text()
    (tmp_path / "bad" / "connector.json").write_text(good_json)
    with pytest.raises(ValueError, match="does not fit"):
        load_connector(tmp_path / "bad")


def test_load_weights_into_copies_matching_weights_and_names_what_does_not_fit(tmp_path):
    saved = build_connector("vlap", vision_dim=6, llm_dim=4, prior="uniform")
    saved.save(tmp_path / "vlap", metadata={"training": {"steps": 3}})
    target = build_connector("vlap", vision_dim=6, llm_dim=4, prior="uniform")
    assert not torch.equal(target.proj.weight, saved.proj.weight)
    assert load_weights_into(target, tmp_path / "vlap") == {"training": {"steps": 3}}
    x = torch.randn(2, 3, 6)
    assert torch.equal(target(x), saved(x))
    with pytest.raises(ValueError, match=r"vlap.* holds a 'vlap' connector; this model's connector is 'linear'"):
        load_weights_into(build_connector("linear", vision_dim=6, llm_dim=4), tmp_path / "vlap")
    wide = build_connector("vlap", vision_dim=7, llm_dim=4)
    with pytest.raises(ValueError, match=r"does not fit this model's vlap connector.*\(4, 6\).*needs.*\(4, 7\)"):
        load_weights_into(wide, tmp_path / "vlap")


def test_linear_and_vlap_start_from_the_same_weights_for_the_same_seed():
    """The README's VLAP-vs-linear runs are paired: same seed -> same initial map, so only L_map differs."""
    built = {}
    for kind in ("linear", "vlap"):
        torch.manual_seed(7)
        built[kind] = build_connector(kind, vision_dim=6, llm_dim=4)
    assert built["linear"].state_dict().keys() == built["vlap"].state_dict().keys()
    for name, tensor in built["linear"].state_dict().items():
        assert torch.equal(tensor, built["vlap"].state_dict()[name])
