"""The benchmark helpers measure what they claim (no timing assertions)."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from common import Record, finish, peak_extra_bytes, time_interleaved  # noqa: E402


def test_peak_extra_bytes_sees_temporary_allocations():
    def alloc():
        a = torch.empty(1024, 1024)  # 4 MiB, freed before returning
        b = torch.empty(256, 1024)
        del a, b

    peak = peak_extra_bytes(alloc)
    assert 5 * 2**20 <= peak < 6 * 2**20


def test_records_and_json(tmp_path):
    recs = [Record("a", "x 2 s", "y 1 s", 2.0, 1.5), Record("b", "x", "y", 0.5, 1.0), Record("c", "x", "y", 3.0)]
    assert recs[0].met is True and recs[1].met is False and recs[2].met is None
    path = tmp_path / "out.json"
    finish(recs, str(path), {"quick": True})
    data = json.loads(path.read_text())
    assert [d["name"] for d in data] == ["a", "b", "c"]
    assert {"name", "baseline", "candidate", "ratio", "target", "met"} <= set(data[0])


def test_time_interleaved_returns_medians():
    t = time_interleaved({"a": lambda: None, "b": lambda: sum(range(1000))}, repeats=3, inner={"a": 4})
    assert set(t) == {"a", "b"} and all(v >= 0 for v in t.values())


def test_the_op_counter_of_the_overhead_benchmark_counts_dispatched_ops():
    from overhead import _Count

    x = torch.randn(3)
    with _Count() as counted:
        (x + 1).mul(2).sum()
    assert counted.counts == {"aten.add.Tensor": 1, "aten.mul.Tensor": 1, "aten.sum.default": 1}
    assert counted.total == 3


def test_the_gpu_benchmark_builds_every_variant_in_a_dry_run(tmp_path):
    """benchmarks/gpu.py --dry-run: each kernel, mask, agent and UNet variant (eager and compiled) runs at tiny
    sizes on the CPU and returns finite values; nothing is timed."""
    import subprocess

    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu.py")
    out = tmp_path / "gpu.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, script, "--dry-run", "--json", str(out)], capture_output=True, text=True,
                          timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    names = [r["name"] for r in json.loads(out.read_text())]
    for expected in ("attention d40", "window", "agent attention", "UNet step 128px: agent_sd compiled",
                     "UNet step 256px: bound"):
        assert any(n.startswith(expected) for n in names), (expected, names)
