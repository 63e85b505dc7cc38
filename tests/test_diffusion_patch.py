"""mmkit.diffusion.patch: reversible, composable patches; the mmkit processor; the denoising context."""

import pytest
import torch

from mmkit.diffusion import (
    PATCHES,
    AgentSD,
    DenoiseContext,
    MmkitAttnProcessor,
    Patch,
    ProcessorPatch,
    ToMe,
    ToMeConfig,
    downsample_factors,
    patch,
    select_layers,
)
from mmkit.testing.tiny import tiny_clip_text, tiny_tokenizer, tiny_unet

SELF_X1 = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn1.processor",
]


def run(unet, inputs):
    sample, t, ehs = inputs
    with torch.no_grad():
        return unet(sample, t, ehs).sample


def tiny_pipeline(scheduler_cls=None):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4, sample_size=32,
    ).eval()
    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = 13  # tiny_clip_text's positions
    scheduler = (scheduler_cls or DDIMScheduler)(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=tiny_clip_text(), tokenizer=tokenizer, unet=tiny_unet(seed=0), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_pipe(pipe, steps=3):
    return pipe(
        "a red circle left of a blue square", num_inference_steps=steps, guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0), output_type="pt",
    ).images


# ---------------------------------------------------------------------- apply / remove
PATCH_FACTORIES = [factory for _, factory in PATCHES.items()] + [
    lambda: ProcessorPatch(lambda: MmkitAttnProcessor(backend="eager"))]
PATCH_IDS = [name for name, _ in PATCHES.items()] + ["mmkit_eager"]


@pytest.mark.parametrize("make", PATCH_FACTORIES, ids=PATCH_IDS)
def test_apply_then_remove_is_bit_identical(unet, inputs, make):
    before = run(unet, inputs)
    procs = unet.attn_processors
    with patch(unet, make()) as handle:
        assert handle.active and (handle.layers or handle.patches[0].hook_graphs)  # processors, or a hook (CLP)
        during = run(unet, inputs)
        assert all(unet.attn_processors[p] is not procs[p] for p in handle.layers)
    assert not handle.active
    after = run(unet, inputs)
    assert torch.equal(before, after)
    assert all(unet.attn_processors[p] is procs[p] for p in procs)  # the very same objects
    assert torch.isfinite(during).all()


def test_merging_patches_change_the_output(unet, inputs):
    before = run(unet, inputs)
    for p in (ToMe(), AgentSD()):
        with patch(unet, p):
            assert not torch.equal(run(unet, inputs), before)


def test_remove_twice_is_a_noop_and_repr_says_state(unet):
    handle = patch(unet, ToMe())
    assert "active" in repr(handle) and "3 layers" in repr(handle)
    assert handle.remove() is True
    assert handle.remove() is False
    assert "removed" in repr(handle)
    with patch(unet, ToMe()) as h2:
        h2.remove()  # removing inside the block; leaving the block is then a no-op
    assert not unet._forward_pre_hooks


def test_hooks_are_removed(unet):
    with patch(unet, ToMe(), ProcessorPatch(MmkitAttnProcessor, kind="cross")):
        assert len(unet._forward_pre_hooks) == 1  # one context hook per handle
    assert not unet._forward_pre_hooks


class CountBlockCalls(Patch):
    """A hook-only patch: counts forwards of the first transformer block."""

    def __init__(self):
        self.calls = 0

    def hooks(self, target):
        def count(*_):
            self.calls += 1

        return [target.model.down_blocks[0].attentions[0].register_forward_hook(count)]


def test_custom_patch_hooks_are_removed_with_the_handle(unet, inputs):
    counter = CountBlockCalls()
    with patch(unet, counter, ToMe()) as handle:
        run(unet, inputs)
        assert counter.calls == 1 and len(handle.layers) == 3
    run(unet, inputs)
    assert counter.calls == 1 and not unet.down_blocks[0].attentions[0]._forward_hooks


# ---------------------------------------------------------------------- composition and conflicts
@pytest.mark.parametrize("first", PATCHES.names())
@pytest.mark.parametrize("second", PATCHES.names())
def test_every_pair_of_registered_patches_composes_or_names_the_clash(unet, inputs, first, second):
    """Two patches either share the UNet (removal is still exact) or refuse, naming both and the layer."""
    before, procs = run(unet, inputs), unet.attn_processors
    a, b = PATCHES.get(first)(), PATCHES.get(second)()
    try:
        with patch(unet, a, b):
            assert torch.isfinite(run(unet, inputs)).all()
    except ValueError as err:
        assert "both claim the attention processor" in str(err) and a.describe() in str(err)
    assert torch.equal(run(unet, inputs), before)
    assert all(unet.attn_processors[p] is procs[p] for p in procs)
    with patch(unet, a) as alone:
        claimed = {"cross" if "attn2" in path else "self" for path in alone.layers}
    free = [kind for kind in ("cross", "self") if kind not in claimed]
    with patch(unet, a, *[ProcessorPatch(MmkitAttnProcessor, kind=kind) for kind in free[:1]]):
        assert torch.isfinite(run(unet, inputs)).all()  # with something on disjoint layers: always composes
    assert torch.equal(run(unet, inputs), before)


