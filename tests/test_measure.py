"""Measurement: the record's memory/latency/throughput/storage fields on a smoke run (names carry units,
values make sense), and unit tests of the latency and memory helpers and the GPU start check."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from bench import BenchError
from bench.measure import latency as L
from bench.measure import memory as M
from bench.orchestrate.runner import run
from methods.base import param_count
from tests.conftest import needs_glue

UNIT_SUFFIXES = ("_bytes", "_s", "_ms", "_per_s", "_ratio")
COUNTS = {"steps", "samples", "timed_steps", "timing_warmup_steps", "best_step", "batch_size", "seq_len",
          "timed_iters", "warmup_iters", "rounds", "max_batch_seq_len"}


def _assert_units(section: dict, where: str) -> None:
    """Every number in a measurement section is named with its unit, or is a count."""
    for key, value in section.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        assert key.endswith(UNIT_SUFFIXES) or key in COUNTS, f"{where}.{key} has no unit in its name"


@needs_glue
def test_smoke_record_has_every_measurement_with_units(make_cfg):
    threads = torch.get_num_threads()
    try:
        rec = run(make_cfg("method=lora", "rank=4", "cpu_threads=1"))
    finally:
        torch.set_num_threads(threads)
    assert rec["status"] == "ok", rec.get("error")
    assert rec["provenance"]["torch_threads"] == 1

    # memory: every phase, CPU peak RSS labelled as such (CUDA fields when run on a GPU)
    phases = rec["memory"]
    assert set(phases) == {"train", "eval", "latency_base", "latency_unmerged", "latency_merged"}
    for name, mem in phases.items():
        _assert_units(mem, f"memory.{name}")
        assert mem["phase_s"] > 0
        if mem["kind"] == "cpu_rss":
            assert mem["peak_rss_scope"] == "phase"
            assert mem["peak_rss_bytes"] >= mem["baseline_rss_bytes"] > 0
            assert mem["peak_rss_over_baseline_bytes"] >= 0
        else:
            assert mem["kind"] == "cuda"
            assert mem["peak_allocated_bytes"] >= mem["baseline_allocated_bytes"] > 0
            assert mem["peak_reserved_bytes"] >= mem["peak_allocated_bytes"]
    assert rec["peak_memory_bytes"] > 0 and rec["peak_memory_kind"] in ("cpu_rss_phase", "cuda_allocated")

    # latency: base, unmerged, merged, interleaved, after a warm-up
    lat = rec["latency"]
    assert lat["order"] == "interleaved" and lat["batch_size"] == 4 and lat["seq_len"] == 16
    for variant in ("base", "unmerged", "merged"):
        v = lat[variant]
        _assert_units(v, f"latency.{variant}")
        assert 0 < v["min_ms"] <= v["p50_ms"] <= v["p95_ms"]
        assert v["mean_ms"] > 0 and v["std_ms"] >= 0
        assert v["timed_iters"] == 3 and v["warmup_iters"] >= 1 and v["warmup_s"] > 0
    _assert_units(lat, "latency")
    assert lat["merged_over_base_p50_ratio"] > 0 and lat["unmerged_over_base_p50_ratio"] > 0

    # throughput: warm-up steps excluded, step time split from data time
    tr = rec["train"]
    _assert_units(tr, "train")
    assert tr["timed_steps"] == tr["steps"] - tr["timing_warmup_steps"] > 0
    assert tr["samples_per_s"] > 0 and tr["tokens_per_s"] > tr["samples_per_s"]  # several tokens per sample
    assert tr["step_time_ms"] > 0 and tr["data_time_ms"] >= 0
    assert tr["timed_s"] == pytest.approx(tr["compute_s"] + tr["data_s"])
    assert tr["timed_s"] <= tr["wall_s"]
    assert 0 < tr["max_batch_seq_len"] <= 32  # smoke budget: max_seq_len 32
    assert rec["train_samples_per_s"] == tr["samples_per_s"] and rec["train_tokens_per_s"] == tr["tokens_per_s"]

    # storage: what must be saved vs the full model
    assert 0 < rec["adapter_bytes"] < 0.05 * rec["full_model_bytes"]
    _assert_units({k: v for k, v in rec.items() if k.endswith("_bytes")}, "record")


def test_latency_stats_percentiles():
    s = L.latency_stats([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["p50_ms"] == 3.0 and s["min_ms"] == 1.0 and s["timed_iters"] == 5
    assert s["mean_ms"] == pytest.approx(22.0)
    assert s["p95_ms"] == pytest.approx(np.percentile([1, 2, 3, 4, 100], 95)) and s["p95_ms"] >= s["p50_ms"]
    with pytest.raises(ValueError):
        L.latency_stats([])


class _Slow(nn.Module):
    """Forward takes `costs_ms[i]` on call i (then the last value): a model with first-use overheads."""

    def __init__(self, costs_ms: list[float]):
        super().__init__()
        self.costs, self.calls = costs_ms, 0

    def forward(self, **batch):
        time.sleep(self.costs[min(self.calls, len(self.costs) - 1)] / 1000)
        self.calls += 1
        return batch["x"]


def test_warm_up_runs_until_timings_are_stable():
    model = _Slow([80.0, 40.0, 20.0, 10.0, 5.0, 2.0])  # first passes slow, getting faster, then steady
    info = L.warm_up(model, {"x": torch.zeros(1)}, torch.device("cpu"), min_iters=3, tol=0.5, max_s=5.0)
    assert info["warmup_converged"] and info["warmup_iters"] >= 9  # past the slow passes, then a stable window
    stats = L.latency_interleaved({"slow": model}, {"x": torch.zeros(1)}, warmup_iters=3, iters=5,
                                  device=torch.device("cpu"), warmup_tol=0.5)["slow"]
    assert stats["p95_ms"] < 20.0  # none of the slow first passes leaked into the timed ones


def test_warm_up_stops_at_its_time_limit():
    model = _Slow([30.0, 1.0, 30.0, 1.0, 30.0, 60.0] * 20)  # never stable
    info = L.warm_up(model, {"x": torch.zeros(1)}, torch.device("cpu"), min_iters=1, tol=0.0, max_s=0.3)
    assert not info["warmup_converged"] and 0.3 <= info["warmup_s"] < 1.5


def test_latency_interleaved_times_every_model_in_rotating_rounds():
    order: list[str] = []

    class Tag(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, **batch):
            order.append(self.name)
            return batch["x"]

    models = {"a": Tag("a"), "b": Tag("b"), "c": Tag("c")}
    meter = M.MemoryMeter(torch.device("cpu"))
    out = L.latency_interleaved(models, {"x": torch.zeros(1)}, warmup_iters=0, iters=7, device=torch.device("cpu"),
                                rounds=3, meter=meter)
    assert {n: out[n]["timed_iters"] for n in models} == {"a": 7, "b": 7, "c": 7}
    assert set(meter.phases) == {"latency_a", "latency_b", "latency_c"}
    firsts = [order[0], order[9], order[15]]  # rounds of 3, 2, 2 passes per model; each round's first model
    assert firsts == ["a", "b", "c"]


def test_cpu_memory_meter_sees_a_phase_allocation():
    meter = M.MemoryMeter(torch.device("cpu"))
    with meter.phase("alloc"):
        buf = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        del buf
    with meter.phase("idle"):
        pass
    alloc, idle = meter.phases["alloc"], meter.phases["idle"]
    assert alloc["kind"] == "cpu_rss" and alloc["peak_rss_scope"] == "phase"
    assert alloc["peak_rss_over_baseline_bytes"] >= 60 * 2**20
    assert idle["peak_rss_over_baseline_bytes"] < 16 * 2**20  # the mark was reset: the 64 MiB is not seen again
    assert M.peak_memory_summary(meter.phases, "alloc") == {"peak_memory_bytes": alloc["peak_rss_bytes"],
                                                            "peak_memory_kind": "cpu_rss_phase"}
    assert M.peak_memory_summary({}, "train")["peak_memory_bytes"] is None


def _fake_cuda(monkeypatch, *, total, free, allocated, reserved):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)


def test_gpu_start_check_flags_and_refuses_a_busy_gpu(monkeypatch):
    gib = 2**30
    cuda = torch.device("cuda", 0)
    assert M.check_gpu_start(torch.device("cpu"), "refuse", gib) is None

    _fake_cuda(monkeypatch, total=80 * gib, free=79 * gib, allocated=0, reserved=gib // 2)
    clean = M.check_gpu_start(cuda, "refuse", 2 * gib)  # only a CUDA context's worth outside the allocator
    assert clean["flags"] == [] and clean["used_outside_allocator_bytes"] == gib // 2

    _fake_cuda(monkeypatch, total=80 * gib, free=60 * gib, allocated=gib, reserved=2 * gib)
    flagged = M.check_gpu_start(cuda, "flag", 2 * gib)
    assert len(flagged["flags"]) == 2  # a leaked tensor of this process, and 18 GiB used by someone else
    assert flagged["start_allocated_bytes"] == gib and flagged["used_outside_allocator_bytes"] == 18 * gib
    with pytest.raises(BenchError, match="measure.busy_gpu=flag"):
        M.check_gpu_start(cuda, "refuse", 2 * gib)
    with pytest.raises(BenchError, match="choose flag, refuse or ignore"):
        M.check_gpu_start(cuda, "sometimes", 2 * gib)


def test_param_count_unpacks_4bit_parameters():
    class Params4bit(nn.Parameter):  # stands in for bitsandbytes' class of the same name: 2 values per byte
        pass

    packed = Params4bit(torch.zeros(50, dtype=torch.uint8), requires_grad=False)
    assert param_count(packed) == 100 and param_count(nn.Parameter(torch.zeros(3, 4))) == 12


def test_latency_ratio_pairs_rounds_so_a_slow_spell_is_not_an_overhead():
    """A measured case: on a busy machine merged/base p50 read 1.16 while the fastest passes were equal. Paired by
    round, the slow spell (round 2 for base, round 3 for merged) cancels out or is flagged, never a verdict."""
    def stats(p50, mn, rounds):
        return {"p50_ms": p50, "min_ms": mn, "round_p50_ms": rounds}

    lat = {"base": stats(542.0, 540.0, [541.0, 702.0, 545.0, 543.0]),
           "merged": stats(629.0, 539.0, [540.0, 700.0, 546.0, 541.0]),
           "unmerged": stats(560.0, 554.0, [556.0, 722.0, 900.0, 555.0])}
    r = L.latency_ratios(lat)
    assert r["merged_over_base_p50_ratio"] > 1.15  # the misleading figure
    assert 0.99 < r["merged_over_base_ratio"] < 1.01 and not r["merged_over_base_too_noisy"]
    assert abs(r["merged_over_base_min_ms_ratio"] - 539 / 540) < 1e-12
    assert r["unmerged_over_base_too_noisy"]  # one round 1.65x: the rounds disagree, no verdict
    assert r["unmerged_over_base_highest_round_ratio"] > 1.6 and r["unmerged_over_base_lowest_round_ratio"] < 1.03


def test_interleaved_latency_keeps_each_rounds_median():
    out = L.latency_interleaved({"a": nn.Identity(), "b": nn.Identity()}, {"input": torch.zeros(1)},
                                warmup_iters=0, iters=8, device=torch.device("cpu"), rounds=4)
    assert [len(out[n]["round_p50_ms"]) for n in ("a", "b")] == [4, 4]
    assert set(L.latency_ratios(out, base="a")) >= {"b_over_base_ratio", "b_over_base_too_noisy"}
