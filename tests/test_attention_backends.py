"""Every backend against the eager oracle (float64), over masks, GQA, scales, lengths and gradients."""

import pytest
import torch

from mmkit.ops import (
    AttentionMask,
    BackendUnavailable,
    additive_bias,
    attention,
    block_causal,
    causal,
    get_backend,
    key_padding,
    sliding_window,
)
from mmkit.testing import assert_oracle_rule

B, LQ, LK, H, HKV, D = 2, 7, 9, 4, 2, 24


def make_qkv(B=B, Lq=LQ, Lk=LK, H=H, Hkv=HKV, D=D, Dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = torch.randn(B, Lq, H, D, generator=g)
    k = torch.randn(B, Lk, Hkv, D, generator=g)
    v = torch.randn(B, Lk, Hkv, Dv, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def mask_cases():
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([LK, 4])
    return {
        "none": None,
        "key_padding": key_padding(lengths, LK),
        "causal": causal(),
        "block_causal_past": block_causal((2, 3), "past"),
        "block_causal_future": block_causal((2, 3), "future"),
        "window": sliding_window(3, 1),
        "bias_broadcast": additive_bias(torch.randn(1, H, LQ, LK, generator=g)),
        "bias_full": additive_bias(torch.randn(B, H, LQ, LK, generator=g)),
        "dense_bool": AttentionMask(dense=torch.rand(B, 1, LQ, LK, generator=g) > 0.3),
        "combined": key_padding(lengths, LK) & causal() & additive_bias(torch.randn(H, LQ, LK, generator=g)),
    }


def to64(mask):
    if mask is None or mask.bias is None:
        return mask
    return AttentionMask(
        key_padding=mask.key_padding, causal=mask.causal, window=mask.window, frame_tokens=mask.frame_tokens,
        direction=mask.direction, bias=mask.bias.double(), dense=mask.dense,
    )


def oracle(q, k, v, mask=None, **kw):
    return attention(q.double(), k.double(), v.double(), mask=to64(mask), backend="eager", **kw)


FAST_BACKENDS = ["sdpa", "triton"]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("case", list(mask_cases()))
def test_backend_matches_oracle_fp32(backend, case):
    mask = mask_cases()[case]
    q, k, v = make_qkv()
    out = attention(q, k, v, mask=mask, backend=backend)
    ref = oracle(q, k, v, mask)
    eager = attention(q, k, v, mask=mask, backend="eager")
    assert out.shape == (B, LQ, H, D)
    assert_oracle_rule(out, eager, ref, atol=2e-6, what=f"{backend}/{case}")


@pytest.mark.parametrize("case", ["none", "key_padding", "block_causal_past", "bias_full", "dense_bool", "combined"])
def test_compiled_matches_oracle_fp32(case):
    mask = mask_cases()[case]
    q, k, v = make_qkv()
    with torch.no_grad():
        out = attention(q, k, v, mask=mask, backend="compiled")
    ref = oracle(q, k, v, mask)
    eager = attention(q, k, v, mask=mask, backend="eager")
    assert_oracle_rule(out, eager, ref, atol=2e-6, what=f"compiled/{case}")


@pytest.mark.parametrize("backend", ["sdpa", "triton", "compiled"])
def test_causal_square_custom_scale_and_window(backend):
    q, k, v = make_qkv(Lq=9, Lk=9)
    for kwargs in ({"causal": True, "scale": 0.37}, {"mask": sliding_window(2, 2), "scale": 0.11}):
        with torch.no_grad():
            out = attention(q, k, v, backend=backend, **kwargs)
        eager = attention(q, k, v, backend="eager", **kwargs)
        ref = oracle(q, k, v, **kwargs)
        assert_oracle_rule(out, eager, ref, atol=2e-6, what=f"{backend}/{kwargs}")


@pytest.mark.parametrize("backend", ["eager", "sdpa", "triton"])
def test_value_dim_differs(backend):
    q, k, v = make_qkv(Dv=20)
    out = attention(q, k, v, mask=causal(), backend=backend)
    assert out.shape == (B, LQ, H, 20)
    ref = oracle(q, k, v, causal())
    assert_oracle_rule(out, attention(q, k, v, mask=causal(), backend="eager"), ref, atol=2e-6)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["none", "combined", "block_causal_past"])
def test_low_precision_rule(backend, dtype, case):
    mask = mask_cases()[case]
    if mask is not None and mask.bias is not None:
        mask = AttentionMask(key_padding=mask.key_padding, causal=mask.causal, bias=mask.bias.to(dtype))
    q, k, v = make_qkv(dtype=dtype)
    out = attention(q, k, v, mask=mask, backend=backend)
    assert out.dtype == dtype
    eager = attention(q, k, v, mask=mask, backend="eager")
    ref = oracle(q, k, v, mask)
    assert_oracle_rule(out, eager, ref, factor=2.0, atol=1e-3, what=f"{backend}/{dtype}/{case}")


@pytest.mark.parametrize("backend", ["eager", "sdpa", "triton", "compiled"])
def test_rows_without_visible_keys_are_zero(backend):
    q, k, v = make_qkv(Lq=9, Lk=5)  # causal with Lq > Lk: the first 4 queries see nothing
    with torch.no_grad():
        out = attention(q, k, v, causal=True, backend=backend)
    assert torch.isfinite(out).all()
    assert out[:, :4].abs().max() == 0
    ref = oracle(q, k, v, causal=True)
    assert (out.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("case", ["none", "key_padding", "causal", "bias_full", "block_causal_past"])
def test_sdpa_backward_matches_oracle(case):
    mask = mask_cases()[case]
    q, k, v = make_qkv()
    grads = {}
    for name, dtype in (("sdpa", torch.float32), ("eager", torch.float64)):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        m = mask if dtype == torch.float32 else to64(mask)
        out = attention(qq, kk, vv, mask=m, backend=name)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out).to(dtype)).sum().backward()
        grads[name] = [t.grad for t in (qq, kk, vv)]
    for g32, g64 in zip(grads["sdpa"], grads["eager"]):
        assert (g32.double() - g64).abs().max() < 1e-4