def test_patches_on_disjoint_layers_compose(unet, inputs):
    procs = unet.attn_processors
    with patch(unet, ToMe(ToMeConfig(seed=3))):
        tome_only = run(unet, inputs)
    cross = ProcessorPatch(MmkitAttnProcessor, kind="cross")
    with patch(unet, ToMe(ToMeConfig(seed=3)), cross) as handle:
        kinds = {type(unet.attn_processors[p]).__name__ for p in handle.layers}
        assert kinds == {"ToMeAttnProcessor", "MmkitAttnProcessor"}
        assert len(handle.layers) == 3 + 4
        both = run(unet, inputs)
    # MmkitAttnProcessor (sdpa) on the cross-attention computes what diffusers' processor does
    torch.testing.assert_close(both, tome_only, atol=1e-6, rtol=0)
    assert all(unet.attn_processors[p] is procs[p] for p in procs)


def test_nested_handles_on_disjoint_layers(unet, inputs):
    before = run(unet, inputs)
    outer = patch(unet, ToMe())
    inner = patch(unet, ProcessorPatch(MmkitAttnProcessor, kind="cross"))
    outer.remove()  # removal order need not be LIFO when the layers are disjoint
    inner.remove()
    assert torch.equal(run(unet, inputs), before)


def test_overlap_names_both_patches_and_the_layer(unet):
    procs = unet.attn_processors
    with pytest.raises(ValueError) as err:
        patch(unet, ToMe(), AgentSD())
    msg = str(err.value)
    assert "ToMe(" in msg and "AgentSD(" in msg and SELF_X1[0] in msg
    assert unet.attn_processors == procs and not unet._forward_pre_hooks  # all or nothing
    with patch(unet, ToMe()):
        with pytest.raises(ValueError, match=r"ToMe\(.*AgentSD\(.*attn1\.processor"):
            patch(unet, AgentSD())
    assert unet.attn_processors == procs


def test_same_patch_object_twice(unet):
    p = ToMe()
    with pytest.raises(ValueError, match="passed to patch\\(\\) twice"):
        patch(unet, p, p)
    with patch(unet, p):
        with pytest.raises(ValueError, match="already applied"):
            patch(unet, p)
    with patch(unet, p):  # fine again once removed
        pass


def test_bad_arguments(unet):
    with pytest.raises(TypeError, match="Patch objects"):
        patch(unet, "AgentSD")
    with pytest.raises(TypeError, match="pipeline"):
        patch(42, ToMe())
    with pytest.raises(ValueError, match="holds no diffusers attention layer"):
        patch(torch.nn.Linear(3, 3), ToMe())
    with pytest.raises(ValueError, match="selects no attention layer"):
        patch(unet, ProcessorPatch(MmkitAttnProcessor, pattern="no_such_block"))
    with pytest.raises(ValueError, match="unknown attention backend"):
        MmkitAttnProcessor(backend="nope")


# ---------------------------------------------------------------------- selection
def test_downsample_factors_and_selection(unet):
    assert downsample_factors(unet) == {
        "down_blocks.0": 1, "down_blocks.1": 2, "mid_block": 2, "up_blocks.0": 2, "up_blocks.1": 1,
    }
    assert select_layers(unet, kind="self", max_downsample=1) == SELF_X1
    assert len(select_layers(unet, kind="self", max_downsample=2)) == 4  # + mid_block
    assert len(select_layers(unet, kind="cross")) == 4
    assert select_layers(unet, pattern=r"^up_blocks\.1\.attentions\.1") == [
        "up_blocks.1.attentions.1.transformer_blocks.0.attn1.processor",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor",
    ]
    with pytest.raises(ValueError, match="kind must be one of"):
        select_layers(unet, kind="selfish")
    block = unet.down_blocks[0].attentions[0]
    with pytest.raises(ValueError, match="down_blocks/up_blocks"):
        select_layers(block, max_downsample=1)
    with pytest.raises(ValueError, match="down_blocks/up_blocks"):
        patch(block, ToMe())


