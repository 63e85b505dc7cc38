"""NeTI: the mapper's formulas (Fourier features, anchor init, nested dropout, truncation, both re-scalings),
the concept encoder against an independent CLIP computation, the per-layer contexts reaching the right
cross-attention layer, equivalence with textual inversion when the mapper is constant, the cache, training
gradients, removal, compile, saving and the bad inputs."""

import math

import pytest
import torch
from test_diffusion_patch import tiny_pipeline  # pytest prepends tests/ to sys.path

from mmkit.adapters import build_adapter, load_adapter
from mmkit.diffusion import AgentSD, NeTIConfig, NeTIMapper, NeTIPatch, patch
from mmkit.diffusion.agent_sd import AgentSDConfig, AgentSDStep
from mmkit.diffusion.neti import cross_attention_layers, final_norm
from mmkit.diffusion.text_projection import TextProjectionPatch

PROMPT = "a red <S*>"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def sample(pipe, prompt=PROMPT, steps=3, **kw):
    return pipe(prompt, num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                output_type="pt", **kw).images


def small_mapper(pipe, **overrides):
    torch.manual_seed(0)
    cfg = dict(token_dim=pipe.text_encoder.config.hidden_size, num_layers=n_cross(pipe), num_frequencies=64,
               hidden_dim=16, super_category="red")
    return NeTIMapper(NeTIConfig(**{**cfg, **overrides})).eval()


def n_cross(pipe):
    return sum(1 for m in pipe.unet.attn_processors if "attn2" in m)


# ---------------------------------------------------------------------- the mapper
def test_fourier_features_and_the_anchor_layer_match_a_float64_computation():
    m = NeTIMapper(NeTIConfig(token_dim=12, num_layers=3, num_frequencies=32, time_anchors=4, hidden_dim=8))
    w = m.frequencies.double()
    assert torch.allclose(w.std(0), torch.tensor([0.03, 2.0], dtype=torch.float64), rtol=0.35)

    def enc(t, layer):
        z = w @ torch.tensor([t, layer], dtype=torch.float64)
        v = torch.cat([z.sin(), z.cos()])
        return v / v.norm()

    got = m.encode(torch.tensor([999.0, 250.0]), torch.tensor([2.0, 0.0])).double()
    torch.testing.assert_close(got, torch.stack([enc(999, 2), enc(250, 0)]), atol=1e-5, rtol=0)
    anchors = [enc(t, layer) for t in (0, 250, 500, 750) for layer in range(3)]  # time-major, 4 x 3 rows
    torch.testing.assert_close(m.input_layer.weight.double(), torch.stack(anchors), atol=1e-5, rtol=0)


def test_nested_dropout_truncation_and_both_rescalings():
    cfg = NeTIConfig(token_dim=6, num_layers=2, num_frequencies=16, hidden_dim=10, nested_dropout=1.0, norm_scale=3.0)
    m = NeTIMapper(cfg)
    t, lay = torch.full((64,), 500.0), torch.zeros(64)
    m.train()
    h = m.code(t, lay)
    cut = (h != 0).sum(1)  # rows keep a prefix of the dims: zero from the cut on
    for row, k in zip(h, cut):
        assert (row[:k] != 0).all() and (row[k:] == 0).all()
    assert len(set(cut.tolist())) > 3  # a cut per row
    m.eval()
    assert (m.code(t, lay) != 0).all()  # no dropout at inference
    assert (m.code(t, lay, truncation=4)[:, 4:] == 0).all() and (m.code(t, lay, truncation=4)[:, :4] != 0).all()
    token, bypass = m(t[:2], lay[:2])
    torch.testing.assert_close(torch.cat([token, bypass], 1).norm(dim=1), torch.full((2,), 3.0))  # official
    m.config.rescale = "token"
    token2, bypass2 = m(t[:2], lay[:2])
    torch.testing.assert_close(token2.norm(dim=1), torch.full((2,), 3.0))  # the paper's wording
    m.config.nested_dropout = 0.0
    m.train()
    torch.testing.assert_close(m.code(t, lay), NeTIMapper.code(m.eval(), t, lay))


