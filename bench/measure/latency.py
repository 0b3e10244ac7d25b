"""Inference latency with a stabilising warm-up and device synchronisation, timed side by side for the models of
a run (base, unmerged, merged), forward passes and KV-cache generation; ratios to the base model per round."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.measure.memory import MemoryMeter
from bench.model.device import sync
from bench.model.precision import autocast


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

