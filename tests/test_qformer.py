"""FAVOR's causal Q-Former connector: BLIP-2 equivalence, the causal mask, windows, diversity, compile."""

import pytest
import torch

from mmkit.connectors import build_connector
from mmkit.connectors.qformer import BertAttention
from mmkit.ops import block_causal
from mmkit.testing import tiny_qformer


def blip2_sized(**overrides):
    """A QFormer connector shaped like mmkit.testing.tiny_qformer (hidden 48, 3 heads, FFN 68, encoder width 40)."""
    cfg = dict(vision_dim=40, llm_dim=8, num_queries=5, hidden_size=48, num_heads=3, intermediate_size=68,
               tokens_per_frame=4, frames_per_window=3, encoder_heads=4, hidden_dropout=0.0, attention_dropout=0.0,
               encoder_attention="none", window_positions=False)
    cfg.update(overrides)
    return build_connector("qformer", **cfg).eval()


def assert_same_query_states(ours, reference, real_tokens: int) -> None:
    """Two windows of 12 tokens of width 40 (the second with only ``real_tokens`` real ones): our query states
    equal the transformers Q-Former's on the same queries, tokens and mask."""
    g = torch.Generator().manual_seed(0)
    window = torch.randn(2, 12, 40, generator=g)
    mask = torch.tensor([[True] * 12, [True] * real_tokens + [False] * (12 - real_tokens)])
    with torch.no_grad():
        theirs = reference(query_embeds=ours.query_tokens.expand(2, -1, -1), encoder_hidden_states=window,
                           encoder_attention_mask=mask.long()).last_hidden_state
        mine = ours.query_states(window, mask)
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_with_the_causal_part_off_it_is_the_transformers_blip2_qformer():
    reference = tiny_qformer(seed=3).eval()
    ours = blip2_sized()
    left = ours.load_blip2_qformer(reference)
    assert left == ["proj.bias", "proj.weight", "query_tokens"]  # FAVOR's own parts (BLIP-2 keeps queries outside)
    assert_same_query_states(ours, reference, real_tokens=7)
    # a whole BLIP-2 state dict (qformer.* + query_tokens) loads the same way, query tokens included
    blip2_state = {f"qformer.{k}": v for k, v in reference.state_dict().items()}
    blip2_state["query_tokens"] = torch.randn(1, 5, 48)
    other = blip2_sized()
    assert "query_tokens" not in other.load_blip2_qformer(blip2_state)
    assert torch.equal(other.query_tokens, blip2_state["query_tokens"])


def test_a_blip2_checkpoint_of_other_sizes_is_refused_naming_the_shapes():
    with pytest.raises(ValueError, match=r"does not fit this QFormerConfig .*\(48,\), \(32,\)"):
        blip2_sized(hidden_size=32, num_heads=2).load_blip2_qformer(tiny_qformer())
    with pytest.raises(ValueError, match="no Q-Former layer weights"):
        blip2_sized().load_blip2_qformer({"vision_model.x": torch.zeros(1)})


