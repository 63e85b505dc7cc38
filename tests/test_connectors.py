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
    tokens, mask = c(torch.randn(4, 3, 10))
    assert mask is None and tokens.shape == (4, 3, 8)
    loss = c.map_loss(tokens, torch.randn(4, 8), protos)
    (0.1 * loss).backward()
    assert c.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="set_prior"):
        build_connector("vlap", vision_dim=10, llm_dim=8).map_loss(torch.randn(4, 3, 8), torch.randn(4, 8), protos)
    # a (B, N) mask drops padded tokens from the mean visual code
    feats = torch.randn(2, 3, 10)
    padded, mask = c(torch.cat([feats, torch.randn(2, 2, 10)], 1), torch.tensor([[1, 1, 1, 0, 0]] * 2).bool())
    code_masked, _ = c.codes(padded, torch.randn(2, 8), protos, mask)
    code_plain, _ = c.codes(c(feats)[0], torch.randn(2, 8), protos)
    assert torch.allclose(code_masked, code_plain, atol=1e-6)


def test_save_load_round_trip_and_errors(tmp_path):
    for kind in ("linear", "vlap"):
        c = build_connector(kind, vision_dim=6, llm_dim=4)
        c.save(tmp_path / kind, metadata={"llm": {"name": "x"}})
        back, meta = load_connector(tmp_path / kind)
        assert type(back) is type(c) and meta == {"llm": {"name": "x"}}
        x = torch.randn(2, 3, 6)
        assert torch.equal(back(x)[0], c(x)[0])
        assert set(back.state_dict()) - {"prior"} == {"proj.weight", "proj.bias"}  # no wrapper prefixes
    with pytest.raises(ValueError, match="unknown connector kind 'mlp'"):
        build_connector("mlp", vision_dim=1, llm_dim=1)
    with pytest.raises(ValueError, match="unknown key 'tua'; did you mean 'tau'"):
        build_connector("vlap", vision_dim=1, llm_dim=1, tua=0.1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_connector(tmp_path / "missing")
    # weights that do not fit the config
    bad = build_connector("linear", vision_dim=5, llm_dim=4)
    bad.save(tmp_path / "bad")
    good_json = (tmp_path / "linear" / "adapter.json").read_text()
    (tmp_path / "bad" / "adapter.json").write_text(good_json)
    with pytest.raises(ValueError, match="does not fit"):
        load_connector(tmp_path / "bad")


def test_load_weights_into_copies_matching_weights_and_names_what_does_not_fit(tmp_path):
    saved = build_connector("vlap", vision_dim=6, llm_dim=4, prior="uniform")
    saved.save(tmp_path / "vlap", metadata={"training": {"steps": 3}})
    target = build_connector("vlap", vision_dim=6, llm_dim=4, prior="uniform")
    assert not torch.equal(target.proj.weight, saved.proj.weight)
    assert load_weights_into(target, tmp_path / "vlap") == {"training": {"steps": 3}}
    x = torch.randn(2, 3, 6)
    assert torch.equal(target(x)[0], saved(x)[0])
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
    linear, vlap = dict(built["linear"].named_parameters()), dict(built["vlap"].named_parameters())
    assert linear.keys() == vlap.keys()
    for name, tensor in linear.items():
        assert torch.equal(tensor, vlap[name])


# ---------------------------------------------------------------- VLAP's two readings of the assignment step
def shapesworld_prior(extra_prototypes: int = 40):
    """A real word-frequency prior: ShapesWorld captions, one prototype per word plus words no caption uses."""
    from mmkit.data.shapes import sample_scene
    from mmkit.data.shapes_language import caption, tokenize, vocabulary

    words = vocabulary()
    index = {w: i for i, w in enumerate(words)}
    ids = [[index[w] for w in tokenize(caption(sample_scene(seed)))] for seed in range(200)]
    return word_frequency_prior(ids, len(words) + extra_prototypes)


def official_single_vector_sinkhorn(scores, eps, iters, prior):
    """park-jungin/vlap train.py, distributed_sinkhorn's (B, K) branch, in float64 on one process."""
    Q = torch.exp(scores.double() / eps).t()  # (K, B); float64 holds exp(1 / 0.01)
    B = Q.shape[1]
    p = prior.double().unsqueeze(1)
    for _ in range(iters):
        Q *= p
        Q /= Q.sum(0, keepdim=True)
        Q /= B
    return (Q * B).t()


@pytest.mark.parametrize("with_prior", [True, False])
def test_prior_weighted_reading_is_the_official_code_and_its_closed_form(with_prior):
    from mmkit.losses import prior_weighted_assignment

    prior = shapesworld_prior()
    K = prior.numel()
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(9, K, generator=g, dtype=torch.float64) * 2 - 1  # random cosine codes
    uniform = torch.full((K,), 1.0 / K, dtype=torch.float64)
    for eps, iters in ((0.5, 3), (0.05, 1), (0.02, 5)):
        ours = prior_weighted_assignment(scores, eps=eps, iterations=iters,
                                         prototype_marginal=prior if with_prior else None)
        official = official_single_vector_sinkhorn(scores, eps, iters, prior if with_prior else uniform)
        assert torch.allclose(ours, official, atol=1e-12, rtol=1e-9)
        # closed form, independently: each row's softmax(s / eps + iters * log p), normalised by hand
        logits = scores / eps + (iters * prior.double().log() if with_prior else 0.0)
        w = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        assert torch.allclose(ours, w / w.sum(1, keepdim=True), atol=1e-12, rtol=1e-9)
    # per-sample: a row's target does not depend on the other rows of the batch
    alone = prior_weighted_assignment(scores[:1], eps=0.05, iterations=3, prototype_marginal=prior)
    together = prior_weighted_assignment(scores, eps=0.05, iterations=3, prototype_marginal=prior)
    assert torch.allclose(alone[0], together[0], atol=1e-14)
    # eps = 0.01 over a big vocabulary: the log domain cannot overflow (the official code's exp would)
    big = prior_weighted_assignment(torch.rand(4, 49152) * 2 - 1, eps=0.01, iterations=3)
    assert torch.isfinite(big).all() and torch.allclose(big.sum(1), torch.ones(4), atol=1e-4)
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        prior_weighted_assignment(scores, iterations=0)


@pytest.mark.parametrize("assignment", ["prior_weighted", "balanced"])
@pytest.mark.parametrize("prior", ["frequency", "uniform"])
def test_vlap_connector_assigns_by_its_configured_reading(assignment, prior):
    freq = shapesworld_prior()
    K = freq.numel()
    c = build_connector("vlap", vision_dim=6, llm_dim=5, prior=prior, assignment=assignment)
    if prior == "frequency":
        c.set_prior(freq)
    codes = torch.rand(7, K, dtype=torch.float64) * 2 - 1
    r = freq if prior == "frequency" else torch.full((K,), 1.0 / K)
    reference = reference_sinkhorn if assignment == "balanced" else official_single_vector_sinkhorn
    expected = reference(codes, 0.01, 3, r)  # float64: exp(1 / 0.01) does not overflow
    assert torch.allclose(c.assign(codes), expected, atol=1e-10, rtol=1e-8)


def test_the_two_readings_differ_and_the_default_is_the_official_one():
    assert build_connector("vlap", vision_dim=2, llm_dim=2).config.assignment == "prior_weighted"
    with pytest.raises(ValueError, match=r"assignment must be one of \('prior_weighted', 'balanced'\)"):
        build_connector("vlap", vision_dim=2, llm_dim=2, assignment="sinkhorn")
    prior = shapesworld_prior()
    codes = torch.rand(8, prior.numel()) * 0.2 + 0.4  # similar codes, as mean-pooled caption states are
    kw = dict(eps=0.01, iterations=3, prototype_marginal=prior)
    from mmkit.losses import prior_weighted_assignment

    sharp, flat = prior_weighted_assignment(codes, **kw), sinkhorn(codes, **kw)
    entropy = lambda q: float(-(q * q.clamp_min(1e-30).log()).sum(-1).mean())  # noqa: E731
    assert entropy(sharp) < entropy(flat)


def test_prior_is_saved_with_the_weights_and_old_folders_load_as_balanced(tmp_path):
    import json

    prior = shapesworld_prior()
    c = build_connector("vlap", vision_dim=6, llm_dim=4)
    c.set_prior(prior)
    c.save(tmp_path / "new")
    back, _ = load_connector(tmp_path / "new")
    assert back.config.assignment == "prior_weighted" and torch.equal(back.prior, prior)
    codes = torch.rand(3, prior.numel())
    assert torch.equal(back.assign(codes), c.assign(codes))
    # a folder written before the prior and the switch existed: weights only, no 'assignment' key
    from safetensors.torch import save_file

    (tmp_path / "old").mkdir()
    save_file({k: v for k, v in c.state_dict().items() if k != "prior"}, str(tmp_path / "old" / "connector.safetensors"))
    payload = json.loads((tmp_path / "new" / "adapter.json").read_text())
    del payload["config"]["assignment"]
    (tmp_path / "old" / "connector.json").write_text(json.dumps(payload))
    old, _ = load_connector(tmp_path / "old")
    assert old.config.assignment == "balanced" and old.prior_missing
    assert torch.equal(old.proj.weight, c.proj.weight)
    with pytest.raises(ValueError, match="set_prior"):
        old.assign(codes)
    # resuming into a connector whose prior is already set keeps it when the folder has none
    target = build_connector("vlap", vision_dim=6, llm_dim=4, assignment="balanced")
    target.set_prior(prior)
    load_weights_into(target, tmp_path / "old")
    assert torch.equal(target.prior, prior) and torch.equal(target.proj.weight, c.proj.weight)


def test_linear_connector_positions_tell_apart_equal_tokens_at_other_places(tmp_path):
    """A CNN grid's background tokens are equal wherever they lie; with ``positions`` the connector's outputs say
    where each token is (2-D sine-cosine start, learned), and they save and load with the connector."""
    from mmkit.adapters import load_adapter
    from mmkit.nn import grid_sincos

    codes = grid_sincos(3, 3, 10)  # 2 channels per quarter + 2 zero channels
    assert codes.shape == (9, 10) and codes.abs().max() <= 1 and torch.equal(codes[:, 8:], torch.zeros(9, 2))
    half_period, four_cells = torch.pi / 3, torch.pi / 2  # the two frequencies on a 3-cell axis
    torch.testing.assert_close(codes[5, :2], torch.tensor([half_period * 2, four_cells * 2]).sin())  # column 2
    torch.testing.assert_close(codes[5, 4:6], torch.tensor([half_period, four_cells]).sin())  # row 1
    assert len({tuple(c.tolist()) for c in codes}) == 9  # every cell its own code
    seven = grid_sincos(7, 7, 576)
    assert (seven.std(0) > 0.2).all()  # every channel moves across a 7 x 7 grid (576 = 4 x 144: no padding)

    torch.manual_seed(0)
    plain = build_connector("linear", vision_dim=6, llm_dim=12)
    torch.manual_seed(0)
    placed = build_connector("linear", vision_dim=6, llm_dim=12, positions=9)
    background = torch.ones(2, 9, 6)  # nine equal tokens
    out, _ = plain(background)
    assert torch.allclose(out, out[:, :1].expand_as(out))
    out, _ = placed(background)
    assert len({tuple(t.round(decimals=5).tolist()) for t in out[0]}) == 9
    spread = placed.position.std(0)  # per channel over the 9 positions: 0.1, mean 0 (no common offset)
    torch.testing.assert_close(spread, torch.full((12,), 0.1))
    torch.testing.assert_close(placed.position.mean(0), torch.zeros(12), atol=1e-6, rtol=0)
    torch.testing.assert_close(out - plain(background)[0], placed.position.expand(2, -1, -1))  # same proj start
    assert "position" in dict(placed.named_parameters())  # it trains
    placed.save_adapter(tmp_path / "c")
    again, _ = load_adapter(tmp_path / "c")
    torch.testing.assert_close(again(background)[0], out)
    with pytest.raises(ValueError, match="has position embeddings for 9 tokens .* got 4 tokens"):
        placed(torch.ones(1, 4, 6))
    with pytest.raises(ValueError, match="does not take masked"):
        placed(torch.ones(1, 9, 6), torch.ones(1, 9, dtype=torch.bool))
    for bad in (10, -4):
        with pytest.raises(ValueError, match="must be 0 or the token count of a square grid"):
            build_connector("linear", vision_dim=6, llm_dim=12, positions=bad)
    with pytest.raises((TypeError, ValueError), match="positions expects int"):
        build_connector("linear", vision_dim=6, llm_dim=12, positions=True)
