"""Training-memory estimator: full fine-tuning vs LoRA vs QLoRA, from a model config, a parameter count or a
named preset, and estimate vs measured for CUDA run records.

    python -m analysis.memory --model minilm --batch-size 32 --seq-len 128 --rank 8
    python -m analysis.memory --model 7b --batch-size 1 --seq-len 2048 --precision bf16 --grad-checkpointing
    python -m analysis.memory --params 3e9 --plot memory.png --gpu h100-80gb
    python -m analysis.memory --records results/runs          # estimate vs measured peak for CUDA runs
    python -m analysis.memory --model 8b --batch-size 1 --seq-len 2048 --grad-checkpointing \
        --strategy none,ddp,fsdp --gpus 1,2,8                     # per GPU: one run over several GPUs

The estimator's arithmetic (what is counted and how) is bench/tools/memory_estimate.py; this module is its
command line, the peak-vs-size plot and the estimate vs measured comparison over run records.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from typing import Any

from bench.record import load_records
from bench.tools.memory_estimate import (
    GIB,
    GPUS_GIB,
    METHODS,
    OPTIMIZER_IMPLS,
    OPTIMIZERS,
    PRECISIONS,
    PRESETS,
    STRATEGIES,
    Arch,
    Setting,
    arch_from_config,
    arch_from_model_conf,
    estimate,
    fsdp_unit_bytes,
    llama_like,
    lora_targets,
    lora_trainable,
    record_estimate,
    record_precision,
    resolve_arch,
    training_state_bytes,
)

__all__ = ["GIB", "GPUS_GIB", "METHODS", "OPTIMIZER_IMPLS", "OPTIMIZERS", "PRECISIONS", "PRESETS", "STRATEGIES",
           "Arch", "Setting", "arch_from_config", "arch_from_model_conf", "estimate", "fsdp_unit_bytes", "llama_like",
           "lora_targets", "lora_trainable", "record_precision", "resolve_arch", "training_state_bytes",
           "format_table", "format_per_gpu", "distributed_settings", "plot", "compare_records", "main"]

# ---------------------------------------------------------------- output

ROWS = ("total_params", "trainable_params", "weights_bytes", "master_weights_bytes", "gradients_bytes",
        "optimizer_bytes", "autocast_weight_copies_bytes", "activations_bytes", "backward_working_bytes",
        "optimizer_step_working_bytes", "peak_bytes", "sum_of_parts_bytes")


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per component, bytes and GiB per method."""
    methods = list(results)
    head = "| component | " + " | ".join(f"{m} bytes | {m} GiB" for m in methods) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(methods))]
    for row in ROWS:
        cells = []
        for m in methods:
            v = results[m][row]
            if row.endswith("_params"):
                cells += [f"{int(v):,}", ""]
            else:
                cells += [f"{int(round(v)):,}", f"{v / GIB:.3f}"]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PER_GPU_ROWS = ("weights_bytes", "master_weights_bytes", "gradients_bytes", "optimizer_bytes", "ddp_buckets_bytes",
                "fsdp_gathered_params_bytes", "fsdp_unsharded_grads_bytes", "autocast_weight_copies_bytes",
                "activations_bytes", "backward_working_bytes", "optimizer_step_working_bytes", "peak_bytes")


def distributed_settings(strategies: Iterable[str], gpus: Iterable[int]) -> list[tuple[str, int]]:
    """(strategy, N) pairs to estimate: each strategy at each N, `none` only at N = 1 (one process, one GPU)."""
    pairs = []
    for strategy in strategies:
        for n in ([1] if strategy == "none" else gpus):
            if (strategy, n) not in pairs:
                pairs.append((strategy, n))
    return pairs


def _label(strategy: str, n: int, reshard: bool) -> str:
    return "none" if strategy == "none" else f"{strategy} x{n}" + ("" if reshard or strategy != "fsdp" else " keep")


