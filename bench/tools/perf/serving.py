"""Serving benchmark (a script, not a test): many adapters on one base model, as a server holding them all sees it.

    python -m bench.tools.perf.serving --quick                   # tiny-bert, N = 1, 2, few passes: does it run
    python -m bench.tools.perf.serving --model minilm --n-adapters 1,4,16,64
    python -m bench.tools.perf.serving --model smollm2 --n-adapters 1,4,16,64 --batch-size 8 --seq-len 128 \\
        --new-tokens 32

For one base model (`--model`, a conf/model name) it makes max(N) + 1 adapters of `--method` (random non-zero
values, bench/tools/perf/adapters.py; speed and memory depend on shapes only), saves them as a run would, and
measures, with the suite's warm-up, device synchronisation and interleaved rounds (bench/measure/latency.py):

1. one adapter: the base model, the adapter unmerged and merged (`merge_and_unload` on a copy);
2. for each N in `--n-adapters` (loaded one after another onto the same model): the time to load one more adapter
   from disk (`load_adapter`) and to switch the active one (`set_adapter`); a batch whose row i goes through
   adapter i mod N in one call (mixed: peft's `adapter_names=`) against the same rows grouped by adapter, one call
   per group after `set_adapter` (sorted: a server that groups requests), beside the base model; rows/s (encoders)
   or prefill and decode tokens/s (causal LMs); each adapter's exact parameter bytes and the measured memory growth
   per adapter loaded (process RSS on a CPU, the CUDA allocator on a GPU).

It prints the tables (units in every column name) and writes a JSON record (`--out`, default
results/perf/serving-<model>.json; `"schema": "serving/1"`) that `python -m analysis.report` shows. What each
column means: docs/measurement.md#the-serving-benchmark.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import logging as hf_logging

from bench import BenchError
from bench.config import CONF, compose_config
from bench.measure.latency import (
    generation_interleaved,
    latency_batch,
    latency_interleaved,
    latency_ratios,
    latency_stats,
)
from bench.measure.memory import release_memory, rss_bytes
from bench.model import is_causal_lm, load_model, model_kind
from bench.model.device import device_name, resolve_device, resolve_precision, sync
from bench.model.precision import autocast, dtype_name, precision_dtypes
from bench.record.provenance import lock_state, provenance
from bench.tools.perf.adapters import adapter_param_bytes, make_adapters
from methods import get_method
from methods.hotswap import check_mixed_batches, load_adapters, mixed_batch_problem, switch
from methods.peft_common import PeftMethod

SCHEMA = "serving/1"
MIB = 2**20
PROBE = "probe"  # the extra adapter loaded and deleted again to time load_adapter


class Mixed(nn.Module):
    """Every row through its own adapter in one call: peft's `adapter_names=` (row i: `row_adapters[i]`)."""

    def __init__(self, model: nn.Module, row_adapters: list[str]):
        super().__init__()
        self.model, self.row_adapters = model, list(row_adapters)

    def forward(self, **batch: Any) -> Any:
        return self.model(**batch, adapter_names=self.row_adapters)

    def generate(self, **kwargs: Any) -> Any:
        return self.model.generate(**kwargs, adapter_names=self.row_adapters)


