"""Backend selection: argument > context manager > environment > automatic; no silent fallback."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from mmkit.ops import (
    ENV_VAR,
    AttentionBackend,
    BackendUnavailable,
    additive_bias,
    attention,
    attention_backend,
    backends,
    block_causal,
    explain,
    key_padding,
    register_backend,
)
from mmkit.ops.dispatch import BACKENDS


def qkv(B=2, Lq=7, Lk=9, H=4, Hkv=2, D=24):
    return torch.randn(B, Lq, H, D), torch.randn(B, Lk, Hkv, D), torch.randn(B, Lk, Hkv, D)


class Recording(AttentionBackend):
    """A backend that records that it ran and delegates to eager."""

    name = "recording"
    summary = "test backend"

    def __init__(self):
        self.calls = 0

    def run(self, call):
        self.calls += 1
        return backends()["eager"].run(call)


@pytest.fixture
def recording():
    be = Recording()
    register_backend(be, replace=True)
    yield be
    BACKENDS.unregister("recording")


def test_precedence_argument_context_env(recording, monkeypatch):
    q, k, v = qkv()
    monkeypatch.setenv(ENV_VAR, "recording")
    attention(q, k, v)
    assert recording.calls == 1  # environment
    with attention_backend("eager"):
        attention(q, k, v)
    assert recording.calls == 1  # context beats environment
    with attention_backend("eager"):
        attention(q, k, v, backend="recording")
    assert recording.calls == 2  # argument beats context
    monkeypatch.setenv(ENV_VAR, "auto")
    attention(q, k, v)
    assert recording.calls == 2


def test_explicit_backend_that_cannot_run_raises_with_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv()
    with pytest.raises(BackendUnavailable) as err:
        attention(q, k, v, backend="triton")
    msg = str(err.value)
    assert "q=(2, 7, 4, 24)" in msg and "triton" in msg and "CUDA" in msg
    assert "sdpa: ok: flash" in msg  # says what the others would have done


def test_unknown_backend_names_the_registered_ones():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="accepted: .*eager.*sdpa"):
        attention(q, k, v, backend="flash3")
    with pytest.raises(ValueError, match="unknown attention backend"):
        with attention_backend("nope"):
            pass


def test_explain_reports_choice_and_kernel():
    q, k, v = qkv()
    text = explain(q, k, v, mask=key_padding(torch.tensor([9, 3]), 9))
    assert "-> sdpa (flash)" in text
    assert "eager: ok" in text


@pytest.mark.parametrize(
    "mask",
    [None, "causal", key_padding(torch.tensor([9, 3]), 9), additive_bias(torch.randn(4, 7, 9)), block_causal((2, 3))],
    ids=["none", "causal", "key_padding", "bias", "block_causal"],
)
def test_sdpa_runs_the_fused_kernel(mask):
    """No timing: the profiler shows the flash kernel ran and no bmm/softmax did."""
    q, k, v = qkv()
    kwargs = {"causal": True} if mask == "causal" else {"mask": mask}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        attention(q, k, v, backend="sdpa", **kwargs)
    names = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert not names & {"aten::bmm", "aten::_softmax", "aten::softmax"}


def test_automatic_choice_is_sdpa_and_eager_when_needed(recording):
    from mmkit.ops.attention import make_call
    from mmkit.ops.dispatch import select

    q, k, v = qkv()
    call = make_call(q, k, v, mask=None, causal=False, scale=None, dropout_p=0.0, probs_hook=None)
    assert select(call, None).name == "sdpa"
    call = make_call(q, k, v, mask=None, causal=False, scale=None, dropout_p=0.0, probs_hook=lambda p: p)
    assert select(call, None).name == "eager"
