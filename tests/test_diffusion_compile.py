"""Patched UNets under torch.compile: no graph breaks, no per-step recompiles, the eager results.

The hot path of every registered patch (and of the attention core it calls) must trace into one graph:
no host reads of tensors (`.item()`, `float(t)`, `nonzero`), no generator calls, no logging. The step
index reaches the processors from the scheduler, outside the graph.
"""

import pytest
import torch
import torch._dynamo as dynamo
from test_diffusion_patch import sample_pipe, tiny_pipeline  # pytest prepends tests/ to sys.path

from mmkit.diffusion import PATCHES, AgentSD, AgentSDConfig, AgentSDStep, ToMe, ToMeConfig, patch
from mmkit.testing.tiny import tiny_unet


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    dynamo.utils.counters.clear()
    yield
    dynamo.reset()


def unet_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 32, 32, generator=g), torch.tensor(500), torch.randn(2, 5, 24, generator=g)


@pytest.mark.parametrize("name", PATCHES.names())
def test_every_registered_patch_traces_into_one_graph(name):
    unet = tiny_unet(seed=0, sample_size=32).eval()
    x, t, ctx = unet_inputs()

    def run(u):
        with torch.no_grad():
            return u(x, t, encoder_hidden_states=ctx).sample

    assert dynamo.explain(run)(unet).graph_break_count == 0  # the stock UNet, for reference
    with patch(unet, PATCHES.get(name)()):
        dynamo.reset()
        explained = dynamo.explain(run)(unet)
    reasons = "; ".join(str(b.reason).splitlines()[0] for b in explained.break_reasons)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons


def deterministic(name):
    """The registered patch with destinations that do not depend on random draws (eager == compiled)."""
    if name == "tome":
        return ToMe(ToMeConfig(use_rand=False))
    if name == "agent_sd":
        steps = (AgentSDStep(start_step=0, sx=2, sy=2), AgentSDStep(start_step=2, agent_ratio=0.5, sx=2, sy=2))
        return AgentSD(AgentSDConfig(schedule=steps, use_rand=False))
    return PATCHES.get(name)()


@pytest.mark.filterwarnings("ignore:NeTIPatch.*no prompt of this run names the concept")  # idle here
@pytest.mark.parametrize("name", PATCHES.names())
def test_compiled_pipeline_matches_eager_without_per_step_recompiles(name):
    pipe = tiny_pipeline()
    with patch(pipe, deterministic(name)):
        eager = sample_pipe(pipe, steps=4)
    unet = pipe.unet
    pipe.unet = torch.compile(unet, fullgraph=True, backend="aot_eager")
    with patch(pipe, deterministic(name)) as handle:  # (patches the compiled module's layers: the same objects)
        compiled = sample_pipe(pipe, steps=4)
        compiled_again = sample_pipe(pipe, steps=4)
    frames = dynamo.utils.counters["stats"]["unique_graphs"]
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert torch.equal(compiled, compiled_again)
    # one graph per schedule entry in force (AgentSD's two entries) plus the patch's own hook graphs, never one per
    # step
    assert frames <= (2 if name == "agent_sd" else 1) + handle.patches[0].hook_graphs, frames
    assert handle.context.step == 4  # driven by the scheduler outside the graph: past the 4th step()


def test_compiled_tome_draws_fresh_destinations_each_step():
    pipe = tiny_pipeline()
    pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend="aot_eager")
    with patch(pipe, ToMe(ToMeConfig(seed=0))) as handle:
        pools = []
        handle.context.subscribe(lambda step: pools.append(handle.patches[0].runtime.pool.clone()))
        images = sample_pipe(pipe, steps=3)
    assert torch.isfinite(images).all() and len(pools) >= 3
    assert not torch.equal(pools[-1], pools[-2])