def test_it_starts_from_blip2_files_folders_and_shards_reading_only_what_it_needs(tmp_path):
    import json

    from safetensors.torch import save_file

    reference = tiny_qformer(seed=5)
    reference.save_pretrained(tmp_path / "qformer")  # a saved Blip2QFormerModel folder
    ours = blip2_sized()
    assert ours.init_from_checkpoint(tmp_path / "qformer") == ["proj.bias", "proj.weight", "query_tokens"]
    assert torch.equal(ours.layers[0].attention.attention.query.weight,
                       reference.encoder.layer[0].attention.attention.query.weight)
    # a sharded BLIP-2 checkpoint: the Q-Former shard is read, the vision / LLM shard never opened
    blip2 = tmp_path / "blip2"
    blip2.mkdir()
    qformer_state = {f"qformer.{k}": v.contiguous() for k, v in reference.state_dict().items()}
    qformer_state["query_tokens"] = torch.randn(1, 5, 48)
    save_file(qformer_state, str(blip2 / "model-00002-of-00002.safetensors"))
    (blip2 / "model-00001-of-00002.safetensors").write_bytes(b"not read: it holds only vision_model.* keys")
    weight_map = {k: "model-00002-of-00002.safetensors" for k in qformer_state}
    weight_map["vision_model.embeddings.patch_embedding.weight"] = "model-00001-of-00002.safetensors"
    (blip2 / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    other = blip2_sized()
    assert other.init_from_checkpoint(blip2) == ["proj.bias", "proj.weight"]
    assert torch.equal(other.query_tokens, qformer_state["query_tokens"])
    with pytest.raises(ValueError, match=r"blip2: the BLIP-2 Q-Former does not fit this QFormerConfig"):
        blip2_sized(hidden_size=32, num_heads=2).init_from_checkpoint(blip2)
    with pytest.raises(ValueError, match="model-00001-of-00002.safetensors is not a readable safetensors file"):
        blip2_sized().init_from_checkpoint(blip2 / "model-00001-of-00002.safetensors")
    with pytest.raises(ValueError, match="cannot start from a pretrained checkpoint.*kinds that can: qformer"):
        build_connector("linear", vision_dim=4, llm_dim=4).init_from_checkpoint(blip2)


@pytest.mark.parametrize("direction", ["past", "future"])
def test_the_block_mask_lets_a_frame_see_only_its_own_side(direction):
    """Per-frame block mask: with 'past', changing frame 2 leaves frames 0-1 as they were; 'future' mirrors it."""
    torch.manual_seed(0)
    block = BertAttention(16, 2, eps=1e-12, dropout=0.0, attention_dropout=0.0).eval()
    x = torch.randn(1, 9, 16)  # 3 frames of 3 tokens
    changed = x.clone()
    frame = slice(6, 9) if direction == "past" else slice(0, 3)
    changed[:, frame] += 1.0
    mask = block_causal(3, direction=direction)
    with torch.no_grad():
        a, b = block(x, mask=mask), block(changed, mask=mask)
    untouched = slice(0, 6) if direction == "past" else slice(3, 9)
    torch.testing.assert_close(a[:, untouched], b[:, untouched], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, frame], b[:, frame])


@pytest.mark.parametrize("carry", [False, True])
def test_each_layers_causal_attention_reads_the_entering_tokens_as_the_official_code_unless_carried(carry, tmp_path):
    """Official FAVOR: every layer's causal attention reads the window tokens as they entered (its output feeds
    only that layer's cross-attention); ``encoder_attention_carry`` reads the previous layer's output instead.
    Q-Formers saved before the switch existed load with it on (how they were trained)."""
    ours = blip2_sized(encoder_attention="past", window_positions=True, num_layers=2, encoder_attention_carry=carry)
    seen, made = [], []

    def record(module, args, out):
        seen.append(args[0])
        made.append(out)

    hooks = [layer.encoder_attention.register_forward_hook(record) for layer in ours.layers]
    with torch.no_grad():
        ours(torch.randn(2, 12, 40))
    for h in hooks:
        h.remove()
    assert torch.equal(seen[1], made[0] if carry else seen[0]) and not torch.equal(made[0], seen[0])
    # a connector saved before the switch existed (no field) loads with the carried states it was trained with
    import json

    from mmkit.adapters import load_adapter

    ours.save_adapter(tmp_path / "q")
    payload = json.loads((tmp_path / "q" / "adapter.json").read_text())
    del payload["config"]["encoder_attention_carry"]
    (tmp_path / "q" / "adapter.json").write_text(json.dumps(payload))
    loaded = load_adapter(tmp_path / "q")[0].config
    assert loaded.encoder_attention_carry is True and loaded.diversity_on == "queries"  # that field was saved
    del payload["config"]["diversity_on"]
    (tmp_path / "q" / "adapter.json").write_text(json.dumps(payload))
    assert load_adapter(tmp_path / "q")[0].config.diversity_on == "tokens"  # saved before the field: as trained
    from mmkit.adapters import AdapterMismatch, load_adapter_weights

    fresh = blip2_sized(encoder_attention="past", window_positions=True, num_layers=2)  # today's default: no carry
    with pytest.raises(AdapterMismatch, match=r"encoder_attention_carry \(saved True, model False\)"):
        load_adapter_weights(fresh, tmp_path / "q")  # resuming an older run with today's defaults stops


