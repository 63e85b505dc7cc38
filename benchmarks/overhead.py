"""CPU proxies of GPU speed: Python overhead per attention call, ops per patched layer, graph breaks.

    python benchmarks/overhead.py [--quick] [--json benchmarks/results/overhead.json]

On a GPU an SD1.5 UNet step at 512 px is bound by Python and kernel launches, not by the GPU, so what
shows there can be counted here:

1. **overhead**: ``mmkit.ops.attention`` against a bare ``F.scaled_dot_product_attention`` on tiny tensors
   (B1 L16 H2 D16), medians of interleaved batches of calls, timed on the calling thread's CPU clock
   (``time.thread_time``: time descheduled by other jobs on a shared machine does not count, wall time
   does and drifts by more than the budget). The baseline includes the (B, L, H, D) ->
   (B, H, L, D) views any caller of SDPA in mmkit's layout pays; target: at most 10 us more per call.
   Masked calls are compared with SDPA given the equivalent dense mask (reported, no target).
2. **ops per patched layer**: aten ops dispatched during one forward of a tiny SD-style UNet (32x32
   latent, batch 2) with each registered patch, minus the stock UNet's, divided by the layers it patches
   (a TorchDispatchMode counts them; each is a kernel launch on a GPU). Targets: ToMe <= 25, AgentSD <= 40.
3. **graph breaks**: ``torch._dynamo.explain`` on the same UNet, stock and with each registered patch
   (target: 0, i.e. ``torch.compile(unet, fullgraph=True)`` works); plus the host reads (``.item()``,
   ``nonzero``) of one eager forward.

Ratios are "higher is better": for the overhead ``budget / extra`` (>= 1 meets the 10 us budget); for op
counts ``target / ops``; for graph breaks ``1 / (1 + breaks)``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Record, finish, machine_header, parse_args  # noqa: E402

OVERHEAD_BUDGET_US = 10.0
OP_TARGETS = {"tome": 25, "agent_sd": 40}
SYNC_OPS = ("aten._local_scalar_dense.default", "aten.nonzero.default", "aten.item.default")


def per_call_us(fns: dict, repeats: int, inner: int) -> dict[str, float]:
    """Median thread-CPU microseconds per call, interleaved batches of ``inner`` calls."""
    for fn in fns.values():
        for _ in range(inner):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.thread_time()
            for _ in range(inner):
                fn()
            samples[name].append((time.thread_time() - t0) / inner * 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


def overhead_records(repeats: int, inner: int) -> list[Record]:
    from mmkit.ops import attention, key_padding

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, 2, 16, generator=g) for _ in range(3))
    kp = key_padding(torch.tensor([10]), 16)
    dense = kp.keep_tensor(1, 16, 16, "cpu")

    def bare(mask=None, causal=False):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask, is_causal=causal).transpose(1, 2)

    t = per_call_us({
        "sdpa": bare, "mmkit": lambda: attention(q, k, v),
        "sdpa causal": lambda: bare(causal=True), "mmkit causal": lambda: attention(q, k, v, causal=True),
        "sdpa padding": lambda: bare(mask=dense), "mmkit padding": lambda: attention(q, k, v, mask=kp),
    }, repeats, inner)
    records = []
    for case in ("", " causal", " padding"):
        extra = t[f"mmkit{case}"] - t[f"sdpa{case}"]
        target = 1.0 if case != " padding" else None
        records.append(Record(
            f"attention() overhead{case or ' (no mask)'}", f"bare SDPA {t[f'sdpa{case}']:.1f} us",
            f"mmkit {t[f'mmkit{case}']:.1f} us (+{extra:.1f} us)", OVERHEAD_BUDGET_US / max(extra, 0.1), target,
            values={"sdpa_us": t[f"sdpa{case}"], "mmkit_us": t[f"mmkit{case}"], "extra_us": extra},
        ))
    return records


class _Count:
    """Counts aten ops by name while active (a TorchDispatchMode)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counts: dict[str, int] = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counts[str(func)] = counts.get(str(func), 0) + 1
                return func(*args, **(kwargs or {}))

        self.counts, self.mode = counts, Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def tiny_setup():
    from mmkit.testing.tiny import tiny_unet

    unet = tiny_unet(seed=0, sample_size=32).eval()
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 5, 24, generator=g)
    t = torch.tensor(500)

    def forward():
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=ctx).sample

    return unet, forward


def op_records() -> list[Record]:
    from mmkit.diffusion import PATCHES, patch

    unet, forward = tiny_setup()
    forward()
    with _Count() as stock:
        forward()
    records = []
    for name, make in PATCHES.items():
        with patch(unet, make()) as handle:
            forward()  # shape-only tables are built once, then cached
            with _Count() as patched:
                forward()
        extra = (patched.total - stock.total) / len(handle.layers)
        syncs = sum(patched.counts.get(op, 0) for op in SYNC_OPS)
        target = OP_TARGETS.get(name)
        ratio = (target / max(extra, 1e-9)) if target else 1.0 / (1.0 + max(extra, 0.0))
        records.append(Record(
            f"extra aten ops per patched layer: {name}", f"stock {stock.total} ops per forward",
            f"{extra:.1f} extra ops x {len(handle.layers)} layers; {syncs} host reads per forward",
            ratio, 1.0 if target else None,
            values={"extra_ops_per_layer": extra, "layers": len(handle.layers), "host_reads_per_forward": syncs,
                    "stock_ops": stock.total, "patched_ops": patched.total},
        ))
    return records


def graph_break_records() -> list[Record]:
    import torch._dynamo as dynamo

    from mmkit.diffusion import PATCHES, patch

    unet, forward = tiny_setup()
    variants = {"stock": None, **dict(PATCHES.items())}
    records = []
    for name, make in variants.items():
        dynamo.reset()
        if make is None:
            explained = dynamo.explain(forward)()
        else:
            with patch(unet, make()):
                explained = dynamo.explain(forward)()
        reasons = sorted({str(b.reason).splitlines()[0][:120] for b in explained.break_reasons})
        records.append(Record(
            f"graph breaks under torch.compile: {name}", "0 breaks (fullgraph)",
            f"{explained.graph_break_count} breaks, {explained.graph_count} graphs",
            1.0 / (1 + explained.graph_break_count), 1.0,
            values={"graph_breaks": explained.graph_break_count, "graphs": explained.graph_count, "reasons": reasons},
        ))
    dynamo.reset()
    return records


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    torch.manual_seed(0)
    repeats, inner = (15, 200) if args.quick else (40, 500)
    records = overhead_records(repeats, inner) + op_records() + graph_break_records()
    for r in records:
        print(r.line())
    return finish(records, args.json, machine_header(args.quick))


if __name__ == "__main__":
    sys.exit(main())
