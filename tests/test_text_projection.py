"""CLP / WiCLP: identity at initialisation (bit-identical images), the timestep switch-off, the unconditional
branch never projected, removal, saving as adapters, composition with AgentSD, and no graph breaks."""

import pytest
import torch
from test_diffusion_patch import sample_pipe, tiny_pipeline  # pytest prepends tests/ to sys.path

from mmkit.adapters import build_adapter, load_adapter
from mmkit.diffusion import patch
from mmkit.diffusion.agent_sd import AgentSD
from mmkit.diffusion.text_projection import TextProjectionPatch


def spy(unet):
    """Record the encoder_hidden_states and timestep every UNet forward receives (after earlier pre-hooks)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append((kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None).clone(),
                     float(kwargs.get("timestep", args[1] if len(args) > 1 else -1))))

    return seen, unet.register_forward_pre_hook(hook, with_kwargs=True)


def scaled(kind, dim, factor=2.0):
    """A projector that visibly changes the states (x -> factor * x for CLP; a residual added for WiCLP)."""
    proj = build_adapter(kind, dim=dim)
    with torch.no_grad():
        if kind == "clp":
            proj.proj.weight.mul_(factor)
        else:
            proj.conv.bias.fill_(1.0)
    return proj


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.mark.parametrize("kind", ["clp", "wiclp"])
def test_a_fresh_projection_gives_bit_identical_images_and_removal_restores(pipe, kind):
    dim = pipe.text_encoder.config.hidden_size
    before = sample_pipe(pipe)
    with patch(pipe, TextProjectionPatch(build_adapter(kind, dim=dim))):
        fresh = sample_pipe(pipe)
    assert torch.equal(before, fresh)
    with patch(pipe, TextProjectionPatch(scaled(kind, dim))):
        changed = sample_pipe(pipe)
    assert not torch.equal(before, changed)
    assert torch.equal(sample_pipe(pipe), before)  # removed: bit-identical again


@pytest.mark.parametrize("kind", ["clp", "wiclp"])
def test_only_conditional_rows_are_projected_and_only_above_the_switch_off(pipe, kind):
    dim = pipe.text_encoder.config.hidden_size
    proj = scaled(kind, dim)
    seen_plain, h = spy(pipe.unet)
    sample_pipe(pipe, steps=4)
    h.remove()
    with patch(pipe, TextProjectionPatch(proj, switch_off=500)):
        seen, h = spy(pipe.unet)
        sample_pipe(pipe, steps=4)
        h.remove()
    assert len(seen) == len(seen_plain) == 4
    for (plain, t), (got, t2) in zip(seen_plain, seen, strict=True):
        assert t == t2 and got.shape[0] == 2  # [unconditional, conditional] under guidance 5
        assert torch.equal(got[0], plain[0])  # the unconditional branch: never projected
        with torch.no_grad():
            expected = proj(plain[1:])[0]
        if t > 500:
            torch.testing.assert_close(got[1], expected)
            assert not torch.equal(got[1], plain[1])
        else:
            assert torch.equal(got[1], plain[1])  # switched off: the plain text states
    assert {t > 500 for _, t in seen} == {True, False}  # both regimes were exercised


def test_without_guidance_every_row_is_conditional(pipe):
    dim = pipe.text_encoder.config.hidden_size
    proj = scaled("clp", dim)
    with patch(pipe, TextProjectionPatch(proj)):
        seen, h = spy(pipe.unet)
        pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
             output_type="pt")
        h.remove()
    assert all(states.shape[0] == 1 for states, _ in seen)
    plain = pipe.encode_prompt("a red circle", "cpu", 1, False)[0]
    with torch.no_grad():
        torch.testing.assert_close(seen[0][0], proj(plain))


def test_composes_with_agent_sd_and_saves_as_an_adapter(pipe, tmp_path):
    dim = pipe.text_encoder.config.hidden_size
    proj = scaled("wiclp", dim)
    with patch(pipe, TextProjectionPatch(proj, switch_off=300), AgentSD()):
        both = sample_pipe(pipe)
    assert torch.isfinite(both).all()
    proj.save_adapter(tmp_path / "wiclp")
    again, _ = load_adapter(tmp_path / "wiclp")
    x = torch.randn(2, 7, dim)
    with torch.no_grad():
        assert torch.equal(again(x), proj(x))
    assert again.config.window == 5


def test_the_patched_unet_compiles_without_graph_breaks(pipe):
    dim = pipe.text_encoder.config.hidden_size
    unet = pipe.unet
    sample, t, ehs = torch.randn(2, 4, 16, 16), torch.tensor(700), torch.randn(2, 13, dim)
    def run(u):
        with torch.no_grad():
            return u(sample, t, encoder_hidden_states=ehs).sample

    with patch(unet, TextProjectionPatch(scaled("wiclp", dim), switch_off=500, conditional="second_half")):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(run)(unet)
    torch._dynamo.reset()
    reasons = "; ".join(str(b.reason).splitlines()[0] for b in explained.break_reasons)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="odd number"):
        build_adapter("wiclp", dim=8, window=4)
    with pytest.raises(ValueError, match="conditional must be one of"):
        TextProjectionPatch(build_adapter("clp", dim=8), conditional="first")
    with pytest.raises(ValueError, match="switch_off is a timestep"):
        TextProjectionPatch(build_adapter("clp", dim=8), switch_off=-1)
