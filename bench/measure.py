"""Measurement: per-phase memory (CUDA allocated/reserved over a baseline, or CPU peak RSS) and
inference latency with warm-up and device synchronisation."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_cpu_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so the next reading is this phase's peak (Linux only)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoryMeter:
    """Records the peak memory of named phases. On CUDA: peak allocated and reserved bytes (absolute and
    over the baseline allocated at the phase start). On CPU: peak resident set size of the process."""

    def __init__(self, device: torch.device):
        self.device = device
        self.phases: dict[str, dict[str, int | str | None]] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            baseline = torch.cuda.memory_allocated(self.device)
            yield
            sync(self.device)
            peak_alloc = torch.cuda.max_memory_allocated(self.device)
            self.phases[name] = {
                "kind": "cuda",
                "baseline_allocated_bytes": baseline,
                "peak_allocated_bytes": peak_alloc,
                "peak_allocated_over_baseline_bytes": peak_alloc - baseline,
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(self.device),
            }
        else:
            resettable = _reset_cpu_peak()
            baseline = _proc_status_bytes("VmRSS")
            yield
            peak = _proc_status_bytes("VmHWM")
            self.phases[name] = {
                "kind": "cpu_rss",
                "baseline_rss_bytes": baseline,
                # Without a resettable mark the peak is the process's lifetime peak: say so.
                "peak_rss_bytes" if resettable else "lifetime_peak_rss_bytes": peak,
                "peak_rss_over_baseline_bytes": (peak - baseline) if (resettable and peak and baseline) else None,
            }


def latency_ms(model: nn.Module, batch: dict[str, torch.Tensor], warmup_iters: int, iters: int,
               device: torch.device, autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Forward-pass latency of one batch: warm-up iterations first, then `iters` timed ones, each
    bracketed by device synchronisation. Returns p50/p95/mean in milliseconds."""
    model.eval()
    times = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                                enabled=autocast_dtype is not None):
        for i in range(warmup_iters + iters):
            sync(device)
            start = time.perf_counter()
            model(**batch)
            sync(device)
            if i >= warmup_iters:
                times.append((time.perf_counter() - start) * 1000.0)
    arr = np.asarray(times)
    return {"p50_ms": float(np.percentile(arr, 50)), "p95_ms": float(np.percentile(arr, 95)),
            "mean_ms": float(arr.mean()), "iters": iters, "warmup_iters": warmup_iters}


def latency_batch(vocab_size: int, batch_size: int, seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A fixed synthetic batch with no padding, so every position costs compute."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab_size, (batch_size, seq_len), generator=g)
    ids[:, 0] = 101 if vocab_size > 101 else 0
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"cpu: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores)"