# ---------------------------------------------------------------------- the mmkit processor
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_mmkit_processor_matches_diffusers_in_the_unet(unet, inputs, backend):
    sample, t, ehs = inputs
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])  # key padding on the text tokens
    with torch.no_grad():
        ref = unet(sample, t, ehs, encoder_attention_mask=mask).sample
        with patch(unet, ProcessorPatch(lambda: MmkitAttnProcessor(backend=backend))) as handle:
            assert len(handle.layers) == 8
            out = unet(sample, t, ehs, encoder_attention_mask=mask).sample
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def _attention_cases():
    from diffusers.models.attention_processor import Attention

    g = torch.Generator().manual_seed(2)
    x4 = torch.randn(2, 32, 5, 7, generator=g)
    x3 = torch.randn(2, 11, 24, generator=g)
    ctx = torch.randn(2, 9, 20, generator=g)
    mask = torch.zeros(2, 1, 9)
    mask[0, :, 6:] = -10000.0
    zq = torch.randn(2, 4, 3, 3, generator=g)
    return [
        # VAE-style: 4-D input, group norm, residual, rescale
        (Attention(32, heads=4, dim_head=8, norm_num_groups=8, residual_connection=True,
                   rescale_output_factor=1.3, bias=True), (x4,), {}),
        # cross-attention with layer-norm on the context and an additive mask
        (Attention(24, cross_attention_dim=20, heads=3, dim_head=8, cross_attention_norm="layer_norm"),
         (x3,), {"encoder_hidden_states": ctx, "attention_mask": mask}),
        # spatial norm (MoVQ-style) with temb
        (Attention(32, heads=4, dim_head=8, spatial_norm_dim=4), (x4,), {"temb": zq}),
        # q/k layer norms, output bias
        (Attention(24, heads=3, dim_head=8, qk_norm="layer_norm", out_bias=True), (x3,), {}),
    ]


def test_mmkit_processor_matches_diffusers_on_every_feature():
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(0)
    for attn, args, kwargs in _attention_cases():
        attn.eval()
        with torch.no_grad():
            ref = AttnProcessor2_0()(attn, *args, **kwargs)
            for backend in ("sdpa", "eager"):
                out = MmkitAttnProcessor(backend=backend)(attn, *args, **kwargs)
                assert out.shape == ref.shape
                assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), (attn, backend)


def test_mmkit_processor_rejects_unknown_arguments():
    from diffusers.models.attention_processor import Attention

    attn = Attention(24, heads=3, dim_head=8)
    x = torch.randn(1, 4, 24)
    with pytest.raises(TypeError, match="unexpected arguments \\['foo'\\]"):
        MmkitAttnProcessor()(attn, x, foo=1)
    with pytest.warns(FutureWarning, match="scale"):
        MmkitAttnProcessor()(attn, x, scale=0.5)


# ---------------------------------------------------------------------- context
def test_context_counting_rule_on_a_bare_unet(unet, inputs):
    sample, _, ehs = inputs
    with patch(unet, ToMe()) as handle, torch.no_grad():
        ctx = handle.context
        seen = []
        for t in (900, 900, 600, 300, 950, 700):
            unet(sample, t, ehs)
            seen.append(ctx.step)
        assert seen == [0, 0, 1, 2, 0, 1]  # same t keeps the step, a larger t starts a new run
        assert ctx.latent_size == (16, 16) and ctx.timestep == 700.0 and ctx.calls == 6
        ctx.reset()
        unet(sample=sample[:, :, :12, :10], timestep=torch.tensor([100, 100]), encoder_hidden_states=ehs)
        assert ctx.step == 0 and ctx.latent_size == (12, 10) and ctx.timestep == 100.0


@pytest.mark.parametrize(
    "name,expected",
    [("PNDMScheduler", [0, 1, 2, 3, 4, 5]), ("HeunDiscreteScheduler", list(range(9))), ("DDIMScheduler", [0, 1, 2, 3, 4])],
)
def test_context_follows_scheduler_timesteps(name, expected):
    import diffusers

    kwargs = {"skip_prk_steps": True} if name == "PNDMScheduler" else {}
    scheduler = getattr(diffusers, name)(**kwargs)
    scheduler.set_timesteps(5)
    ctx = DenoiseContext(scheduler)
    steps = []
    for t in scheduler.timesteps:
        ctx.observe(t, (8, 8))
        steps.append(ctx.step)
    assert steps == expected
    ctx.observe(12345.0, None)  # not in the schedule: counting rule (larger t -> new run)
    assert ctx.step == 0


@pytest.mark.filterwarnings("ignore:NeTIPatch.*no prompt of this run names the concept")  # idle here
def test_pipeline_three_steps_with_each_patch():
    pipe = tiny_pipeline()
    before = sample_pipe(pipe)
    procs = pipe.unet.attn_processors
    for _, make in PATCHES.items():
        p = make()
        steps = []
        with patch(pipe, p) as handle:
            assert handle.context.scheduler is pipe.scheduler
            hook = pipe.unet.register_forward_hook(lambda *_, s=steps, h=handle: s.append(h.context.step))
            images = sample_pipe(pipe)
            hook.remove()
        assert images.shape == before.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
        assert steps == [0, 1, 2]
        if isinstance(p, ProcessorPatch):
            torch.testing.assert_close(images, before, atol=1e-5, rtol=0)
    assert torch.equal(sample_pipe(pipe), before)
    assert all(pipe.unet.attn_processors[k] is v for k, v in procs.items())
