"""Measurement: per-phase memory (CUDA allocated/reserved over a baseline, or CPU peak RSS), the state of
the GPU at run start, and inference latency with a stabilising warm-up and device synchronisation.

What each number means (also in README.md, "Measurement"):
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
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from bench import BenchError
from bench.precision import autocast


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
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux only). True when it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU, where every op is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def _timed_forward_ms(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    model(**batch)
    sync(device)
    return (time.perf_counter() - start) * 1000.0


def warm_up(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device, *, min_iters: int,
            tol: float, max_s: float) -> dict[str, Any]:
    """Forward passes until timings are stable: `min_iters` first, then windows of `max(3, min_iters)` passes
    until a window's median is within `tol` (relative) of the previous window's, or `max_s` seconds have
    passed. First-use costs (allocator growth and page faults, kernel/primitive selection, lazy init, caches)
    land here and not in the timed passes. Call inside inference_mode/autocast like the timed passes."""
    start = time.perf_counter()
    times = [_timed_forward_ms(model, batch, device) for _ in range(min_iters)]
    window = max(3, min_iters)
    converged = min_iters == 0
    prev = float(np.median(times[-window:])) if times else None
    while not converged and time.perf_counter() - start < max_s:
        cur_times = [_timed_forward_ms(model, batch, device) for _ in range(window)]
        times += cur_times
        cur = float(np.median(cur_times))
        converged = prev is not None and abs(cur - prev) <= tol * prev
        prev = cur
    return {"warmup_iters": len(times), "warmup_s": time.perf_counter() - start, "warmup_converged": converged}


def latency_stats(times_ms: list[float] | np.ndarray) -> dict[str, float]:
    """p50, p95, mean, min and standard deviation of per-pass times, in milliseconds."""
    arr = np.asarray(times_ms, dtype=float)
    if arr.size == 0:
        raise ValueError("no timings")
    return {"p50_ms": float(np.percentile(arr, 50)), "p95_ms": float(np.percentile(arr, 95)),
            "mean_ms": float(arr.mean()), "min_ms": float(arr.min()), "std_ms": float(arr.std()),
            "timed_iters": int(arr.size)}


@contextmanager
def _inference(device: torch.device, autocast_dtype: torch.dtype | None) -> Iterator[None]:
    with torch.inference_mode(), autocast(device, autocast_dtype):
        yield


def latency_interleaved(models: dict[str, nn.Module], batch: dict[str, torch.Tensor], *, warmup_iters: int,
                        iters: int, device: torch.device, autocast_dtype: torch.dtype | None = None,
                        rounds: int = 4, warmup_tol: float = 0.05, max_warmup_s: float = 10.0,
                        meter: MemoryMeter | None = None) -> dict[str, dict[str, Any]]:
    """Latency of several models measured side by side, so that drift of the machine's speed (other
    processes, clocks) hits all of them alike: each is warmed up (under its own memory phase
    `latency_<name>` when a meter is given), then `iters` timed passes per model are split into `rounds`
    blocks taken in turn, the order rotated every round."""
    names = list(models)
    info: dict[str, dict[str, Any]] = {}
    for name in names:
        models[name].eval()
        with (meter.phase(f"latency_{name}") if meter else nullcontext()), _inference(device, autocast_dtype):
            info[name] = warm_up(models[name], batch, device, min_iters=warmup_iters, tol=warmup_tol,
                                 max_s=max_warmup_s)
    rounds = max(1, min(rounds, iters))
    per_round = [iters // rounds + (1 if r < iters % rounds else 0) for r in range(rounds)]
    times: dict[str, list[float]] = {n: [] for n in names}
    round_p50: dict[str, list[float]] = {n: [] for n in names}
    with _inference(device, autocast_dtype):
        for r, n_iters in enumerate(per_round):
            for name in names[r % len(names):] + names[:r % len(names)]:
                block = [_timed_forward_ms(models[name], batch, device) for _ in range(n_iters)]
                times[name] += block
                round_p50[name].append(float(np.median(block)))
    return {name: {**latency_stats(times[name]), **info[name], "rounds": rounds, "round_p50_ms": round_p50[name]}
            for name in names}


def _timed_generate_ms(model: nn.Module, batch: dict[str, torch.Tensor], new_tokens: int, pad_id: int,
                       device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=pad_id)
    sync(device)
    return (time.perf_counter() - start) * 1000.0


def generation_interleaved(models: dict[str, nn.Module], batch: dict[str, torch.Tensor], *, new_tokens: int,
                           pad_id: int, warmup_iters: int, iters: int, device: torch.device,
                           autocast_dtype: torch.dtype | None = None, rounds: int = 4) -> dict[str, dict[str, Any]]:
    """Generation with the KV cache, greedy, timed side by side as `latency_interleaved` times forward passes: per
    model, `warmup_iters` untimed generations, then `iters` timed pairs in `rounds` rotated blocks. A pair is one
    generation of 1 token (the prefill: one forward over the prompt, then the first token) and one of
    `1 + new_tokens` tokens; the decode time is their difference, so the prefill and per-call costs cancel.
    Per model: `prefill_ms` (p50 of the 1-token generations), `decode_ms_per_token` and
    `decode_tokens_per_s` (batch rows x tokens / s) from the p50s, and the rounds' values for the ratios."""
    names = list(models)
    rows = int(batch["input_ids"].shape[0])
    rounds = max(1, min(rounds, iters))
    per_round = [iters // rounds + (1 if r < iters % rounds else 0) for r in range(rounds)]
    one: dict[str, list[float]] = {n: [] for n in names}
    many: dict[str, list[float]] = {n: [] for n in names}
    round_decode: dict[str, list[float]] = {n: [] for n in names}
    with _inference(device, autocast_dtype):
        for name in names:
            models[name].eval()
            for _ in range(warmup_iters):
                _timed_generate_ms(models[name], batch, 1 + new_tokens, pad_id, device)
        for r, n_iters in enumerate(per_round):
            for name in names[r % len(names):] + names[:r % len(names)]:
                a = [_timed_generate_ms(models[name], batch, 1, pad_id, device) for _ in range(n_iters)]
                b = [_timed_generate_ms(models[name], batch, 1 + new_tokens, pad_id, device) for _ in range(n_iters)]
                one[name] += a
                many[name] += b
                round_decode[name].append((float(np.median(b)) - float(np.median(a))) / new_tokens)
    out = {}
    for name in names:
        decode_ms = (float(np.median(many[name])) - float(np.median(one[name]))) / new_tokens
        out[name] = {"prefill_ms": float(np.median(one[name])), "prefill_min_ms": float(np.min(one[name])),
                     "generate_ms": float(np.median(many[name])), "decode_ms_per_token": decode_ms,
                     "decode_tokens_per_s": rows * 1000.0 / decode_ms if decode_ms > 0 else None,
                     "timed_iters": len(one[name]), "rounds": rounds,
                     "round_p50_ms": round_decode[name]}  # per round: decode ms per token (for latency_ratios)
    return out


def latency_ratios(latency: dict[str, dict[str, Any]], base: str = "base", noise_tol: float = 0.05
                   ) -> dict[str, Any]:
    """Each model's latency relative to `base`, robust to a shared machine. The models are timed in interleaved
    rounds, so a slow spell hits all of them in the same round: `<name>_over_base_ratio` is the median over rounds
    of the round's median pass time / base's in that round, with the rounds' smallest and largest ratio
    (`..._lowest_round_ratio` / `..._highest_round_ratio`) and the ratio of the fastest passes
    (`..._min_ms_ratio`, what the hardware can do). `<name>_over_base_too_noisy` is true when the rounds
    disagree by more than 2 x `noise_tol` (max - min): the ratio then cannot tell a few-percent overhead from
    noise. `..._p50_ratio` is the plain ratio of p50s, kept for older readers."""
    out: dict[str, Any] = {}
    ref = latency[base]
    for name, stats in latency.items():
        if name == base:
            continue
        if "p50_ms" in stats:
            out[f"{name}_over_base_p50_ratio"] = stats["p50_ms"] / ref["p50_ms"]
            out[f"{name}_over_base_min_ms_ratio"] = stats["min_ms"] / ref["min_ms"]
        rounds = np.asarray(stats["round_p50_ms"], float) / np.asarray(ref["round_p50_ms"], float)
        out[f"{name}_over_base_ratio"] = float(np.median(rounds))
        out[f"{name}_over_base_lowest_round_ratio"] = float(rounds.min())
        out[f"{name}_over_base_highest_round_ratio"] = float(rounds.max())
        out[f"{name}_over_base_too_noisy"] = bool(rounds.max() - rounds.min() > 2 * noise_tol)
    return out


def latency_batch(vocab_size: int, batch_size: int, seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A fixed synthetic batch with no padding, so every position costs compute."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000 if vocab_size > 2000 else 0, vocab_size, (batch_size, seq_len), generator=g)
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
