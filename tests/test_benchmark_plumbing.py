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
