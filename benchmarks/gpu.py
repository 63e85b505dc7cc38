"""GPU benchmark: attention kernels, structured masks, agent attention and whole UNet steps, in one process.

    python benchmarks/gpu.py --json benchmarks/results/gpu.json          # on a CUDA GPU, under 5 minutes
    python benchmarks/gpu.py --dry-run                                   # any machine: every variant builds and runs

1. **kernels** (B2, N4096, fp16, per head dim 40 / 64 / 128): torch's flash, cuDNN and memory-efficient
   SDPA kernels (each forced with ``sdpa_kernel``), mmkit's ``sdpa`` backend and mmkit's Triton kernel, in
   TFLOP/s (4 B H N^2 D flops). Targets: Triton >= 0.9x torch's best at d64 / d128 and >= 1.0x at d40.
2. **structured mask** (window 256 at N8192, bf16): SDPA with the dense mask vs the ``compiled``
   (flex_attention, block mask built once) and ``triton`` backends, which skip hidden blocks. Target >= 5x.
3. **agent attention** (49 agents pooled from the query grid) vs full SDPA at N4096 and N16384.
   Targets >= 2x and >= 8x.
4. **UNet steps** of an SD1.5-architecture ``UNet2DConditionModel`` (random weights, fp16, batch 2) at
   512 / 1024 / 2048 px: stock diffusers processors, mmkit's processors, ToMe, AgentSD (first schedule
   entry) and the zero-cost bound (the layers AgentSD patches return zeros), eager and, time allowing,
   under ``torch.compile`` (``--compile``). Targets: mmkit's processors within 3% of stock; AgentSD not
   slower than stock at 512 px and at least half the bound's saving at 1024 and 2048 px.

Timings are medians of CUDA-event-timed repeats after warm-up; variants of one comparison are interleaved.
``--budget-s`` bounds the whole run: compiled variants that would not fit are reported as skipped.
``--dry-run`` runs every variant once at tiny sizes on the CPU (Triton in its interpreter, compile with
the ``eager`` backend) and checks each builds and returns finite output; it measures nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Record, finish, machine_header, time_interleaved  # noqa: E402

SD15_UNET = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)


class Bench:
    """Times callables (CUDA events on a GPU, perf_counter elsewhere) and keeps the run inside its budget."""

    def __init__(self, device: torch.device, dry_run: bool, budget_s: float) -> None:
        self.device, self.dry_run, self.budget_s = device, dry_run, budget_s
        self.started = time.perf_counter()

    @property
    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def time(self, fns: dict[str, Callable[[], object]], repeats: int = 10, warmup: int = 2) -> dict[str, float]:
        """Median seconds per call of each function, interleaved; one checked call each in a dry run."""
        if self.dry_run:
            out = {}
            for name, fn in fns.items():
                result = fn()
                if isinstance(result, torch.Tensor) and not torch.isfinite(result.float()).all():
                    raise FloatingPointError(f"{name} returned non-finite values")
                out[name] = float("nan")
            return out
        return time_interleaved(fns, repeats, warmup, device=self.device)


def _ratio(base: float, cand: float) -> float:
    return base / cand if cand and math.isfinite(cand) and math.isfinite(base) else float("nan")


def _ms(t: float) -> str:
    return "n/a (dry run)" if not math.isfinite(t) else f"{t * 1e3:.3f} ms"


# ---------------------------------------------------------------------- 1. kernels
def torch_kernels() -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def kernel_records(bench: Bench) -> list[Record]:
    dtype = torch.float16 if bench.device.type == "cuda" else torch.float32
    N = 4096 if not bench.dry_run else 64
    return [_kernel_case(bench, d, heads, target, N, dtype) for d, heads, target in ((40, 8, 1.0), (64, 16, 0.9),
                                                                                   (128, 8, 0.9))]


def _kernel_case(bench: Bench, d: int, heads: int, target: float, N: int, dtype: torch.dtype) -> Record:
    from torch.nn.attention import sdpa_kernel

    from mmkit.ops import attention

    g = torch.Generator(device=bench.device).manual_seed(0)
    q, k, v = (torch.randn(2, N, heads, d, generator=g, device=bench.device, dtype=dtype) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    fns: dict[str, Callable[[], object]] = {}
    for name, backend in torch_kernels().items():
        def run(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qt, kt, vt)
        try:
            run()
        except RuntimeError:  # this kernel does not run here (CPU, dtype, head dim)
            continue
        fns[f"torch {name}"] = run
    fns["mmkit sdpa"] = lambda: attention(q, k, v, backend="sdpa")
    fns["mmkit triton"] = lambda: attention(q, k, v, backend="triton")
    with torch.no_grad():
        t = bench.time(fns)
    flops = 4 * 2 * heads * N * N * d
    torch_names = [n for n in t if n.startswith("torch")]
    best_name = min(torch_names, key=lambda n: t[n], default="none")
    torch_best = t.get(best_name, float("nan"))
    values = {n: {"ms": v * 1e3, "tflops": flops / v / 1e12} for n, v in t.items() if math.isfinite(v)}
    return Record(
        f"attention d{d} N{N} {str(dtype).removeprefix('torch.')}", f"{best_name} {_ms(torch_best)}",
        f"mmkit triton {_ms(t['mmkit triton'])}", _ratio(torch_best, t["mmkit triton"]),
        target if bench.device.type == "cuda" else None, values=values,
    )


# ---------------------------------------------------------------------- 2. structured mask
def mask_records(bench: Bench) -> list[Record]:
    from mmkit.ops import attention, sliding_window

    cuda = bench.device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    N, window = (8192, 256) if not bench.dry_run else (128, 16)
    g = torch.Generator(device=bench.device).manual_seed(0)
    q, k, v = (torch.randn(1, N, 8, 64, generator=g, device=bench.device, dtype=dtype) for _ in range(3))
    mask = sliding_window(window, window)
    dense = mask.keep_tensor(1, N, N, bench.device)
    with torch.no_grad():
        t = bench.time({
            "sdpa dense mask": lambda: attention(q, k, v, mask=dense, backend="sdpa"),
            "compiled (flex)": lambda: attention(q, k, v, mask=mask, backend="compiled"),
            "triton": lambda: attention(q, k, v, mask=mask, backend="triton"),
        })
    return [Record(f"window {window} N{N}: {name}", f"sdpa dense {_ms(t['sdpa dense mask'])}", f"{name} {_ms(t[name])}",
                   _ratio(t["sdpa dense mask"], t[name]), 5.0 if cuda else None, values={"ms": t[name] * 1e3})
            for name in ("compiled (flex)", "triton")]


# ---------------------------------------------------------------------- 3. agent attention
def agent_records(bench: Bench) -> list[Record]:
    dtype = torch.float16 if bench.device.type == "cuda" else torch.float32
    sides = ((64, 2.0), (128, 8.0)) if not bench.dry_run else ((8, None), (12, None))
    return [_agent_case(bench, side, target, dtype) for side, target in sides]


def _agent_case(bench: Bench, side: int, target: float | None, dtype: torch.dtype) -> Record:
    from mmkit.ops import attention
    from mmkit.ops.agent import agent_attention

    N = side * side
    g = torch.Generator(device=bench.device).manual_seed(0)
    q, k, v = (torch.randn(2, N, 8, 40, generator=g, device=bench.device, dtype=dtype) for _ in range(3))
    with torch.no_grad():
        t = bench.time({
            "full": lambda: attention(q, k, v),
            "agent": lambda: agent_attention(q, k, v, num_agents=49, grid=(side, side), shortcut=0.075),
        })
    return Record(f"agent attention N{N} (49 agents)", f"full sdpa {_ms(t['full'])}", f"agent {_ms(t['agent'])}",
                  _ratio(t["full"], t["agent"]), target if bench.device.type == "cuda" else None)


# ---------------------------------------------------------------------- 4. UNet steps
class ZeroAttention:
    """The bound: a processor returning zeros shaped like the layer's output (B, N, C_out)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        return hidden_states.new_zeros(*hidden_states.shape[:-1], attn.to_out[0].out_features)