def test_bias_gradient_flows_through_sdpa():
    q, k, v = make_qkv()
    bias = torch.zeros(1, H, LQ, LK, requires_grad=True)
    out = attention(q, k, v, mask=additive_bias(bias), backend="sdpa")
    out.sum().backward()
    bias64 = bias.detach().double().requires_grad_()
    attention(q.double(), k.double(), v.double(), mask=additive_bias(bias64), backend="eager").sum().backward()
    assert (bias.grad.double() - bias64.grad).abs().max() < 1e-5


@pytest.mark.parametrize("backend", ["triton", "compiled"])
def test_forward_only_backends_refuse_gradients(backend):
    q, k, v = make_qkv()
    q.requires_grad_()
    with pytest.raises(BackendUnavailable, match="grad"):
        attention(q, k, v, backend=backend)


def test_probs_hook_runs_on_eager_only():
    q, k, v = make_qkv()
    seen = {}

    def hook(p):
        seen["shape"] = tuple(p.shape)
        return p

    attention(q, k, v, probs_hook=hook)  # automatic choice falls to eager
    assert seen["shape"] == (B, H, LQ, LK)
    with pytest.raises(BackendUnavailable, match="probs_hook"):
        attention(q, k, v, probs_hook=hook, backend="sdpa")


def test_probs_hook_can_reweight():
    q, k, v = make_qkv(H=2, Hkv=2)

    def only_first_key(p):
        w = torch.zeros_like(p)
        w[..., 0] = 1.0
        return w

    out = attention(q, k, v, probs_hook=only_first_key)
    assert torch.allclose(out, v[:, :1].expand(-1, LQ, -1, -1))


def test_dropout_runs_on_sdpa_math_path_and_is_reported():
    from mmkit.ops.attention import make_call

    q, k, v = make_qkv()
    call = make_call(q, k, v, mask=None, causal=False, scale=None, dropout_p=0.5, probs_hook=None)
    assert get_backend("sdpa").kernel(call).startswith("math")
    out = attention(q, k, v, dropout_p=0.5, backend="sdpa")
    assert out.shape == (B, LQ, H, D)
    with pytest.raises(BackendUnavailable, match="dropout"):
        attention(q, k, v, dropout_p=0.5, backend="triton")


def test_input_validation_messages():
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1))
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="share a dtype"):
        attention(q, k.double(), v)
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, k, v, dropout_p=1.5)