def format_per_gpu(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: for each method a table of components (rows) x strategy and GPU count (columns), GiB per GPU; then
    the peaks of every method in one table."""
    blocks = []
    for method, by_label in results.items():
        labels = list(by_label)
        lines = [f"{method} (GiB per GPU)", "", "| component | " + " | ".join(labels) + " |",
                 "|" + "---|" * (1 + len(labels))]
        for row in PER_GPU_ROWS:
            lines.append(f"| {row.removesuffix('_bytes')} | "
                         + " | ".join(f"{by_label[label][row] / GIB:.2f}" for label in labels) + " |")
        blocks.append("\n".join(lines))
    labels = list(next(iter(results.values())))
    lines = ["peak per GPU (GiB)", "", "| method | " + " | ".join(labels) + " |", "|" + "---|" * (1 + len(labels))]
    for method, by_label in results.items():
        lines.append(f"| {method} | " + " | ".join(f"{by_label[label]['peak_bytes'] / GIB:.1f}" for label in labels)
                     + " |")
    blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _choices(text: str, flag: str, allowed: Iterable[str]) -> list[str]:
    values, allowed = [v.strip() for v in text.split(",")], list(allowed)
    bad = [v for v in values if v not in allowed]
    if bad:
        raise SystemExit(f"error: {flag} {bad[0]!r}: choose from {', '.join(allowed)}")
    return values


def _gpu_counts(text: str) -> list[int]:
    try:
        counts = [int(v) for v in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise SystemExit(f"error: --gpus {text!r}: GPU counts are whole numbers, at least 1 (e.g. 1,2,8)")
    return counts


def plot(path: str, setting: Setting, gpu: str, sizes: Iterable[float]) -> None:
    """Estimated peak vs model size (Llama-shaped models) for full, LoRA and QLoRA, with the GPU's memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    rows = []
    for n in sizes:
        arch = llama_like(params=n)
        for m in METHODS:
            st = Setting(**{**setting.__dict__, "method": m, "targets": ("q_proj", "v_proj")})
            rows.append({"parameters": arch.params, "method": m, "peak GiB": estimate(arch, st)["peak_bytes"] / GIB})
    df = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sns.lineplot(df, x="parameters", y="peak GiB", hue="method", marker="o", ax=ax)
    ax.axhline(GPUS_GIB[gpu], color="black", linestyle="--", label=f"{gpu} ({GPUS_GIB[gpu]} GiB)")
    ax.set(xscale="log", yscale="log", xlabel="model parameters (Llama-shaped)",
           ylabel="estimated training peak (GiB)",
           title=f"batch {setting.batch} x {setting.seq} tokens, {setting.precision}, LoRA r={setting.rank} on q,v"
                 + (", grad. checkpointing" if setting.grad_checkpointing else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)



def compare_records(root: str, methods: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Estimate vs measured training peak for each ok record under `root` (measured on CUDA only)."""
    records, problems = load_records(root)
    for line in problems:
        print(f"warning: {line}")
    return [record_estimate(rec) for rec in records
            if rec.get("status") == "ok" and rec.get("method") in METHODS
            and not (methods and rec["method"] not in methods)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="conf/model name, folder, config.json, preset (7b, 13b, 70b: Llama-2; 8b, "
                                    "llama3-70b: Llama-3) or cached Hub id")
    ap.add_argument("--params", type=float, help="a parameter count instead (Llama-shaped fit), e.g. 7e9")
    ap.add_argument("--method", default="full,lora,qlora", help="comma-separated subset of full,lora,qlora")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", help="LoRA target modules, comma-separated (default: the model's lora_targets, "
                                      "q_proj,v_proj for Llama shapes)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--precision", choices=PRECISIONS, default="bf16",
                    help="the run's precision (bench/model/precision.py): bf16 (bf16 frozen weights, fp32 adapters "
                         "and head, full fine-tuning pure bf16: this suite's default on CUDA); bf16-mixed / "
                         "fp16-mixed (autocast over fp32 weights); fp32 (this suite on CPU); bf16-master: 16-bit "
                         "weights + fp32 master copies (not a mode of this suite)")
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw")
    ap.add_argument("--optimizer-impl", choices=OPTIMIZER_IMPLS, default="fused",
                    help="torch AdamW implementation: fused (this suite on CUDA), foreach (torch's CUDA default), "
                         "single_tensor (torch's CPU default, this suite on CPU)")
    ap.add_argument("--attention", choices=("fused", "materialised"), default=None,
                    help="fused (SDPA flash/memory-efficient, CUDA) or materialised scores (eager, CPU fp32); "
                         "default: materialised for fp32, fused otherwise")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--no-double-quant", action="store_true")
    ap.add_argument("--strategy", default="none",
                    help="comma-separated subset of none,ddp,fsdp: what each GPU holds when one run spans --gpus "
                         "GPUs (conf/distributed/); --batch-size is then each GPU's micro-batch")
    ap.add_argument("--gpus", default="1", help="comma-separated GPU counts, e.g. 1,2,8 (none: 1 only)")
    ap.add_argument("--no-reshard-after-forward", action="store_true",
                    help="fsdp: keep each block's gathered parameters from its forward to its backward (ZeRO-2-like)")
    ap.add_argument("--gradient-as-bucket-view", action="store_true",
                    help="ddp: gradients as views into DDP's buckets (torch default False: the buckets are a copy)")
    ap.add_argument("--json", action="store_true", help="print the estimates as JSON")
    ap.add_argument("--plot", help="write a PNG of estimated peak vs model size (full, LoRA, QLoRA)")
    ap.add_argument("--gpu", choices=sorted(GPUS_GIB), default="h100-80gb", help="GPU memory line in the plot")
    ap.add_argument("--plot-sizes", default="1.25e8,3.5e8,1e9,3e9,7e9,1.3e10,3.4e10,7e10")
    ap.add_argument("--records", help="a results folder: estimate vs measured peak for its CUDA runs")
    args = ap.parse_args(argv)

    if args.records:
        rows = compare_records(args.records, args.method.split(",") if args.method != "full,lora,qlora" else None)
        if not rows:
            raise SystemExit(f"no ok full/lora/qlora records under {args.records}")
        print("| run | method | params | batch x seq | estimate GiB | measured GiB (CUDA peak allocated) | "
              "estimate / measured |\n|---|---|---|---|---|---|---|")
        for r in rows:
            meas = f"{r['measured_bytes'] / GIB:.3f}" if "measured_bytes" in r else f"n/a ({r['kind']}: not comparable)"
            ratio = f"{r['estimate_over_measured_ratio']:.2f}" if "measured_bytes" in r else ""
            print(f"| {r['run_id']} | {r['method']} | {r['params']:,} | {r['batch']} x {r['seq']} | "
                  f"{r['estimate_bytes'] / GIB:.3f} | {meas} | {ratio} |")
        return

    strategies = _choices(args.strategy, "--strategy", STRATEGIES)
    gpus = _gpu_counts(args.gpus)
    if strategies == ["none"] and gpus != [1]:
        raise SystemExit(f"error: --gpus {args.gpus}: strategy none is one process on one GPU; "
                         "add --strategy ddp or fsdp")
    methods = _choices(args.method, "--method", METHODS)
    arch = resolve_arch(args.model, args.params)
    if args.targets:
        targets = tuple(args.targets.split(","))
    elif arch.causal_lm:
        targets = ("q_proj", "v_proj")
    else:
        targets = ("query", "value")
    fused = args.attention == "fused" if args.attention else args.precision != "fp32"
    base = Setting(method="full", rank=args.rank, targets=targets, batch=args.batch_size, seq=args.seq_len,
                   precision=args.precision, optimizer=args.optimizer, optimizer_impl=args.optimizer_impl,
                   fused_attention=fused,
                   grad_checkpointing=args.grad_checkpointing, double_quant=not args.no_double_quant)
    reshard = not args.no_reshard_after_forward
    pairs = distributed_settings(strategies, gpus)
    if pairs != [("none", 1)]:
        per_gpu = {m: {_label(st, n, reshard): estimate(arch, Setting(**{
            **base.__dict__, "method": m, "strategy": st, "gpus": n, "reshard_after_forward": reshard,
            "gradient_as_bucket_view": args.gradient_as_bucket_view})) for st, n in pairs} for m in methods}
        if args.json:
            print(json.dumps({"model": arch.name, "setting": base.__dict__, "per_gpu": per_gpu}, indent=1))
            return
        print(f"{arch.name}: {arch.params:,} parameters, {arch.layers} layers, hidden {arch.hidden}; per GPU: "
              f"micro-batch {args.batch_size} x {args.seq_len} tokens; {args.precision}; {args.optimizer}; "
              f"LoRA r={args.rank} on {','.join(targets)}"
              + ("; gradient checkpointing" if args.grad_checkpointing else "")
              + ("; fsdp keeps gathered blocks for the backward pass (reshard_after_forward=False)" if not reshard
                 else "") + ("; ddp gradient_as_bucket_view" if args.gradient_as_bucket_view else ""))
        print(format_per_gpu(per_gpu))
        print("ddp: a full replica + its gradient buckets (one copy of the trainable gradients); fsdp: parameters, "
              "gradients and optimiser states / N + the root's and two blocks' gathered parameters; activations "
              "are per GPU. Not counted: CUDA context, NCCL buffers, allocator fragmentation")
        return
    results = {m: estimate(arch, Setting(**{**base.__dict__, "method": m})) for m in methods}
    if args.json:
        print(json.dumps({"model": arch.name, "setting": base.__dict__, "estimates": results}, indent=1))
    else:
        print(f"{arch.name}: {arch.params:,} parameters, {arch.layers} layers, hidden {arch.hidden}; "
              f"batch {args.batch_size} x {args.seq_len} tokens; {args.precision}; {args.optimizer}; "
              f"LoRA r={args.rank} on {','.join(targets)}; attention {'fused' if fused else 'materialised'}"
              + ("; gradient checkpointing" if args.grad_checkpointing else ""))
        print(format_table(results))
        print("peak = weights + master + optimizer + max(activations + autocast copies, gradients) + backward "
              "working; not counted: CUDA context, cuBLAS workspace, allocator fragmentation")
    if args.plot:
        plot(args.plot, base, args.gpu, [float(x) for x in args.plot_sizes.split(",")])
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