def unet_variants() -> dict[str, Callable[[], object] | None]:
    from mmkit.diffusion import (
        AgentSD,
        AgentSDConfig,
        MmkitAttnProcessor,
        ProcessorPatch,
        ToMe,
        ToMeConfig,
        published_schedule,
    )

    first = AgentSDConfig(schedule=published_schedule()[:1], seed=0)
    return {
        "stock": None,
        "mmkit processors": lambda: ProcessorPatch(MmkitAttnProcessor),
        "tome": lambda: ToMe(ToMeConfig(seed=0)),
        "agent_sd": lambda: AgentSD(first),
        "bound": lambda: ProcessorPatch(ZeroAttention, kind="self", max_downsample=1, name="zero-cost bound"),
    }


def build_unet(bench: Bench):
    from diffusers import UNet2DConditionModel

    from mmkit.testing.tiny import tiny_unet

    if bench.dry_run:
        return tiny_unet(seed=0, sample_size=16, cross_attention_dim=24).eval(), 24
    torch.manual_seed(0)
    return UNet2DConditionModel(**SD15_UNET).eval().to(bench.device, torch.float16), 768


def unet_records(bench: Bench, compile_backend: str) -> list[Record]:
    from mmkit.diffusion import patch

    unet, ctx_dim = build_unet(bench)
    dtype = next(unet.parameters()).dtype
    variants = unet_variants()
    records = []
    sides = (64, 128, 256) if not bench.dry_run else (16, 32)
    for side in sides:
        g = torch.Generator(device=bench.device).manual_seed(0)
        x = torch.randn(2, 4, side, side, generator=g, device=bench.device, dtype=dtype)
        ctx = torch.randn(2, 77 if not bench.dry_run else 5, ctx_dim, generator=g, device=bench.device, dtype=dtype)
        t_step = torch.tensor(500, device=bench.device)
        times: dict[str, float] = {}
        for compiled in (False, True):
            if compiled and (compile_backend == "none" or (not bench.dry_run and (side > 128 or bench.left_s < 120))):
                continue
            for name, make in variants.items():
                if compiled and name == "bound":
                    continue
                handle = patch(unet, make()) if make is not None else None
                try:
                    model = unet
                    if compiled:
                        torch._dynamo.reset()
                        model = torch.compile(unet, fullgraph=True, backend="eager" if bench.dry_run else compile_backend)
                    if handle is not None:
                        handle.context.set_step(0)  # a bare UNet: the step comes from us, as from a scheduler

                    def step(model=model, x=x, t_step=t_step, ctx=ctx):
                        with torch.no_grad():
                            return model(x, t_step, encoder_hidden_states=ctx).sample

                    key = name + (" compiled" if compiled else "")
                    times[key] = bench.time({key: step}, repeats=10 if side <= 128 else 5)[key]
                finally:
                    if handle is not None:
                        handle.remove()
        px = side * 8
        stock = times["stock"]
        for key, t in times.items():
            if key in ("stock", "stock compiled"):
                continue
            base = times["stock compiled"] if key.endswith(" compiled") else stock
            target = None
            if bench.device.type == "cuda" and not key.endswith("compiled"):
                target = {"mmkit processors": 0.97, "agent_sd": 1.0 if side == 64 else None}.get(key)
            records.append(Record(f"UNet step {px}px: {key}", f"stock {_ms(base)}", f"{key} {_ms(t)}",
                                  _ratio(base, t), target, values={"ms": t * 1e3, "stock_ms": base * 1e3}))
        if "agent_sd" in times and "bound" in times and math.isfinite(stock):
            saving = (stock - times["agent_sd"]) / max(stock - times["bound"], 1e-12)
            records.append(Record(f"UNet step {px}px: AgentSD share of the bound's saving", "bound's saving",
                                  "AgentSD's saving", saving, 0.5 if bench.device.type == "cuda" and side >= 128 else None,
                                  values={"bound_ms": times["bound"] * 1e3}))
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on any device: every variant builds and runs")
    parser.add_argument("--budget-s", type=float, default=270.0, help="wall-clock budget of the whole run")
    parser.add_argument("--compile", default="inductor", choices=("inductor", "cudagraphs", "none"),
                        help="backend for the compiled UNet variants (512 and 1024 px)")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton builds the kernel
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if device.type == "cpu" and not args.dry_run:
        print("no CUDA GPU here: run with --dry-run to check that every variant builds", file=sys.stderr)
        return 2
    bench = Bench(device, args.dry_run, args.budget_s)
    records = []
    for section in (kernel_records, mask_records, agent_records):
        records += section(bench)
    records += unet_records(bench, args.compile)
    for r in records:
        print(r.line())
    header = machine_header(quick=args.dry_run)
    header.update(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
                  seconds=round(time.perf_counter() - bench.started, 1))
    return finish(records, args.json, header)


if __name__ == "__main__":
    sys.exit(main())
