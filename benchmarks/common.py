"""Shared benchmark plumbing: interleaved median timing, peak extra memory, JSON records.

Every benchmark prints one line per comparison and can write a JSON list of records
``{"name", "baseline", "candidate", "ratio", "target", "met", "values"}``. ``ratio`` is always
"higher is better" (a speed-up, a memory saving factor, a fraction of peak) and ``met`` says whether
it reached ``target`` (both null for comparisons reported without a target).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Record:
    name: str
    baseline: str
    candidate: str
    ratio: float
    target: float | None = None
    met: bool | None = None
    values: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target is not None:
            self.met = bool(self.ratio >= self.target)

    def line(self) -> str:
        goal = "" if self.target is None else f"  target >= {self.target:g}: {'MET' if self.met else 'NOT MET'}"
        return f"{self.name:<34} {self.candidate} vs {self.baseline}: {self.ratio:.3g}x{goal}"


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    inner: dict[str, int] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin so drift hits all of them alike.

    ``inner[name]`` runs a fast function several times per sample (the sample is divided back), so a
    40 ms kernel and a 4 s kernel can share rounds. On a CUDA ``device`` each sample is timed with CUDA
    events and waits for the GPU to finish, so asynchronous launches are counted; elsewhere perf_counter.
    """
    inner = inner or {}
    cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            count = inner.get(name, 1)
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(count):
                    fn()
                end.record()
                torch.cuda.synchronize()
                samples[name].append(start.elapsed_time(end) / 1e3 / count)
            else:
                t0 = time.perf_counter()
                for _ in range(count):
                    fn()
                samples[name].append((time.perf_counter() - t0) / count)
    return {name: statistics.median(ts) for name, ts in samples.items()}


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    # The profiler's kineto backend prints start/stop lines on fd 2; keep the report readable.
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by torch's CPU allocator during ``fn()`` above what existed before it.

    Read from the profiler's allocation events, so it counts every tensor a kernel allocates
    internally, and nothing of the process's other memory.
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """fp32 matmul throughput of this machine right now (the 'peak' other kernels are judged by)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    t = time_interleaved({"mm": lambda: a @ b}, repeats=repeats)["mm"]
    return 2 * size**3 / t / 1e9


def parse_args(description: str, *, device: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    if device:
        parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="reduced run (< 2 min) measuring every comparison")
    parser.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def finish(records: list[Record], json_path: str | None, header: dict) -> int:
    met = [r for r in records if r.target is not None]
    missed = [r.name for r in met if not r.met]
    print(f"targets met: {len(met) - len(missed)}/{len(met)}" + (f"  (missed: {', '.join(missed)})" if missed else ""))
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        payload = [dict(asdict(r), run=header) for r in records]
        with open(json_path, "w") as fh:
            json.dump(payload, fh, indent=2)
        print(f"wrote {json_path}")
    return 0


def machine_header(quick: bool) -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "quick": quick,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
