"""AgentSD benchmark: an SD1.5-architecture UNet (random weights), stock vs ToMe vs AgentSD vs the bound.

    python benchmarks/agent_sd.py [--quick] [--json results/agent_sd.json]

Batch 2 (classifier-free guidance), encoder states (2, 77, 768), fp32 on CPU, 512 px (64x64 latent) and
1024 px (128x128 latent), all variants interleaved in one process:

- stock: diffusers' SDPA processors;
- ToMe: ``ToMe()`` (ratio 0.5, sx = sy = 2, highest-resolution attn1);
- AgentSD: the first schedule entry (steps 0-19: ratio 0.4, agent_ratio 0.95, sx = sy = 4);
- bound: the layers AgentSD patches get a processor returning zeros, the limit of any attention
  speed-up there. ``(t_stock - t_agent) / (t_stock - t_bound)`` is the fraction of that limit reached;
- AgentSD with max_downsample=2 against its own bound (zeros on the layers it patches).

The full run times whole UNet steps. ``--quick`` times only the transformer blocks of the patched
resolutions: one ``BasicTransformerBlock`` per resolution level (all blocks of a level have the same
shapes), fed with the hidden states the UNet's own down path produces for a random latent, and
weighted by the number of such blocks in the UNet. The block and the full-step fractions measure the
same differences; only their noise differs.

Every sample is taken on two clocks: wall time (the house convention) and process CPU time, which does
not count time the process spends descheduled and so drifts far less when other jobs share the cores.
Fractions are reported on both; a fraction is UNRESOLVED (NaN, never "met") unless every stock sample
is slower than every bound sample. Peak extra memory comes from ``common.peak_extra_bytes``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Record, finish, machine_header, parse_args, peak_extra_bytes  # noqa: E402

from mmkit.diffusion import (  # noqa: E402
    AgentSD,
    AgentSDConfig,
    ProcessorPatch,
    ToMe,
    ToMeConfig,
    patch,
    published_schedule,
)

MiB = 2**20
TARGETS = {64: 0.60, 128: 0.80}  # fraction of the bound, AgentSD (max_downsample=1), by latent side

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)


class ZeroAttention:
    """The bound: a processor that returns zeros shaped like the layer's output (B, N, C_out)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        return hidden_states.new_zeros(*hidden_states.shape[:-1], attn.to_out[0].out_features)


def variants() -> dict[str, Callable[[], Any] | None]:
    """name -> a factory of the patch to apply (None = stock). Fresh patch objects per application."""
    first = AgentSDConfig(schedule=published_schedule()[:1], seed=0)
    return {
        "stock": None,
        "tome": lambda: ToMe(ToMeConfig(seed=0)),
        "agent": lambda: AgentSD(first),
        "bound": lambda: ProcessorPatch(ZeroAttention, kind="self", max_downsample=1, name="zero-cost bound x1"),
        "agent_md2": lambda: AgentSD(first.replace(max_downsample=2)),
        "bound_md2": lambda: ProcessorPatch(ZeroAttention, kind="self", max_downsample=2, name="zero-cost bound x2"),
    }


def check_bounds_match(unet: torch.nn.Module, factories: dict) -> None:
    """The bound must cover exactly the layers AgentSD patches."""
    for agent, bound in (("agent", "bound"), ("agent_md2", "bound_md2")):
        with patch(unet, factories[agent]()) as ha:
            layers_a = set(ha.layers)
        with patch(unet, factories[bound]()) as hb:
            layers_b = set(hb.layers)
        if layers_a != layers_b:
            raise RuntimeError(f"{bound} covers {sorted(layers_b ^ layers_a)} differently from {agent}")


@dataclass
class Samples:
    """Per-variant samples of one measurement: wall-clock and process-CPU seconds, peak extra bytes."""

    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)

    def clock(self, name: str) -> dict[str, list[float]]:
        return self.wall if name == "wall" else self.cpu


