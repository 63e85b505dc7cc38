"""AgentSD and ToMe patches: the two-softmax formula, no-op settings, the step schedule, merge shapes."""

import math

import pytest
import torch
from test_diffusion_patch import run, sample_pipe, tiny_pipeline  # pytest prepends tests/ to sys.path

from mmkit.diffusion import (
    AgentSD,
    AgentSDAttnProcessor,
    AgentSDConfig,
    AgentSDStep,
    DenoiseContext,
    MergeRuntime,
    ToMe,
    ToMeConfig,
    patch,
)
from mmkit.diffusion.tome import plan_merges
from mmkit.ops.tome import bipartite_soft_matching_2d


# ---------------------------------------------------------------------- configs
def test_published_defaults():
    c = AgentSDConfig()
    assert [(e.start_step, e.ratio, e.agent_ratio, e.sx, e.sy) for e in c.schedule] == [
        (0, 0.4, 0.95, 4, 4), (20, 0.4, 0.5, 2, 2)
    ]
    assert (c.max_downsample, c.agent_scale_exponent, c.shortcut, c.use_rand) == (1, 0.3, 0.075, True)
    t = ToMeConfig()
    assert (t.ratio, t.max_downsample, t.sx, t.sy, t.use_rand) == (0.5, 1, 2, 2, True)


def test_configs_are_strict():
    c = AgentSDConfig.from_dict({"schedule": [{"start_step": 0, "ratio": 0.3}, {"start_step": 5, "agent_ratio": 0.0}]})
    assert isinstance(c.schedule[1], AgentSDStep) and c.schedule[1].agent_ratio == 0.0 and c.schedule[0].sx == 4
    with pytest.raises(ValueError, match="did you mean 'agent_ratio'"):
        AgentSDStep.from_dict({"agent_ratoi": 0.9})
    with pytest.raises(ValueError, match="did you mean 'max_downsample'"):
        ToMeConfig.from_dict({"max_downsampling": 2})
    with pytest.raises(ValueError, match="strictly increase"):
        AgentSDConfig(schedule=(AgentSDStep(start_step=3), AgentSDStep(start_step=3)))
    with pytest.raises(ValueError, match="ratio must be in"):
        ToMeConfig(ratio=1.0)
    with pytest.raises(ValueError, match="max_downsample"):
        AgentSDConfig(max_downsample=0)
    assert [e.ratio for e in AgentSD(ratio=0.5).config.schedule] == [0.5, 0.5]