# ---------------------------------------------------------------- rows that see no key, whatever the kernel
@pytest.mark.parametrize("case", ["padding", "causal_tall", "window", "dense", "frames_future", "padding_bias"])
def test_sdpa_backend_zeros_rows_that_see_no_key_even_if_the_kernel_returns_garbage(monkeypatch, case):
    """CUDA half-precision kernels return something else than zeros there; simulate such a kernel."""
    import torch.nn.functional as F

    from mmkit.ops import additive_bias, block_causal, key_padding, sliding_window
    from mmkit.ops.backends import sdpa as sdpa_module

    real = F.scaled_dot_product_attention

    def garbage_kernel(q, k, v, attn_mask=None, **kw):
        out = real(q, k, v, attn_mask=attn_mask, **kw)
        if attn_mask is not None:
            visible = attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
            empty = ~visible.any(-1, keepdim=True)  # (B|1, H|1, Lq, 1)
            out = out.masked_fill(empty, 123.0)
        return out

    monkeypatch.setattr(sdpa_module.F, "scaled_dot_product_attention", garbage_kernel)
    g = torch.Generator().manual_seed(0)
    Lq, Lk = (9, 5) if case == "causal_tall" else (7, 6)
    q, k, v = (torch.randn(2, n, 2, 8, generator=g) for n in (Lq, Lk, Lk))
    masks = {
        "padding": key_padding(torch.tensor([6, 0]), Lk),
        "causal_tall": None,
        "window": sliding_window(0, 0) & key_padding(torch.tensor([6, 2]), Lk),
        "dense": torch.rand(2, 1, Lq, Lk, generator=g) > 0.8,
        "frames_future": block_causal((2, 3), direction="future"),
        "padding_bias": key_padding(torch.tensor([6, 0]), Lk) & additive_bias(torch.randn(1, 2, Lq, Lk, generator=g)),
    }
    kw = {"causal": True} if case == "causal_tall" else {"mask": masks[case]}
    out = attention(q, k, v, backend="sdpa", **kw)
    ref = attention(q.double(), k.double(), v.double(), backend="eager", **kw).float()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (ref == 0).all(dim=-1).any(), "the case must have a row that sees no key"


@pytest.mark.parametrize("d, dv", [(40, 40), (80, 40), (24, 160), (8, 8)])
def test_triton_head_dims_that_are_not_powers_of_two(d, dv):
    """SD's 40 / 80 / 160 run as two power-of-two chunks (32 + 16, 64 + 16, 128 + 32) without padding to 64+."""
    from mmkit.ops.backends.triton import head_dim_chunks

    assert head_dim_chunks(40) == (32, 16) and head_dim_chunks(80) == (64, 16) and head_dim_chunks(160) == (128, 32)
    assert head_dim_chunks(64) == (64, 0) and head_dim_chunks(24) == (32, 0) and head_dim_chunks(8) == (16, 0)
    q, k, v = make_qkv(D=d, Dv=dv)
    mask = key_padding(torch.tensor([LK, 4]), LK) & causal()
    out = attention(q, k, v, mask=mask, backend="triton")
    torch.testing.assert_close(out.double(), oracle(q, k, v, mask=mask), atol=2e-5, rtol=2e-5)


def test_triton_autotune_configs_cover_the_hopper_choices():
    from mmkit.ops.backends.triton import CUDA_CONFIGS

    assert {(bm, bn) for bm, bn, _, _ in CUDA_CONFIGS} >= {(128, 64), (128, 128), (64, 64)}
    assert {w for _, _, w, _ in CUDA_CONFIGS} == {4, 8} and {st for *_, st in CUDA_CONFIGS} >= {2, 3, 4}


def test_flex_block_masks_are_built_once_per_mask_tensor_and_shape():
    from mmkit.ops.backends.compiled import _block_mask

    keep = torch.tensor([[True] * LK, [True] * 4 + [False] * (LK - 4)])
    mask = key_padding(keep) & causal()
    first = _block_mask(mask, B, H, LQ, LK, torch.device("cpu"))
    assert _block_mask(mask, B, H, LQ, LK, torch.device("cpu")) is first  # reused, not rebuilt
    assert _block_mask(key_padding(keep) & causal(), B, H, LQ, LK, torch.device("cpu")) is first  # same tensor
    keep[1, 5] = True  # an in-place change is a new mask
    assert _block_mask(mask, B, H, LQ, LK, torch.device("cpu")) is not first
    small = _block_mask(causal(), B, H, LQ, LK, torch.device("cpu"))
    assert _block_mask(causal(), B, H, LQ, LK, torch.device("cpu")) is small  # structure only: by shape
    assert _block_mask(causal(), B, H, LQ + 2, LK + 2, torch.device("cpu")) is not small