def test_windows_are_ragged_per_clip_and_independent_of_padding():
    ours = blip2_sized(encoder_attention="past", window_positions=True)
    clip = torch.randn(1, 5 * 4, 40)  # 5 frames of 4 tokens
    short = torch.randn(1, 2 * 4, 40)  # 2 frames
    batch = torch.cat([clip, torch.cat([short, torch.randn(1, 12, 40)], 1)])  # the short clip padded with noise
    mask = torch.tensor([[True] * 20, [True] * 8 + [False] * 12])
    with torch.no_grad():
        tokens, out_mask = ours(batch, mask)
        alone, _ = ours(clip)
        short_alone, short_mask = ours(short)
    assert tokens.shape == (2, 2 * 5, 8) and ours.num_output_tokens(20) == 10  # ceil(5 frames / 3) windows of 5 queries
    assert out_mask.tolist() == [[True] * 10, [True] * 5 + [False] * 5]
    torch.testing.assert_close(tokens[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[1, :5], short_alone[0], atol=1e-5, rtol=1e-5)  # padding changes nothing
    with pytest.raises(ValueError, match="whole frames of tokens_per_frame=4"):
        ours(torch.randn(1, 7, 40))


def _mean_pairwise_cosine(windows):
    expected = []
    for w in windows:  # (Q, d)
        z = torch.nn.functional.normalize(w, dim=-1)
        sim = z @ z.T
        expected.append((sim.sum() - sim.diagonal().sum()) / (len(w) * (len(w) - 1)))
    return torch.stack(expected).mean()


def test_diversity_loss_is_the_mean_pairwise_cosine_of_each_real_windows_query_outputs():
    """As the official calc_diversity_loss: on the Q-Former's query states (hidden 48 here), before the projection
    to the LLM; padding-only windows do not count, and the loss carries gradient into the Q-Former."""
    from mmkit.connectors import LossContext

    torch.manual_seed(0)
    ours = blip2_sized(diversity_weight=0.01).train()
    features = torch.randn(2, 20, 40)  # 5 frames of 4 tokens -> 2 windows of 3 frames per clip
    mask = torch.tensor([[True] * 20, [True] * 8 + [False] * 12])  # clip 1 has 2 frames: its 2nd window is padding
    tokens, out_mask = ours(features, mask)
    window, window_mask, _ = ours.windows(features, mask)
    states = ours.query_states(window, window_mask).detach()  # (4 windows, 5 queries, 48)
    out = ours.losses(tokens, out_mask, LossContext(llm=None))
    torch.testing.assert_close(out.logged["diversity_loss"], _mean_pairwise_cosine([states[0], states[1], states[2]]))
    torch.testing.assert_close(out.total, 0.01 * out.logged["diversity_loss"])
    out.total.backward()
    assert ours.query_tokens.grad is not None and ours.query_tokens.grad.abs().sum() > 0
    assert ours.proj.weight.grad is None  # the projection is not part of this loss
    with pytest.raises(RuntimeError, match="needs a forward pass first"):
        ours.losses(tokens, out_mask, LossContext(llm=None))  # each forward's states are read once
    ours(features[:1], mask[:1])
    with pytest.raises(RuntimeError, match=r"got tokens \(2, 10, 8\) but the latest forward made 2 windows"):
        ours.losses(tokens, out_mask, LossContext(llm=None))  # not the tokens of that forward
    # the older reading (diversity_on="tokens"): on the projected LLM tokens handed in
    ours = blip2_sized(diversity_weight=0.01, diversity_on="tokens")
    tokens = torch.randn(2, 10, 8)
    out = ours.losses(tokens, out_mask, LossContext(llm=None))
    torch.testing.assert_close(out.logged["diversity_loss"],
                               _mean_pairwise_cosine([tokens[0, :5], tokens[0, 5:], tokens[1, :5]]))
    assert blip2_sized(diversity_weight=0.0).losses(tokens, out_mask, LossContext(llm=None)) is None
    with pytest.raises(ValueError, match="diversity_on must be one of"):
        blip2_sized(diversity_on="outputs")


def test_the_connector_compiles_into_one_graph():
    import torch._dynamo as dynamo

    ours = blip2_sized(encoder_attention="past", window_positions=True)
    mask = torch.tensor([[True] * 20, [True] * 8 + [False] * 12])
    dynamo.reset()
    explained = dynamo.explain(ours)(torch.randn(2, 20, 40), mask)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    dynamo.reset()


def test_favors_defaults():
    cfg = build_connector("qformer", vision_dim=1536, llm_dim=4096).config
    assert (cfg.num_layers, cfg.num_queries, cfg.hidden_size, cfg.num_heads, cfg.cross_attention_every,
            cfg.frames_per_window, cfg.encoder_attention, cfg.diversity_weight, cfg.encoder_attention_carry, cfg.diversity_on) == (
        2, 32, 768, 12, 1, 10, "past", 0.01, False, "queries")
    with pytest.raises(ValueError, match="encoder_attention must be one of"):
        build_connector("qformer", vision_dim=8, llm_dim=8, encoder_attention="causal")


def test_cross_attention_every_2_leaves_the_odd_layers_without_window_attention():
    """Only layers 0, 2, ... read the window; the connector's output still depends on it through them."""
    ours = blip2_sized(num_layers=4, cross_attention_every=2, encoder_attention="past", window_positions=True)
    names = {name for name, _ in ours.named_modules()}
    for i in range(4):
        reads = i % 2 == 0
        assert (f"layers.{i}.crossattention" in names) is reads, i
        assert (f"layers.{i}.encoder_attention" in names) is reads, i
        assert ours.layers[i].has_cross_attention is reads
    g = torch.Generator().manual_seed(1)
    clip = torch.randn(1, 12, 40, generator=g)
    other = clip.clone()
    other[:, 4:8] = torch.randn(1, 4, 40, generator=g)  # a different middle frame
    with torch.no_grad():
        a, _ = ours(clip)
        b, _ = ours(other)
    assert (a - b).abs().max() > 1e-3
    # carried states pass a layer without cross-attention unchanged: layer 2 reads what layer 0's attention made
    carried = blip2_sized(num_layers=4, cross_attention_every=2, encoder_attention="past", encoder_attention_carry=True)
    seen, made = [], []

    def record(module, args, out):
        seen.append(args[0])
        made.append(out)

    hooks = [carried.layers[i].encoder_attention.register_forward_hook(record) for i in (0, 2)]
    with torch.no_grad():
        carried(clip)
    for h in hooks:
        h.remove()
    assert torch.equal(seen[1], made[0]) and not torch.equal(made[0], seen[0])


def test_with_cross_attention_every_2_and_the_causal_part_off_it_is_the_transformers_blip2_qformer():
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    torch.manual_seed(7)
    reference = Blip2QFormerModel(Blip2QFormerConfig(
        hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=68, cross_attention_frequency=2,
        encoder_hidden_size=40, max_position_embeddings=64, vocab_size=97, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)).eval()
    assert [layer.has_cross_attention for layer in reference.encoder.layer] == [True, False, True, False]
    ours = blip2_sized(num_layers=4, cross_attention_every=2)
    assert ours.load_blip2_qformer(reference) == ["proj.bias", "proj.weight", "query_tokens"]
    assert_same_query_states(ours, reference, real_tokens=8)


@pytest.mark.parametrize("positions", [False, True])
def test_window_positions_make_the_order_of_frames_in_a_window_matter(positions):
    """Cross-attention alone is blind to the order of a window's tokens; the learned positions are not."""
    ours = blip2_sized(window_positions=positions)
    if positions:
        with torch.no_grad():
            ours.window_position.weight.normal_(0, 1.0)  # trained positions, not the 0.02 start
    g = torch.Generator().manual_seed(2)
    clip = torch.randn(1, 24, 40, generator=g)  # 6 frames of 4 tokens: 2 windows of 3 frames
    swapped = clip.clone()
    swapped[:, 0:4], swapped[:, 8:12] = clip[:, 8:12], clip[:, 0:4]  # frames 0 and 2 of the first window
    with torch.no_grad():
        a, _ = ours(clip)
        b, _ = ours(swapped)
    torch.testing.assert_close(a[:, 5:], b[:, 5:], atol=1e-5, rtol=1e-5)  # the second window is untouched
    if positions:
        assert (a[:, :5] - b[:, :5]).abs().max() > 1e-3
    else:
        torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("direction", ["past", "future"])
def test_the_connectors_causal_attention_lets_a_frame_see_only_its_own_side(direction):
    """Through the whole connector (window positions, padding mask, every layer): with 'future' the first frame's
    tokens do not reach later frames' mixed tokens while the last frame's reach the first; 'past' mirrors it."""
    ours = blip2_sized(encoder_attention=direction, window_positions=True, num_layers=2)
    g = torch.Generator().manual_seed(3)
    clip = torch.randn(1, 12, 40, generator=g)  # one window: 3 frames of 4 tokens
    first, last = slice(0, 4), slice(8, 12)

    def mixed(features):
        made = []
        hooks = [layer.encoder_attention.register_forward_hook(lambda m, args, out: made.append(out))
                 for layer in ours.layers]
        with torch.no_grad():
            ours(features)
        for h in hooks:
            h.remove()
        return made  # per layer, (1, 12, 40)

    def changed(frame):
        other = clip.clone()
        other[:, frame] = torch.randn(1, 4, 40, generator=g)
        return other

    base, new_first, new_last = mixed(clip), mixed(changed(first)), mixed(changed(last))
    for layer in range(2):
        if direction == "future":  # frame f sees frames >= f
            torch.testing.assert_close(base[layer][:, 4:], new_first[layer][:, 4:], atol=1e-6, rtol=0)
            assert (base[layer][:, first] - new_last[layer][:, first]).abs().max() > 1e-3
        else:  # frame f sees frames <= f
            torch.testing.assert_close(base[layer][:, :8], new_last[layer][:, :8], atol=1e-6, rtol=0)
            assert (base[layer][:, last] - new_first[layer][:, last]).abs().max() > 1e-3


@pytest.mark.parametrize("direction", ["past", "future"])
def test_identity_start_is_the_plain_qformer_at_initialisation_and_still_learns_to_mix(direction):
    """``encoder_attention_init="identity"`` zeroes the causal block's output projection: at the start the
    connector equals the one without encoder attention (same other weights; the window tokens are already
    normalised by the window positions' LayerNorm), and the zeroed projection gets a gradient, so mixing grows."""
    causal = blip2_sized(encoder_attention=direction, window_positions=True, num_layers=2,
                         encoder_attention_init="identity")
    plain = blip2_sized(encoder_attention="none", window_positions=True, num_layers=2)
    unexpected = plain.load_state_dict(causal.state_dict(), strict=False).unexpected_keys
    assert unexpected and all(".encoder_attention." in k for k in unexpected)
    clip, mask = torch.randn(2, 24, 40), torch.tensor([[True] * 24, [True] * 16 + [False] * 8])
    with torch.no_grad():
        torch.testing.assert_close(causal(clip, mask)[0], plain(clip, mask)[0], atol=1e-5, rtol=1e-5)
    bert = blip2_sized(encoder_attention=direction, window_positions=True, num_layers=2)  # the default start mixes
    bert.load_state_dict({k: v for k, v in causal.state_dict().items() if "encoder_attention.output.dense" not in k},
                         strict=False)
    with torch.no_grad():
        assert (bert(clip, mask)[0] - plain(clip, mask)[0]).abs().max() > 1e-3
    causal.train()
    causal(clip, mask)[0].square().sum().backward()
    assert all(layer.encoder_attention.output.dense.weight.grad.abs().sum() > 0 for layer in causal.layers)
    with pytest.raises(ValueError, match="encoder_attention_init must be one of"):
        build_connector("qformer", vision_dim=8, llm_dim=8, encoder_attention_init="zero")
    with pytest.raises(ValueError, match="encoder_attention='none' has none"):
        build_connector("qformer", vision_dim=8, llm_dim=8, encoder_attention="none", encoder_attention_init="identity")


def test_a_qformer_trained_from_the_identity_start_loads_into_one_built_with_the_default(tmp_path):
    """How fresh weights were drawn is no part of the model: the saved weights load whichever start it names."""
    from mmkit.adapters import load_adapter_weights

    trained = blip2_sized(encoder_attention="past", window_positions=True, encoder_attention_init="identity")
    with torch.no_grad():
        trained.layers[0].encoder_attention.output.dense.weight.add_(0.5)
    trained.save(tmp_path / "q")
    other = blip2_sized(encoder_attention="past", window_positions=True)
    load_adapter_weights(other, tmp_path / "q")
    clip = torch.randn(1, 12, 40)
    with torch.no_grad():
        torch.testing.assert_close(other(clip)[0], trained(clip)[0])