def timed(run: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call. CPU time does not count the time the process
    spends descheduled, so it drifts far less than wall time when other jobs share the cores."""
    w0, c0 = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - w0, time.process_time() - c0


def time_variants(
    unet: torch.nn.Module, names: list[str], factories: dict, run: Callable[[], object], repeats: int,
    latent: int, *, memory_round: bool,
) -> Samples:
    """``repeats`` timed samples of ``run()`` under each variant's patch, round-robin; patching is not timed.

    memory_round: an extra first round measures peak extra memory under the profiler (and warms up);
    otherwise the first timed round runs under the profiler too and gives the memory figures (the
    profiler's per-op cost is milliseconds next to blocks and steps of seconds; its start/stop is not timed).
    """
    out = Samples(wall={n: [] for n in names}, cpu={n: [] for n in names})
    for round_ in range(repeats + int(memory_round)):
        for name in names:
            factory = factories[name]
            handle = patch(unet, factory()) if factory is not None else None
            if handle is not None:
                handle.context.observe(999, (latent, latent))  # for blocks run without the UNet's pre-hook
            try:
                if round_ == 0 and memory_round:
                    out.memory[name] = peak_extra_bytes(run)
                    continue
                if round_ == 0:
                    got: list[tuple[float, float]] = []
                    out.memory[name] = peak_extra_bytes(lambda got=got: got.append(timed(run)))
                    wall, cpu = got[0]
                else:
                    wall, cpu = timed(run)
                out.wall[name].append(wall)
                out.cpu[name].append(cpu)
            finally:
                if handle is not None:
                    handle.remove()
        if round_ == 0 and memory_round:
            done = ", ".join(f"{n} {out.memory[n] / MiB:.0f} MiB" for n in names)
            print(f"  round 0 (peak extra memory): {done}", flush=True)
        else:
            done = ", ".join(f"{n} {out.wall[n][-1]:.2f}s (cpu {out.cpu[n][-1]:.2f}s)" for n in names)
            print(f"  round {round_} (time): {done}", flush=True)
    return out


def capture_block_inputs(unet: torch.nn.Module, side: int, ehs: torch.Tensor) -> dict[int, tuple[tuple, dict]]:
    """Inputs of ``down_blocks[i].attentions[0].transformer_blocks[0]`` for levels 0 and 1 on a random latent.

    The down path runs with AgentSD on (to keep the capture fast) and stops once level 1 is captured.
    """
    found: dict[int, tuple[tuple, dict]] = {}

    class Stop(Exception):
        pass

    def grab(level: int):
        def hook(module, args, kwargs):
            found[level] = (tuple(a.clone() if torch.is_tensor(a) else a for a in args), dict(kwargs))
            if level == 1:
                raise Stop
        return hook

    hooks = [
        unet.down_blocks[lvl].attentions[0].transformer_blocks[0].register_forward_pre_hook(grab(lvl), with_kwargs=True)
        for lvl in (0, 1)
    ]
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, side, side, generator=g)
    try:
        with patch(unet, AgentSD(AgentSDConfig(max_downsample=2, seed=0))):
            unet(sample, 999, ehs)
    except Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    return found


def level_counts(unet: torch.nn.Module) -> dict[int, int]:
    """Transformer blocks per resolution level (the down and up blocks at that downsample factor)."""
    from mmkit.diffusion import downsample_factors

    factors = downsample_factors(unet)
    counts: dict[int, int] = {}
    for name, module in unet.named_modules():
        if type(module).__name__ == "BasicTransformerBlock":
            block = ".".join(name.split(".")[:2]) if name.startswith(("down_blocks", "up_blocks")) else name.split(".")[0]
            f = factors[block]
            counts[f] = counts.get(f, 0) + 1
    return counts


def fraction_record(tag: str, label: str, samples: dict[str, list[float]], v: str, b: str,
                    target: float | None, clock: str) -> Record:
    """(t_stock - t_v) / (t_stock - t_bound) on medians; NaN ("unresolved") unless every stock sample is
    slower than every bound sample, i.e. the effect stands out of the noise."""
    stock, var, bound = samples["stock"], samples[v], samples[b]
    ms, mv, mb = statistics.median(stock), statistics.median(var), statistics.median(bound)
    resolved = min(stock) > max(bound)
    f = (ms - mv) / (ms - mb) if resolved else float("nan")
    return Record(
        f"{tag}: {label} ({clock}{'' if resolved else ', UNRESOLVED: noise > effect'})",
        f"stock {_fmt(ms)} / bound {_fmt(mb)}", f"{v} {_fmt(mv)}", f, target,
        values={"clock": clock, "resolved": resolved, "stock_s": stock, f"{v}_s": var, f"{b}_s": bound},
    )


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def report(side: int, samples: Samples, unit: str, records: list[Record]) -> None:
    tag = f"{side * 8}px {unit}"
    rows = [
        ("AgentSD: fraction of bound", "agent", "bound", TARGETS[side]),
        ("ToMe: fraction of bound", "tome", "bound", None),
        ("AgentSD x2: fraction of its bound", "agent_md2", "bound_md2", None),
    ]
    for clock in ("wall", "cpu"):
        for label, v, b, target in rows:
            records.append(fraction_record(tag, label, samples.clock(clock), v, b, target, clock))
            print(records[-1].line(), flush=True)
    wall = {k: statistics.median(x) for k, x in samples.wall.items()}
    cpu = {k: statistics.median(x) for k, x in samples.cpu.items()}
    for v in ("agent", "tome", "bound", "agent_md2", "bound_md2"):
        records.append(
            Record(f"{tag}: speed-up (wall)", f"stock {_fmt(wall['stock'])}", f"{v} {_fmt(wall[v])}",
                   wall["stock"] / wall[v], values={"stock_s": wall["stock"], f"{v}_s": wall[v],
                                                    "cpu_speedup": cpu["stock"] / cpu[v]})
        )
        print(records[-1].line() + f"  (cpu time: {cpu['stock'] / cpu[v]:.3g}x)", flush=True)
    mem = samples.memory
    for v in ("agent", "tome"):
        records.append(
            Record(
                f"{tag}: peak extra memory", f"stock {mem['stock'] / MiB:.0f} MiB", f"{v} {mem[v] / MiB:.0f} MiB",
                mem["stock"] / max(mem[v], 1), values={f"{k}_bytes": x for k, x in mem.items()},
            )
        )
        print(records[-1].line(), flush=True)


def combine_levels(per_level: dict[int, Samples], counts: dict[int, int]) -> Samples:
    """Seconds of all affected blocks per variant and round: sum over levels of count x one block's time.

    Level-1 blocks are unpatched by the max_downsample=1 variants, so their level-1 time is stock's;
    AgentSD x2 runs level 0 exactly as AgentSD does. Memory: the level-0 block's.
    """
    lvl0, lvl1 = per_level[0], per_level[1]
    n0, n1 = counts[1], counts[2]
    level0_of = {"stock": "stock", "tome": "tome", "agent": "agent", "bound": "bound",
                 "agent_md2": "agent", "bound_md2": "bound"}
    level1_of = {"stock": "stock", "tome": "stock", "agent": "stock", "bound": "stock",
                 "agent_md2": "agent_md2", "bound_md2": "bound_md2"}
    out = Samples(memory=dict(lvl0.memory))
    for clock in ("wall", "cpu"):
        a, b, dst = lvl0.clock(clock), lvl1.clock(clock), out.clock(clock)
        for v in level0_of:
            dst[v] = [n0 * x + n1 * y for x, y in zip(a[level0_of[v]], b[level1_of[v]])]
    return out


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    torch.set_grad_enabled(False)
    from diffusers import UNet2DConditionModel

    print(f"threads={torch.get_num_threads()} quick={args.quick}", flush=True)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    print(f"SD1.5-architecture UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M params, "
          f"built in {time.perf_counter() - t0:.0f} s", flush=True)
    factories = variants()
    check_bounds_match(unet, factories)
    counts = level_counts(unet)
    ehs = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(1))
    records: list[Record] = []

    for side in (64, 128):
        print(f"--- {side * 8} px ({side}x{side} latent)", flush=True)
        if args.quick:
            inputs = capture_block_inputs(unet, side, ehs)
            per_level = {}
            for level, names in ((0, ["stock", "tome", "agent", "bound"]), (1, ["stock", "agent_md2", "bound_md2"])):
                block = unet.down_blocks[level].attentions[0].transformer_blocks[0]
                a, kw = inputs[level]
                per_level[level] = time_variants(
                    unet, names, factories, lambda block=block, a=a, kw=kw: block(*a, **kw),
                    repeats=2 if side == 64 else 1, latent=side, memory_round=False,
                )
            report(side, combine_levels(per_level, counts), "blocks", records)
        else:
            sample = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))
            samples = time_variants(
                unet, list(factories), factories, lambda sample=sample: unet(sample, 999, ehs),
                repeats=3 if side == 64 else 2, latent=side, memory_round=False,
            )
            report(side, samples, "UNet step", records)
    header = machine_header(args.quick) | {"transformer_blocks_per_level": counts}
    return finish(records, args.json, header)


if __name__ == "__main__":
    sys.exit(main())
