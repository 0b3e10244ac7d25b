"""Measurement: per-phase memory (CUDA allocated/reserved over a baseline, or CPU peak RSS), the state of
the GPU at run start, and inference latency with a stabilising warm-up and device synchronisation.

What each number means (also in docs/measurement.md):
- CUDA `*_allocated_bytes`: bytes of live tensors from PyTorch's caching allocator
  (`torch.cuda.memory_allocated` / `max_memory_allocated`); `*_reserved_bytes`: what the allocator holds
  from the driver (allocated + its cache; `memory_reserved`). Neither counts the CUDA context (~0.5 GiB).
  Each phase empties the allocator's cache and resets the peak counters first, so a phase's peaks are its
  own; `baseline_*` is the value at the phase start, `*_over_baseline_bytes` the growth during it.
- CPU `peak_rss_bytes`: the kernel's high-water mark of the whole process's resident set (VmHWM), reset at
  the phase start through /proc/self/clear_refs (Linux). It is process memory, not tensor memory: it
  includes Python, libraries and the data; `peak_rss_scope` says whether the reset worked.
- Latency: milliseconds per forward pass of one fixed batch, `torch.inference_mode`, after a warm-up that
  runs until timings stop changing; with device synchronisation before and after every timed pass.
"""
from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from bench import BenchError
from bench.model.device import sync


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """The process's resident set now (VmRSS; Linux), None where /proc is missing."""
    return _proc_status_bytes("VmRSS")


def _reset_cpu_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux only). True when it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def release_memory(device: torch.device) -> None:
    """Collect garbage and hand the CUDA allocator's cached blocks back to the driver (between phases and
    between the runs of a sweep in one process)."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_initialized():
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def cuda_start_state(device: torch.device, busy_threshold_bytes: int) -> dict[str, Any]:
    """The GPU's memory at run start, after freeing what this process can free.

    `start_allocated_bytes` > 0 means tensors of an earlier run in this process are still alive (a leak in a
    sweep run in one process); `used_outside_allocator_bytes` = total - free - reserved is memory held by
    other processes plus this process's CUDA context and non-PyTorch allocations (a context is ~0.3-0.6 GiB).
    `flags` lists what makes this run's memory figures or speed doubtful."""
    release_memory(device)
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    reserved = torch.cuda.memory_reserved(device)
    outside = total - free - reserved
    flags = []
    if allocated > 0:
        flags.append(f"this process already holds {allocated} bytes of CUDA tensors at run start "
                     f"(left over from an earlier run in the same process)")
    if outside > busy_threshold_bytes:
        flags.append(f"{outside} bytes of GPU memory are used outside this process's PyTorch allocator "
                     f"(another process on the GPU?), over measure.busy_gpu_threshold_bytes={busy_threshold_bytes}")
    return {"total_bytes": total, "free_bytes": free, "start_allocated_bytes": allocated,
            "start_reserved_bytes": reserved, "used_outside_allocator_bytes": outside, "flags": flags}


def check_gpu_start(device: torch.device, policy: str, busy_threshold_bytes: int) -> dict[str, Any] | None:
    """`cuda_start_state` plus the policy: `flag` records the problems, `refuse` raises BenchError,
    `ignore` records them too but never refuses. None on CPU."""
    if device.type != "cuda":
        return None
    if policy not in ("flag", "refuse", "ignore"):
        raise BenchError(f"measure.busy_gpu={policy}: choose flag, refuse or ignore")
    state = cuda_start_state(device, busy_threshold_bytes)
    if policy == "refuse" and state["flags"]:
        raise BenchError(f"GPU not clean at run start: {state['flags'][0]}; free it, or set measure.busy_gpu=flag")
    return state


class MemoryMeter:
    """Records the peak memory of named phases; see the module docstring for what each field means."""

    def __init__(self, device: torch.device):
        self.device = device
        self.phases: dict[str, dict[str, Any]] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            release_memory(self.device)  # the cache left by the last phase must not count in this one
            torch.cuda.reset_peak_memory_stats(self.device)
            base_alloc = torch.cuda.memory_allocated(self.device)
            base_res = torch.cuda.memory_reserved(self.device)
            start = time.perf_counter()
            yield
            sync(self.device)
            peak_alloc = torch.cuda.max_memory_allocated(self.device)
            peak_res = torch.cuda.max_memory_reserved(self.device)
            self.phases[name] = {
                "kind": "cuda",
                "baseline_allocated_bytes": base_alloc,
                "baseline_reserved_bytes": base_res,
                "peak_allocated_bytes": peak_alloc,
                "peak_reserved_bytes": peak_res,
                "peak_allocated_over_baseline_bytes": peak_alloc - base_alloc,
                "peak_reserved_over_baseline_bytes": peak_res - base_res,
                "phase_s": time.perf_counter() - start,
            }
        else:
            gc.collect()
            resettable = _reset_cpu_peak()
            baseline = _proc_status_bytes("VmRSS")
            start = time.perf_counter()
            yield
            peak = _proc_status_bytes("VmHWM")
            self.phases[name] = {
                "kind": "cpu_rss",
                # Without a resettable mark the peak is the process's lifetime peak: say so.
                "peak_rss_scope": "phase" if resettable else "process_lifetime",
                "baseline_rss_bytes": baseline,
                "peak_rss_bytes": peak,
                "peak_rss_over_baseline_bytes": (peak - baseline) if (resettable and peak and baseline) else None,
                "phase_s": time.perf_counter() - start,
            }


def peak_memory_summary(phases: dict[str, dict[str, Any]], phase: str = "train") -> dict[str, Any]:
    """One comparable figure for tables and plots: the phase's absolute peak, labelled with what it is."""
    mem = phases.get(phase) or {}
    if mem.get("kind") == "cuda":
        return {"peak_memory_bytes": mem["peak_allocated_bytes"], "peak_memory_kind": "cuda_allocated"}
    if mem.get("kind") == "cpu_rss":
        return {"peak_memory_bytes": mem["peak_rss_bytes"], "peak_memory_kind": f"cpu_rss_{mem['peak_rss_scope']}"}
    return {"peak_memory_bytes": None, "peak_memory_kind": None}


# ---------------------------------------------------------------- latency