def test_the_mapper_depends_on_time_and_layer_and_saves_as_an_adapter(tmp_path):
    m = NeTIMapper(NeTIConfig(token_dim=8, num_layers=4, num_frequencies=32, hidden_dim=8)).eval()
    a, _ = m(torch.tensor([900.0, 100.0, 900.0]), torch.tensor([0, 0, 3]))
    assert not torch.allclose(a[0], a[1]) and not torch.allclose(a[0], a[2])
    m.save_adapter(tmp_path / "neti")
    back, _ = load_adapter(tmp_path / "neti")
    b, _ = back.eval()(torch.tensor([900.0, 100.0, 900.0]), torch.tensor([0, 0, 3]))
    assert torch.equal(a, b) and torch.equal(back.frequencies, m.frequencies)


# ---------------------------------------------------------------------- the text side
def test_concept_encoder_matches_an_independent_clip_computation(pipe):
    m = small_mapper(pipe)
    p = NeTIPatch(m)
    with patch(pipe, p):
        ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=13, return_tensors="pt")["input_ids"]
        t = 700.0
        keys, values = p.contexts(ids, None, t)  # (n, 1, L, d)
        pid = p.placeholder_id()
        base = p.encoder.base_id
    te = pipe.text_encoder
    at = (ids == pid)[0]
    assert at.sum() == 1
    for layer in (0, keys.shape[0] - 1):
        token, bypass = m(torch.tensor([t]), torch.tensor([layer]))
        with torch.no_grad():
            # a textual-inversion style run: the embedding table with the concept's row set to the token
            emb = te.get_input_embeddings().weight.clone()
            row = torch.cat([emb, token.detach()], 0)
            ids_ti = torch.where(ids == pid, torch.full_like(ids, emb.shape[0]), ids)
            old = te.get_input_embeddings()
            te.set_input_embeddings(torch.nn.Embedding.from_pretrained(row))
            try:
                out = te(input_ids=ids_ti, output_hidden_states=True)
            finally:
                te.set_input_embeddings(old)
            h = out.hidden_states[-1][0]  # (L, d) before the final layer norm
            b = bypass[0] / bypass[0].norm()
            h2 = h.clone()
            h2[at] = h[at] + 0.2 * b * h[at].norm(dim=-1, keepdim=True)
            ref_values = getattr(te, "text_model", te).final_layer_norm(h2)
        torch.testing.assert_close(keys[layer, 0], out.last_hidden_state[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values[layer, 0], ref_values, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(keys[0], keys[-1])  # a different token per layer
    assert base == pipe.tokenizer("red", add_special_tokens=False)["input_ids"][0]


def test_final_norm_is_found_for_clip_and_bert_and_refused_otherwise():
    from mmkit.testing.tiny import tiny_clip_text

    clip = tiny_clip_text()
    assert final_norm(clip) is getattr(clip, "text_model", clip).final_layer_norm
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=16))
    assert final_norm(bert) is bert.encoder.layer[-1].output.LayerNorm
    with pytest.raises(ValueError, match="cannot find the final layer norm of Linear; accepted: .*CLIPTextModel"):
        final_norm(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------- the UNet side
def test_every_cross_attention_layer_gets_its_own_contexts(pipe):
    m = small_mapper(pipe)
    p = NeTIPatch(m)
    seen = {}
    layers = [name[: -len(".processor")] for name in cross_attention_layers(pipe.unet)]
    blocks = [name.split(".")[0] for name in layers]
    assert blocks == sorted(blocks, key=["down_blocks", "mid_block", "up_blocks"].index)  # as a forward runs them
    handles = []
    for i, name in enumerate(layers):
        attn = pipe.unet.get_submodule(name)
        handles.append(attn.to_k.register_forward_pre_hook(lambda mod, a, i=i: seen.setdefault(("k", i), a[0].clone())))
        handles.append(attn.to_v.register_forward_pre_hook(lambda mod, a, i=i: seen.setdefault(("v", i), a[0].clone())))
    with patch(pipe, p):
        sample(pipe, steps=1)
        ids = p._run[1]
        t = float(pipe.scheduler.timesteps[0])
        keys, values = p.contexts(ids, None, t)
    for h in handles:
        h.remove()
    for i in range(len(layers)):
        k, v = seen[("k", i)], seen[("v", i)]  # (2, L, d): [negative, positive]
        torch.testing.assert_close(k[1], keys[i, 0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(v[1], values[i, 0], atol=1e-6, rtol=1e-6)
        assert torch.equal(k[0], v[0])  # the negative prompt: the pipeline's own context, no bypass
    assert not torch.allclose(seen[("k", 0)][1], seen[("k", len(layers) - 1)][1])


def test_a_constant_mapper_without_bypass_is_textual_inversion(pipe):
    """Same token for every (t, l) and no bypass: NeTI must equal plain textual inversion with that token."""
    m = small_mapper(pipe, output_bypass=False)
    with torch.no_grad():
        m.input_layer.weight.zero_()
    p = NeTIPatch(m)
    with patch(pipe, p):
        got = sample(pipe)
        ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=13, return_tensors="pt")["input_ids"]
        neg = pipe.tokenizer([""], padding="max_length", max_length=13, return_tensors="pt")["input_ids"]
        token, _ = m(torch.tensor([0.0]), torch.tensor([0]))
        pid = p.placeholder_id()
    te = pipe.text_encoder
    emb = te.get_input_embeddings().weight
    table = torch.nn.Embedding.from_pretrained(torch.cat([emb, token.detach()], 0))
    old = te.get_input_embeddings()
    te.set_input_embeddings(table)
    try:
        with torch.no_grad():
            cond = te(input_ids=torch.where(ids == pid, torch.full_like(ids, emb.shape[0]), ids)).last_hidden_state
            uncond = te(input_ids=neg).last_hidden_state
    finally:
        te.set_input_embeddings(old)
    ref = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=3, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_prompts_without_the_concept_are_untouched_batches_mix_and_removal_restores(pipe):
    before_plain = sample(pipe, "a red circle")
    before_ids = pipe.tokenizer(PROMPT)["input_ids"]
    noise = torch.randn((4, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    p = NeTIPatch(small_mapper(pipe))
    mapped = []
    with patch(pipe, p):
        with pytest.warns(UserWarning, match="no prompt of this run names the concept"):
            assert torch.equal(sample(pipe, "a red circle"), before_plain)
        run_mapper = p.contexts
        p.contexts = lambda *a, **k: mapped.append(1) or run_mapper(*a, **k)  # counts the mapper + encoder runs
        mixed = sample(pipe, [PROMPT, "a red circle"], num_images_per_prompt=2, latents=noise)
        alone = sample(pipe, PROMPT, num_images_per_prompt=2, latents=noise[:2])
        again = sample(pipe, PROMPT, num_images_per_prompt=2, latents=noise[:2])
        assert len(p._cache) == 6 and len(mapped) == 6  # per (prompts, timestep) of 2 concept batches; the 3rd reused
    torch.testing.assert_close(mixed[:2], alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(alone, again)
    # the plain rows of the mixed batch: the same as a plain batch started from the same noise
    plain = sample(pipe, "a red circle", num_images_per_prompt=2, latents=noise[2:])
    torch.testing.assert_close(mixed[2:], plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(alone, sample(pipe, PROMPT, num_images_per_prompt=2, latents=noise[:2]), atol=1e-3)
    assert pipe.tokenizer(PROMPT)["input_ids"] == before_ids  # the tokenizer is back
    assert torch.equal(sample(pipe, "a red circle"), before_plain)


def test_the_text_encoder_runs_once_per_step_for_all_layers(pipe):
    """NeTI's per-layer contexts come from one text-encoder call per denoising step, batched over the UNet's
    cross-attention layers (and the per-prompt cache spares even that on a repeated run)."""
    calls = []
    hook = pipe.text_encoder.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        sample(pipe, steps=3)
        own = len(calls)  # the pipeline's own prompt encoding
        calls.clear()
        with patch(pipe, NeTIPatch(small_mapper(pipe))):
            sample(pipe, steps=3)
            first = len(calls)
            calls.clear()
            sample(pipe, steps=3)
    finally:
        hook.remove()
    assert n_cross(pipe) > 1 and first == own + 3 and len(calls) == own


def test_truncation_changes_the_images_and_zero_truncation_ignores_the_code(pipe):
    m = small_mapper(pipe)
    with patch(pipe, NeTIPatch(m, truncation=0)):
        zero = sample(pipe, steps=2)
    with patch(pipe, NeTIPatch(m, truncation=4)):
        four = sample(pipe, steps=2)
    with patch(pipe, NeTIPatch(m)):
        full = sample(pipe, steps=2)
    assert not torch.allclose(zero, four) and not torch.allclose(four, full)


def test_training_gradients_reach_only_the_mapper(pipe):
    m = small_mapper(pipe).train()
    p = NeTIPatch(m, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, auto=False)
    unet = pipe.unet
    frozen = (unet, pipe.text_encoder)
    for module in frozen:
        module.requires_grad_(False)
    try:
        with patch(unet, p):
            out, ctx = train_step(pipe, p)
        out.pow(2).mean().backward()
    finally:
        for module in frozen:
            module.requires_grad_(True)
    grads = [q.grad for q in m.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(q.grad is None for module in frozen for q in module.parameters())


def train_step(pipe, p):
    """One forward as a NeTI training loop makes it: contexts for each row's own timestep, then the UNet."""
    ids = pipe.tokenizer([PROMPT, PROMPT], padding="max_length", max_length=13, return_tensors="pt")["input_ids"]
    t = torch.tensor([900, 100])
    ctx = p.condition(ids, None, t)
    assert p.runtime.keys.shape[:2] == (n_cross(pipe), 2)
    out = pipe.unet(torch.randn(2, 4, 16, 16), t, encoder_hidden_states=ctx).sample
    return out, ctx


def test_composes_with_text_projection_and_agent_sd_and_compiles(pipe):
    import torch._dynamo as dynamo

    steps = (AgentSDStep(start_step=0, sx=2, sy=2),)
    torch.manual_seed(1)
    projector = build_adapter("wiclp", dim=pipe.text_encoder.config.hidden_size)
    with torch.no_grad():  # a trained-looking WiCLP (its zero init would change nothing)
        for q in projector.parameters():
            q.add_(0.05 * torch.randn_like(q))
    patches = lambda: (NeTIPatch(small_mapper(pipe)), TextProjectionPatch(projector),  # noqa: E731
                       AgentSD(AgentSDConfig(schedule=steps, use_rand=False)))
    before = sample(pipe, steps=2)
    with patch(pipe, *patches()):
        eager = sample(pipe, steps=2)
    assert torch.equal(sample(pipe, steps=2), before)
    with patch(pipe, *patches()[:2]):
        without_agents = sample(pipe, steps=2)
    with patch(pipe, patches()[0]):
        neti_only = sample(pipe, steps=2)
    for other in (before, without_agents, neti_only):  # each of the three acts on the composed output
        assert not torch.allclose(eager, other, atol=1e-4)
    assert not torch.allclose(without_agents, neti_only, atol=1e-4)
    unet = pipe.unet
    dynamo.reset()
    dynamo.utils.counters.clear()
    pipe.unet = torch.compile(unet, fullgraph=True, backend="aot_eager")
    try:
        with patch(pipe, *patches()):
            compiled = sample(pipe, steps=2)
            sample(pipe, steps=2)
        frames = dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        pipe.unet = unet
        dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert frames <= 1 + 1 + 1, frames  # the UNet, NeTI's layout hook, WiCLP's hook; never one per step


def test_bad_inputs_name_both_sides(pipe):
    with pytest.raises(ValueError, match=r"trained for a UNet with 5 cross-attention layers, but UNet2DConditionModel "
                                         rf"has {n_cross(pipe)}"):
        patch(pipe, NeTIPatch(small_mapper(pipe, num_layers=5)))
    with pytest.raises(ValueError, match="makes 10-d token embeddings, but the UNet's cross-attention takes 24-d"):
        patch(pipe, NeTIPatch(small_mapper(pipe, token_dim=10)))
    with pytest.raises(ValueError, match="super-category word 'red circle' must be one token"):
        patch(pipe, NeTIPatch(small_mapper(pipe, super_category="red circle")))
    with pytest.raises(ValueError, match=r"truncation must be in \[0, 16\]"):
        small_mapper(pipe)(torch.tensor([1.0]), torch.tensor([0]), truncation=17)
    with pytest.raises(ValueError, match="rescale must be one of"):
        NeTIConfig(rescale="both")
    assert math.isfinite(sample(pipe, "a red circle").sum().item())  # nothing left behind by the failures


def test_a_text_projection_of_the_same_call_also_projects_netis_contexts(pipe):
    dim = pipe.text_encoder.config.hidden_size
    clp = build_adapter("clp", dim=dim)
    with torch.no_grad():
        clp.proj.weight.mul_(2.0)  # x -> 2x
    p = NeTIPatch(small_mapper(pipe))
    first = [name[: -len(".processor")] for name in pipe.unet.attn_processors if "attn2" in name][0]
    seen = []
    h = pipe.unet.get_submodule(first).to_k.register_forward_pre_hook(lambda mod, a: seen.append(a[0].clone()))
    try:
        with patch(pipe, p, TextProjectionPatch(clp, switch_off=250)):
            sample(pipe, steps=2)  # DDIM timesteps 501 (projected) and 1 (not)
            ids = p._run[1]
            early, late = (p.contexts(ids, None, float(t))[0][0, 0] for t in pipe.scheduler.timesteps)
    finally:
        h.remove()
    assert [float(t) for t in pipe.scheduler.timesteps] == [501.0, 1.0]
    torch.testing.assert_close(seen[0][1], 2 * early, atol=1e-5, rtol=1e-5)  # the concept row, projected
    torch.testing.assert_close(seen[1][1], late, atol=1e-5, rtol=1e-5)  # after the switch-off: NeTI's own
    assert torch.equal(seen[0][0], seen[1][0])  # the unconditional row: the pipeline's states, never projected


def test_sampling_runs_the_mapper_without_nested_dropout_even_in_train_mode(pipe):
    m = small_mapper(pipe, nested_dropout=1.0)
    with patch(pipe, NeTIPatch(m)):
        reference = sample(pipe, steps=2)
    m.train()  # e.g. a mapper sampled from inside its training loop
    with patch(pipe, NeTIPatch(m)):
        again = sample(pipe, steps=2)
    assert torch.equal(reference, again) and m.training  # no dropout draws; the mode is left as it was


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_the_layer_count_is_read_from_sd_shaped_unets(version):
    """SD 1.x / 2.x UNet layouts (4 resolutions, 2 layers per block: 16 cross-attention layers) at tiny widths:
    NeTI finds their 16 layers, in the order the UNet runs them, and a mapper for 16 layers applies."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 8, 8, 8), layers_per_block=2, norm_num_groups=4, cross_attention_dim=12,
        attention_head_dim=2 if version == "sd1" else (2, 2, 2, 2), use_linear_projection=version == "sd2",
    ).eval()  # the default block types are SD's: 3 cross-attention down blocks + 1 plain, mirrored up, a mid block
    paths = cross_attention_layers(unet)
    assert len(paths) == 16 and paths[0].startswith("down_blocks.0") and paths[-1].startswith("up_blocks.3")
    assert sum(p.startswith("mid_block") for p in paths) == 1
    mapper = NeTIMapper(NeTIConfig(token_dim=12, num_layers=16, num_frequencies=8, hidden_dim=8, super_category="red"))
    with patch(unet, NeTIPatch(mapper, auto=False)):
        pass
    with pytest.raises(ValueError, match="trained for a UNet with 4 cross-attention layers.*has 16"):
        patch(unet, NeTIPatch(NeTIMapper(NeTIConfig(token_dim=12, num_layers=4, num_frequencies=8, hidden_dim=8,
                                                    super_category="red")), auto=False))