# ---------------------------------------------------------------------- the formula, densely in float64
def _reference(attn, x, grid, *, ratio, agent_ratio, sx, sy, k_scale2=0.3, shortcut=0.075):
    """AgentSD on one layer, written out token by token (top-left destinations, no randomness)."""
    B, N, C = x.shape
    h, w = grid
    is_dst = [(i // w) % sy == 0 and (i % w) % sx == 0 and (i // w) < (h // sy) * sy and (i % w) < (w // sx) * sx
              for i in range(N)]
    dst = [i for i in range(N) if is_dst[i]]
    src = [i for i in range(N) if not is_dst[i]]
    r = min(int(N * ratio), len(src))
    agent_r = min(int(N * agent_ratio), len(src))
    H = attn.heads
    s = attn.scale
    outs = []
    for b in range(B):
        unit = x[b] / x[b].norm(dim=-1, keepdim=True)
        sim = unit[src] @ unit[dst].T  # (num_src, num_dst)
        best, best_dst = sim.max(dim=-1)
        order = best.argsort(descending=True).tolist()

        def groups(n_merged, order=order, best_dst=best_dst):
            g = {d: [d] for d in dst}
            singles = []
            for rank, j in enumerate(order):
                if rank < n_merged:
                    g[dst[best_dst[j]]].append(src[j])
                else:
                    singles.append([src[j]])
            return singles + list(g.values())

        token_groups = groups(r)
        merged = torch.stack([x[b, grp].mean(0) for grp in token_groups])  # (N', C)
        agents_in = torch.stack([x[b, grp].mean(0) for grp in groups(agent_r)])  # (n, C)
        q = attn.to_q(merged).unflatten(-1, (H, -1)).transpose(0, 1)  # (H, N', D)
        k = attn.to_k(merged).unflatten(-1, (H, -1)).transpose(0, 1)
        v = attn.to_v(merged).unflatten(-1, (H, -1)).transpose(0, 1)
        a = attn.to_q(agents_in).unflatten(-1, (H, -1)).transpose(0, 1)  # (H, n, D)
        agent_v = torch.softmax(a @ k.transpose(1, 2) * s, -1) @ v  # (H, n, D)
        o = torch.softmax(q @ a.transpose(1, 2) * s**k_scale2, -1) @ agent_v + shortcut * v  # (H, N', D)
        o = attn.to_out[0](o.transpose(0, 1).flatten(1))  # (N', C)
        full = torch.empty(N, o.shape[-1], dtype=o.dtype)
        for row, grp in enumerate(token_groups):
            full[grp] = o[row]
        outs.append(full)
    return torch.stack(outs), len(token_groups), agents_in.shape[0]


@pytest.mark.parametrize("ratio", [0.4, 0.0])
def test_agent_attention_equals_the_two_softmax_formula_float64(ratio):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(24, heads=3, dim_head=8, out_bias=True).double().eval()
    grid = (6, 8)
    x = torch.randn(2, 48, 24, dtype=torch.float64)
    ctx = DenoiseContext()
    ctx.observe(999, grid)
    step = AgentSDStep(ratio=ratio, agent_ratio=0.95, sx=2, sy=2)
    cfg = AgentSDConfig(schedule=(step,), use_rand=False, backend="eager")
    runtime = MergeRuntime.create(ctx, seed=0)
    proc = AgentSDAttnProcessor(cfg, runtime=runtime, downsample=1, path="layer")
    with torch.no_grad():
        out = proc(attn, x)
        ref, n_merged, n_agents = _reference(attn, x, grid, ratio=ratio, agent_ratio=0.95, sx=2, sy=2)
    rec = runtime.records["layer"]
    assert (rec.tokens, rec.merged_tokens, rec.agents) == (48, n_merged, n_agents) == (48, 48 - int(48 * ratio), 12)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    with torch.no_grad():  # the sdpa backend agrees too
        out_sdpa = AgentSDAttnProcessor(cfg.replace(backend="sdpa"), runtime=runtime, downsample=1)(attn, x)
    torch.testing.assert_close(out_sdpa, ref, atol=1e-10, rtol=1e-8)


def test_agents_only_when_fewer_than_half_the_merged_tokens():
    x = torch.randn(2, 64, 8)
    g = torch.Generator().manual_seed(0)
    # sx = sy = 2: at most 3/4 of the tokens can merge, agents = N/4 -> 16 * 2 < 64 - 25
    merge, agents = plan_merges(x, (8, 8), ratio=0.4, sx=2, sy=2, randomize=True, generator=g, agent_ratio=0.95)
    assert merge.num_out == 64 - 25 and agents.num_out == 16
    # the published later-steps entry (agent_ratio 0.5 at sx = sy = 2) never passes the rule: plain ToMe
    merge, agents = plan_merges(x, (8, 8), ratio=0.4, sx=2, sy=2, randomize=True, generator=g, agent_ratio=0.5)
    assert merge.num_out == 39 and agents is None
    assert plan_merges(x, (8, 8), ratio=0.0, sx=2, sy=2, randomize=True, generator=g) == (None, None)


def _groups(slot_of_token: torch.Tensor, num_slots: int) -> list[tuple[int, ...]]:
    return sorted(tuple(torch.nonzero(slot_of_token == s).flatten().tolist()) for s in range(num_slots))


@pytest.mark.parametrize("randomize", [False, True])
def test_slot_merges_group_tokens_as_the_reference_matching(randomize):
    """plan_merges' slots put together exactly the tokens mmkit.ops.tome's matching merges (in any order),
    merge takes each group's mean and unmerge gives every token its group's value."""
    x = torch.randn(2, 7 * 9, 5, dtype=torch.float64)
    for r_ratio, agent_ratio in ((30 / 63, 0.0), (11 / 63, 0.95)):
        merge, agents = plan_merges(x, (7, 9), ratio=r_ratio, sx=2, sy=3, randomize=randomize,
                                    generator=torch.Generator().manual_seed(0), agent_ratio=agent_ratio)
        for sm, r in ((merge, int(63 * r_ratio)), (agents, 63)):
            if sm is None:
                continue
            tm = bipartite_soft_matching_2d(x, 7, 9, sx=2, sy=3, r=r, generator=torch.Generator().manual_seed(0),
                                            randomize=randomize)
            ref_slots = tm.unmerge(torch.arange(tm.num_out, dtype=torch.float64)[None, :, None].expand(2, -1, 1))
            for b in range(2):
                assert _groups(sm.slots[b], sm.num_out) == _groups(ref_slots[b, :, 0].long(), tm.num_out)
            means = torch.stack([torch.stack([x[b, sm.slots[b] == s].mean(0) for s in range(sm.num_out)])
                                 for b in range(2)])
            torch.testing.assert_close(sm.merge(x), means, atol=1e-14, rtol=0)
            y = torch.randn(2, sm.num_out, 3, dtype=torch.float64)
            back = sm.unmerge(y)
            assert all(torch.equal(back[b, i], y[b, sm.slots[b, i]]) for b in range(2) for i in range(63))


# ---------------------------------------------------------------------- no-op settings
@pytest.mark.parametrize(
    "make",
    [
        lambda: AgentSD(AgentSDConfig(schedule=(AgentSDStep(ratio=0.0, agent_ratio=0.0),))),
        lambda: ToMe(ToMeConfig(ratio=0.0)),
    ],
    ids=["agent_sd", "tome"],
)
def test_ratio_zero_and_no_agents_changes_nothing(unet, inputs, make):
    stock = run(unet, inputs)
    with patch(unet, make()) as handle:
        out = run(unet, inputs)
        assert len(handle.layers) == 3
    torch.testing.assert_close(out, stock, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------- schedule and shapes
def test_schedule_switches_at_the_configured_step():
    from diffusers import DDIMScheduler

    pipe = tiny_pipeline(DDIMScheduler)
    schedule = (
        AgentSDStep(start_step=0, ratio=0.4, agent_ratio=0.95, sx=4, sy=4),
        AgentSDStep(start_step=2, ratio=0.4, agent_ratio=0.5, sx=2, sy=2),
    )
    agent_sd = AgentSD(AgentSDConfig(schedule=schedule, seed=0))
    seen = []
    with patch(pipe, agent_sd) as handle:
        path = next(iter(handle.layers))
        hook = pipe.unet.register_forward_hook(lambda *_: seen.append(agent_sd.runtime.records[path]))
        images = sample_pipe(pipe, steps=4)
        hook.remove()
    assert torch.isfinite(images).all()
    assert [(r.step, r.entry, r.merged_tokens, r.agents) for r in seen] == [
        (0, 0, 154, 16), (1, 0, 154, 16), (2, 1, 154, 0), (3, 1, 154, 0),
    ]
    assert AgentSDConfig(schedule=(AgentSDStep(start_step=3),)).entry_at(1) is None  # before the first entry


def test_steps_before_the_first_entry_are_unpatched(unet, inputs):
    stock = run(unet, inputs)
    with patch(unet, AgentSD(AgentSDConfig(schedule=(AgentSDStep(start_step=1),)))):
        out = run(unet, inputs)  # step 0
    torch.testing.assert_close(out, stock, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [(16, 16), (12, 20), (15, 9)])
def test_tome_merge_shapes_inside_the_processor(unet, size):
    H, W = size
    sample = torch.randn(2, 4, H, W)
    tome = ToMe()
    with patch(unet, tome), torch.no_grad():
        out = unet(sample, 10, torch.randn(2, 5, 24)).sample
    assert out.shape == sample.shape
    records = tome.runtime.records
    assert len(records) == 3
    N = H * W
    for rec in records.values():
        assert rec.grid == (H, W) and rec.tokens == N and rec.merged_tokens == N - int(N * 0.5) and rec.agents == 0


def test_agent_sd_shapes_at_max_downsample_2(unet):
    agent_sd = AgentSD(AgentSDConfig(max_downsample=2, seed=0))
    with patch(unet, agent_sd) as handle, torch.no_grad():
        unet(torch.randn(2, 4, 16, 16), 10, torch.randn(2, 5, 24))
    assert len(handle.layers) == 4  # + the mid block's self-attention at 8x8
    mid = agent_sd.runtime.records["mid_block.attentions.0.transformer_blocks.0.attn1.processor"]
    assert mid.grid == (8, 8) and mid.tokens == 64 and mid.merged_tokens == 64 - 25 and mid.agents == 4


def test_odd_batch_turns_randomness_off(unet):
    ehs1, s1 = torch.randn(1, 5, 24), torch.randn(1, 4, 16, 16)
    outs = []
    for seed in (1, 2):
        with patch(unet, AgentSD(AgentSDConfig(seed=seed))), torch.no_grad():
            outs.append(unet(s1, 10, ehs1).sample)
    assert torch.equal(outs[0], outs[1])  # batch 1: top-left destinations whatever the seed
    outs = []
    for seed in (1, 2):
        with patch(unet, AgentSD(AgentSDConfig(seed=seed))), torch.no_grad():
            outs.append(unet(s1.expand(2, -1, -1, -1), 10, ehs1.expand(2, -1, -1)).sample)
    assert not torch.equal(outs[0], outs[1])


def test_seed_none_does_not_advance_the_global_rng(unet, inputs):
    state = torch.get_rng_state()
    with patch(unet, ToMe()):
        run(unet, inputs)
    assert torch.equal(torch.get_rng_state(), state)


def test_stale_latent_size_is_a_clear_error(unet):
    agent_sd = AgentSD()
    with patch(unet, agent_sd) as handle:
        block = unet.down_blocks[0].attentions[0]
        x = torch.randn(2, 32, 16, 16)
        with pytest.raises(RuntimeError, match="context.observe"):
            block(x, encoder_hidden_states=torch.randn(2, 5, 24))
        handle.context.observe(999, (8, 8))
        with pytest.raises(ValueError, match="should see 8x8 = 64 tokens, but got 256"):
            block(x, encoder_hidden_states=torch.randn(2, 5, 24))
        handle.context.observe(999, (16, 16))
        with torch.no_grad():
            assert block(x, encoder_hidden_states=torch.randn(2, 5, 24)).sample.shape == x.shape


def test_sd15_architecture_unet():
    """The SD1.5 UNet layout (random weights, ~860M params), one 32x32-latent forward with AgentSD."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()
    procs = unet.attn_processors
    agent_sd = AgentSD(AgentSDConfig(seed=0))
    with patch(unet, agent_sd) as handle, torch.no_grad():
        out = unet(torch.randn(1, 4, 32, 32), 981, torch.randn(1, 77, 768)).sample
    assert sorted(handle.layers) == sorted(
        [f"down_blocks.0.attentions.{i}.transformer_blocks.0.attn1.processor" for i in range(2)]
        + [f"up_blocks.3.attentions.{i}.transformer_blocks.0.attn1.processor" for i in range(3)]
    )
    assert out.shape == (1, 4, 32, 32) and torch.isfinite(out).all()
    N = 32 * 32
    for rec in agent_sd.runtime.records.values():
        assert (rec.tokens, rec.merged_tokens, rec.agents) == (N, N - int(0.4 * N), N // 16)
        assert math.prod(rec.grid) == N
    assert all(unet.attn_processors[k] is v for k, v in procs.items())