class Sorted(nn.Module):
    """The same rows grouped by adapter, as a server that groups requests would run them: per group, `set_adapter`
    and one call on the group's rows. The groups' sub-batches are cut once per input batch (a server forms them as
    requests arrive), so the timed calls are the switches and the per-group passes. Returns one output per group
    (`groups` says which rows each holds)."""

    def __init__(self, model: nn.Module, row_adapters: list[str]):
        super().__init__()
        self.model = model
        self.groups: dict[str, list[int]] = {}
        for row, name in enumerate(row_adapters):
            self.groups.setdefault(name, []).append(row)
        self.rows = len(row_adapters)
        self._cut: dict[tuple, list[dict[str, Any]]] = {}

    def _sub_batches(self, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        key = tuple(sorted((k, id(v)) for k, v in kwargs.items()))
        if key not in self._cut:
            self._cut[key] = [{k: v[rows] if torch.is_tensor(v) and v.dim() and v.shape[0] == self.rows else v
                               for k, v in kwargs.items()} for rows in self.groups.values()]
        return self._cut[key]

    def forward(self, **batch: Any) -> list[Any]:
        outs = []
        for name, sub in zip(self.groups, self._sub_batches(batch)):
            switch(self.model, name)
            outs.append(self.model(**sub))
        return outs

    def generate(self, **kwargs: Any) -> list[Any]:
        outs = []
        for name, sub in zip(self.groups, self._sub_batches(kwargs)):
            switch(self.model, name)
            outs.append(self.model.generate(**sub))
        return outs


def row_adapters(names: list[str], n: int, rows: int) -> list[str]:
    """Row i of a batch goes through adapter i mod n (min(n, rows) adapters in the batch, in equal shares)."""
    return [names[i % n] for i in range(rows)]


def _timed_ms(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return 1000.0 * (time.perf_counter() - start)


def _memory_now(device: torch.device) -> int | None:
    gc.collect()
    if device.type == "cuda":
        sync(device)
        return int(torch.cuda.memory_allocated(device))
    return rss_bytes()


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def _logits_by_row(out: Any, groups: dict[str, list[int]] | None) -> torch.Tensor:
    """The logits of a forward's output in row order (Sorted returns one output per group)."""
    if groups is None:
        return out.logits.float()
    first = out[0].logits
    logits = torch.empty((sum(len(r) for r in groups.values()), *first.shape[1:]), dtype=torch.float32,
                         device=first.device)
    for rows, o in zip(groups.values(), out):
        logits[rows] = o.logits.float()
    return logits


class Bench:
    """One base model and its adapters on one device; the settings of every timing."""

    def __init__(self, args: argparse.Namespace, cfg: Any, device: torch.device, precision: str):
        self.args, self.cfg, self.device, self.precision = args, cfg, device, precision
        self.autocast = precision_dtypes(precision).autocast
        self.causal = is_causal_lm(cfg.model)
        m = cfg.measure
        self.warmup = dict(warmup_iters=args.warmup_iters if args.warmup_iters is not None
                           else int(m.latency_warmup_iters),
                           warmup_tol=float(m.latency_warmup_tol),
                           max_warmup_s=args.max_warmup_s if args.max_warmup_s is not None
                           else float(m.latency_max_warmup_s))
        self.noise_tol = float(m.latency_noise_tol)

    def forward_batch(self, vocab: int) -> dict[str, Any]:
        batch: dict[str, Any] = latency_batch(vocab, self.args.batch_size, self.args.seq_len, self.device)
        if self.causal:
            batch["logits_to_keep"] = 1  # a prefill returns the last position's logits, as generate's does
        return batch

    def forward(self, models: dict[str, nn.Module], batch: dict[str, Any]) -> dict[str, Any]:
        """Forward latency (a causal LM's prefill) of `models`, interleaved; ratios to `base`; throughput."""
        out: dict[str, Any] = {"batch_size": self.args.batch_size, "seq_len": self.args.seq_len,
                               "order": "interleaved"}
        out.update(latency_interleaved(models, batch, iters=self.args.iters, device=self.device,
                                       autocast_dtype=self.autocast, rounds=self.args.rounds, **self.warmup))
        out.update(latency_ratios({k: out[k] for k in models}, noise_tol=self.noise_tol))
        for name in models:
            per_s = 1000.0 / out[name]["p50_ms"]
            if self.causal:
                out[name]["prefill_tokens_per_s"] = self.args.batch_size * self.args.seq_len * per_s
            else:
                out[name]["rows_per_s"] = self.args.batch_size * per_s
        return out

    def generation(self, models: dict[str, nn.Module], batch: dict[str, Any], pad_id: int) -> dict[str, Any]:
        """KV-cache decode of `models` (causal LMs), interleaved; ratios to `base` of the decode time per token."""
        out: dict[str, Any] = {"batch_size": self.args.batch_size, "prompt_len": self.args.seq_len,
                               "new_tokens": self.args.new_tokens, "decoding": "greedy, KV cache",
                               "order": "interleaved"}
        out.update(generation_interleaved(
            models, batch, new_tokens=self.args.new_tokens, pad_id=pad_id,
            warmup_iters=max(1, self.warmup["warmup_iters"] // 2), iters=self.args.gen_iters, device=self.device,
            autocast_dtype=self.autocast, rounds=self.args.rounds))
        out.update(latency_ratios({k: out[k] for k in models}, noise_tol=self.noise_tol))
        return out

    def sorted_over_mixed(self, timings: dict[str, Any]) -> dict[str, Any]:
        """Sorted's time over mixed's, paired by round (latency_ratios with mixed as the reference)."""
        pair = latency_ratios({"mixed": timings["mixed"], "sorted": timings["sorted"]}, base="mixed",
                              noise_tol=self.noise_tol)
        return {k.replace("sorted_over_base", "sorted_over_mixed"): v for k, v in pair.items()}


def measure_n(b: Bench, model: nn.Module, base: nn.Module, names: list[str], n: int, batches: dict[str, Any],
              pad_id: int, probe_dir: Path) -> dict[str, Any]:
    """Hot-swap, mixed vs sorted batches and memory with the first `n` of `names` loaded (the active one first)."""
    args, device = b.args, b.device
    rows = row_adapters(names, n, args.batch_size)
    out: dict[str, Any] = {"n_adapters": n, "adapters_in_batch": len(set(rows))}
    loads = []
    for _ in range(args.load_iters):
        loads.append(_timed_ms(partial(model.load_adapter, str(probe_dir), adapter_name=PROBE), device))
        model.delete_adapter(PROBE)
    out["load_adapter_ms"] = latency_stats(loads)
    for it in range(5):  # warm-up
        switch(model, names[it % n])
    out["set_adapter_ms"] = latency_stats([_timed_ms(partial(switch, model, names[(it + 1) % n]), device)
                                           for it in range(args.swap_iters)])
    switch(model, names[0])
    model.eval()

    mixed, grouped = Mixed(model, rows), Sorted(model, rows)
    with torch.inference_mode(), autocast(device, b.autocast):
        check = batches["forward"]
        try:
            mixed_logits = _logits_by_row(mixed(**check), None)
        except (TypeError, ValueError) as exc:  # a layer peft cannot run in a mixed batch
            raise BenchError(f"serving: method '{args.method}' cannot serve mixed-adapter batches: "
                             f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from exc
        diff = (mixed_logits - _logits_by_row(grouped(**check), grouped.groups)).abs()
        out["mixed_vs_sorted_max_abs_logit_diff"] = float(diff.max())
    models = {"base": base, "mixed": mixed, "sorted": grouped}
    out["forward"] = b.forward(models, batches["forward"])
    out["forward"].update(b.sorted_over_mixed(out["forward"]))
    if b.causal:
        out["generation"] = b.generation(models, batches["generation"], pad_id)
        out["generation"].update(b.sorted_over_mixed(out["generation"]))
    switch(model, names[0])
    return out


def _refuse_unmixable(method: str, model: nn.Module) -> None:
    problem = mixed_batch_problem(model)
    if problem:
        raise BenchError(f"serving: method '{method}' cannot serve mixed-adapter batches: {problem}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure everything; the JSON record."""
    if not (CONF / "model" / f"{args.model}.yaml").is_file():
        choices = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
        raise BenchError(f"serving: unknown model '{args.model}'; choose one of: {', '.join(choices)}")
    method = get_method(args.method)
    if not isinstance(method, PeftMethod):
        raise BenchError(f"serving: method '{args.method}' saves {method.saved_format}, not a peft adapter; only "
                         "peft-format methods load and switch by name (methods/hotswap.py)")
    ns = sorted({int(x) for x in str(args.n_adapters).split(",") if x.strip()})
    if not ns or ns[0] < 1:
        raise BenchError(f"serving: --n-adapters {args.n_adapters}: give adapter counts >= 1, e.g. 1,4,16,64")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose_config([f"model={args.model}", f"method={args.method}", f"rank={args.rank}"])
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    method.validate(device)
    method.validate_model(cfg.model)
    b = Bench(args, cfg, device, precision)
    weights = precision_dtypes(precision).weights
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(cfg, ns[-1] + 1, Path(tmp), args.num_labels, check=partial(_refuse_unmixable, method.name))
        *names, probe = list(dirs)
        torch.manual_seed(0)
        base, _ = load_model(cfg.model, args.num_labels, dtype=weights)
        base.to(device).eval()
        vocab = int(base.config.vocab_size)
        pad = base.config.pad_token_id if base.config.pad_token_id is not None else base.config.eos_token_id
        pad_id = int(pad[0] if isinstance(pad, list) else pad or 0)
        batches = {"forward": b.forward_batch(vocab),
                   "generation": latency_batch(vocab, args.batch_size, args.seq_len, device)}

        # The served model: a copy of the base with the adapters loaded onto it one after another.
        served = copy.deepcopy(base)
        before = _memory_now(device)
        model = load_adapters(served, {names[0]: dirs[names[0]]}).to(device)
        growth = {1: (_memory_now(device), before, 1)}
        check_mixed_batches(model)

        # One adapter: base, unmerged, merged.
        single_models: dict[str, nn.Module] = {"base": base, "unmerged": model}
        if method.merges:
            single_models["merged"] = method.merged(model).eval()
        single: dict[str, Any] = {"forward": b.forward(single_models, batches["forward"])}
        if b.causal:
            single["generation"] = b.generation(single_models, batches["generation"], pad_id)
        single_models.pop("merged", None)
        release_memory(device)

        by_n = []
        loaded = 1
        for n in ns:
            if n > loaded:
                before = _memory_now(device)
                for name in names[loaded:n]:
                    model.load_adapter(str(dirs[name]), adapter_name=name)
                model.to(device).eval()
                growth[n] = (_memory_now(device), before, n - loaded)
                loaded = n
            after, start, added = growth[n]
            each = [adapter_param_bytes(model, name) for name in names[:n]]
            entry = measure_n(b, model, base, names, n, batches, pad_id, Path(dirs[probe]))
            entry.update({
                "adapter_param_bytes": each[0] if len(set(each)) == 1 else float(np.mean(each)),
                "adapters_param_bytes_total": int(sum(each)),
                "measured_growth_kind": "cuda_allocated" if device.type == "cuda" else "cpu_rss",
                "measured_growth_per_adapter_bytes": (after - start) / added if after and start else None,
                "measured_growth_adapters": added,
            })
            by_n.append(entry)
            print(f"  N={n}: done ({time.perf_counter() - started:.0f} s)", flush=True)

    return {
        "schema": SCHEMA,
        "created_at": dt.datetime.now().isoformat(timespec="seconds"),
        "model": str(cfg.model.name), "model_kind": model_kind(cfg.model), "method": method.name,
        "rank": args.rank,
        "settings": {"n_adapters": ns, "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "new_tokens": args.new_tokens if b.causal else None, "iters": args.iters,
                     "gen_iters": args.gen_iters if b.causal else None, "rounds": args.rounds,
                     "swap_iters": args.swap_iters, "load_iters": args.load_iters, **b.warmup,
                     "noise_tol": b.noise_tol,
                     "num_labels": None if b.causal else args.num_labels, "device": str(device),
                     "precision": precision, "weight_dtype": dtype_name(weights),
                     "autocast_dtype": dtype_name(b.autocast) if b.autocast is not None else None,
                     "adapters": "random non-zero values (bench/tools/perf/adapters.py)"},
        "base_param_bytes": _param_bytes(base),
        "single_adapter": single,
        "by_n": by_n,
        "wall_s": time.perf_counter() - started,
        "provenance": {**provenance(), "device": device_name(device), "torch_threads": torch.get_num_threads(),
                       **lock_state()},
    }


# ---- tables (also what analysis/serving.py renders in the report) ----

def _f(x: Any, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def _ratio(block: dict[str, Any], name: str, ref: str = "base") -> str:
    value = block.get(f"{name}_over_{ref}_ratio")
    if value is None or not value > 0:  # a decode time at or below zero: noise larger than the decode itself
        return "n/a"
    return f"{value:.2f}" + ("?" if block.get(f"{name}_over_{ref}_too_noisy") else "")


NOTE = ("(x): time ratios paired by interleaved round (> 1: slower than the reference); '?': its rounds disagree by "
        "more than {tol:.0%}, too noisy to tell a few percent from noise. Mixed: each row through its own adapter in "
        "one call (adapter_names=); sorted: one call per adapter after set_adapter. Exact: the adapter's tensors; "
        "measured: memory growth per adapter loaded (noisy). docs/measurement.md#the-serving-benchmark")


def tables(rec: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The record as (title, header, rows) tables; a ratio marked `?` has rounds that disagree by more than
    2 x the noise tolerance (docs/measurement.md)."""
    causal = rec.get("model_kind") == "causal_lm"
    single, by_n = rec["single_adapter"], rec["by_n"]
    fwd = single["forward"]
    variants = [v for v in ("base", "unmerged", "merged") if v in fwd]
    out = []
    if causal:
        gen = single["generation"]
        rows = [[v, _f(fwd[v]["p50_ms"], 2), _f(fwd[v]["prefill_tokens_per_s"], 0),
                 _f(gen[v]["decode_ms_per_token"], 2), _f(gen[v]["decode_tokens_per_s"], 1),
                 "1.00" if v == "base" else _ratio(fwd, v), "1.00" if v == "base" else _ratio(gen, v)]
                for v in variants]
        out.append(("One adapter: base, unmerged, merged",
                    ["variant", "prefill p50 (ms)", "prefill (tokens/s)", "decode (ms/token)",
                     "decode (tokens/s)", "prefill time / base (x)", "decode time / base (x)"], rows))
    else:
        rows = [[v, _f(fwd[v]["p50_ms"], 2), _f(fwd[v]["p95_ms"], 2), _f(fwd[v]["rows_per_s"], 1),
                 "1.00" if v == "base" else _ratio(fwd, v)] for v in variants]
        out.append(("One adapter: base, unmerged, merged",
                    ["variant", "p50 (ms)", "p95 (ms)", "throughput (rows/s)", "time / base (x)"], rows))

    unit = "prefill tokens/s" if causal else "rows/s"
    key = "prefill_tokens_per_s" if causal else "rows_per_s"
    rows = [[str(e["n_adapters"]), str(e["adapters_in_batch"]), _f(e["forward"]["base"]["p50_ms"], 2),
             _f(e["forward"]["mixed"]["p50_ms"], 2), _f(e["forward"]["sorted"]["p50_ms"], 2),
             _f(e["forward"]["mixed"][key], 0 if causal else 1), _f(e["forward"]["sorted"][key], 0 if causal else 1),
             _ratio(e["forward"], "sorted", "mixed"), _ratio(e["forward"], "mixed"), _ratio(e["forward"], "sorted")]
            for e in by_n]
    what = "prefill (one forward over the prompt)" if causal else "forward"
    out.append((f"Mixed vs sorted batches, {what}, vs N adapters",
                ["N adapters", "adapters in batch", "base p50 (ms)", "mixed p50 (ms)", "sorted p50 (ms)",
                 f"mixed ({unit})", f"sorted ({unit})", "sorted / mixed time (x)", "mixed time / base (x)",
                 "sorted time / base (x)"], rows))
    if causal:
        rows = [[str(e["n_adapters"]), str(e["adapters_in_batch"]),
                 _f(e["generation"]["base"]["decode_tokens_per_s"], 1),
                 _f(e["generation"]["mixed"]["decode_tokens_per_s"], 1),
                 _f(e["generation"]["sorted"]["decode_tokens_per_s"], 1),
                 _ratio(e["generation"], "sorted", "mixed"), _ratio(e["generation"], "mixed"),
                 _ratio(e["generation"], "sorted")] for e in by_n]
        out.append(("Mixed vs sorted batches, decode (KV cache), vs N adapters",
                    ["N adapters", "adapters in batch", "base decode (tokens/s)", "mixed decode (tokens/s)",
                     "sorted decode (tokens/s)", "sorted / mixed time (x)", "mixed time / base (x)",
                     "sorted time / base (x)"], rows))

    growth_kind = by_n[0].get("measured_growth_kind", "cpu_rss") if by_n else "cpu_rss"
    growth_label = "RSS" if growth_kind == "cpu_rss" else "CUDA allocated"
    rows = [[str(e["n_adapters"]), _f(e["load_adapter_ms"]["p50_ms"], 1), _f(e["set_adapter_ms"]["p50_ms"], 3),
             _f(e["adapter_param_bytes"] / MIB, 3), _f(e["adapters_param_bytes_total"] / MIB, 2),
             _f(None if e["measured_growth_per_adapter_bytes"] is None
                else e["measured_growth_per_adapter_bytes"] / MIB, 2)] for e in by_n]
    out.append(("Hot-swap and memory vs N adapters",
                ["N adapters", "load_adapter p50 (ms)", "set_adapter p50 (ms)", "per adapter, exact (MiB)",
                 "all N adapters, exact (MiB)", f"{growth_label} growth per adapter, measured (MiB)"], rows))
    return out


def title(rec: dict[str, Any]) -> str:
    s = rec["settings"]
    shape = f"batch {s['batch_size']} x {s['seq_len']} tokens" + (
        f", {s['new_tokens']} new tokens" if s.get("new_tokens") else "")
    return (f"{rec['model']} + {rec['method']} r={rec['rank']}, {shape}, {s['precision']} on "
            f"{rec['provenance'].get('device', s['device'])}, {rec['provenance'].get('torch_threads')} threads")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
                      *("| " + " | ".join(r) + " |" for r in rows)])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a conf/model name (default tiny-bert); minilm (encoder) or smollm2 (causal LM)")
    ap.add_argument("--method", default="lora", help="a peft-format method that can mix adapters in a batch "
                                                     "(default lora; methods/hotswap.py)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--n-adapters", default="1,4,16,64", help="adapter counts, comma-separated (default 1,4,16,64)")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per batch (default 8)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per row; a causal LM's prompt (default 128)")
    ap.add_argument("--new-tokens", type=int, default=32, help="causal LMs: tokens decoded after the prompt "
                                                               "(default 32)")
    ap.add_argument("--iters", type=int, default=20, help="timed forward passes per variant (default 20)")
    ap.add_argument("--gen-iters", type=int, default=8, help="causal LMs: timed generations per variant and "
                                                             "length (default 8)")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds the passes are split into "
                                                          "(default 4)")
    ap.add_argument("--warmup-iters", type=int, help="least warm-up passes per variant (default: "
                                                     "measure.latency_warmup_iters)")
    ap.add_argument("--max-warmup-s", type=float, help="most warm-up seconds per variant (default: "
                                                       "measure.latency_max_warmup_s)")
    ap.add_argument("--swap-iters", type=int, default=100, help="timed set_adapter switches per N (default 100)")
    ap.add_argument("--load-iters", type=int, default=5, help="timed load_adapter calls per N (default 5)")
    ap.add_argument("--num-labels", type=int, default=2, help="encoders: classes of the task head (default 2)")
    ap.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1")
    ap.add_argument("--precision", default="auto", help="auto, fp32, bf16, bf16-mixed, fp16-mixed "
                                                        "(docs/measurement.md#precision)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (on a shared machine 1 gives steadier timings)")
    ap.add_argument("--quick", action="store_true", help="N = 1, 2, a small batch, few passes (tiny-bert unless "
                                                         "--model): a check that it runs")
    ap.add_argument("--out", help="JSON record (default results/perf/serving-<model>.json)")
    args = ap.parse_args(argv)
    args.model = args.model or "tiny-bert"
    hf_logging.set_verbosity_error()  # the load report ("classifier newly initialised") is expected here
    hf_logging.disable_progress_bar()
    if args.quick:
        args.n_adapters, args.batch_size, args.seq_len, args.new_tokens = "1,2", 4, 16, 4
        args.iters, args.gen_iters, args.rounds, args.swap_iters, args.load_iters = 4, 2, 2, 10, 2
        args.warmup_iters, args.max_warmup_s = 1, 0.5
    rec = run(args)
    out = Path(args.out or f"results/perf/serving-{rec['model']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1) + "\n")
    print(f"\nserving: {title(rec)}")
    for name, header, rows in tables(rec):
        print(f"\n{name}\n\n{markdown_table(header, rows)}")
    print(f"\n{NOTE.format(tol=2 * rec['settings']['noise_tol'])}\nRecord: {out}")
    return rec


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        raise SystemExit(f"error: {exc}") from None
