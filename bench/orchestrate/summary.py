"""Console output of a run: a short summary at its end, read from its record."""
from __future__ import annotations

from pathlib import Path

from bench.record import OK


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _ratio(lat: dict, name: str) -> str:
    """`name/base 1.02 (rounds 0.99-1.04)`, flagged when the rounds disagree."""
    low, high = lat[f"{name}_over_base_lowest_round_ratio"], lat[f"{name}_over_base_highest_round_ratio"]
    text = f"{name}/base {lat[f'{name}_over_base_ratio']:.2f} (rounds {low:.2f}-{high:.2f})"
    return text + (" TOO NOISY TO TELL" if lat[f"{name}_over_base_too_noisy"] else "")


def print_summary(rec: dict, path: Path) -> None:
    """The few lines a run prints at its end: metric, parameters, memory, time, latency, where the record is."""
    if rec["status"] != OK:
        print(f"FAILED {rec['run_id']} status={rec['status']}: {rec.get('error')}\n  record: {path}")
        return
    mem = rec["memory"].get("train", {})
    peak = mem.get("peak_allocated_bytes", mem.get("peak_rss_bytes"))
    peak_label = "peak CUDA allocated" if mem.get("kind") == "cuda" else "peak RSS (process)"
    lat = rec.get("latency", {})
    lines = [
        f"run {rec['run_id']}  status=ok",
        f"  {rec['main_metric']} = {rec['main_metric_value']:.4f}   eval_loss = {rec['metrics']['eval_loss']:.4f}"
        + (f"   ({rec['model_note']})" if rec.get("model_note") else ""),
        f"  trainable params {rec['trainable_params']:,} ({rec['trainable_params_excl_head']:,} excl. head) "
        f"of {rec['total_params']:,}",
        f"  train {rec['train']['steps']} steps in {rec['train']['wall_s']:.1f} s, "
        f"{rec['train_samples_per_s']:.1f} samples/s{_mfu_text(rec)}; {peak_label} during training "
        f"{_fmt_bytes(peak)}",
    ]
    ev = rec.get("generation_eval")
    if ev:  # a generation task: accuracy's interval, answers without a number, decoding speed, the answers' file
        low, high = ev["accuracy_ci95"]
        lines.append(f"  {ev['correct']}/{ev['examples']} answers right (95% interval {low:.3f}-{high:.3f}), "
                     f"no number in {rec['metrics']['no_answer_fraction']:.0%}; {ev['mean_generated_tokens']:.0f} "
                     f"tokens per answer, {ev['generated_tokens_per_s']:.1f} generated tokens/s; {ev['samples_file']}")
    if "zero_shot_main_metric_value" in rec:  # a causal LM: the pre-trained model on the same evaluation
        loss = (f", eval_loss = {rec['zero_shot_metrics']['eval_loss']:.4f}" if ev else "")
        lines.append(f"  zero-shot (before training) {rec['main_metric']} = {rec['zero_shot_main_metric_value']:.4f}"
                     + loss)
    if rec.get("few_shot_metrics"):
        shots = rec["data"]["prompt"]["shots"]
        lines.append(f"  {shots}-shot (before training) {rec['main_metric']} = "
                     f"{rec['few_shot_metrics'][rec['main_metric']]:.4f}")
    if rec.get("forgetting"):
        f = rec["forgetting"]
        lines.append(f"  forgetting ({f['metric']}): before {f['before']:.4g}, after {f['after']:.4g}, "
                     f"lost {f['forgetting']:.4g}")
    if rec.get("rank_metrics"):  # one training run evaluated at several ranks (DyLoRA)
        at = ", ".join(f"r={r} {m[rec['main_metric']]:.4f}" for r, m in rec["rank_metrics"].items())
        lines.append(f"  {rec['main_metric']} at each evaluated rank: {at}")
    if "base" in lat:
        line = f"  latency p50 (batch {lat['batch_size']}x{lat['seq_len']}): base {lat['base']['p50_ms']:.1f} ms"
        line += f", unmerged {lat['unmerged']['p50_ms']:.1f} ms"
        if "merged" in lat:
            diff = rec["merged_max_abs_logit_diff"]
            line += f", merged {lat['merged']['p50_ms']:.1f} ms (max |logit diff| {diff:.1e})"
        ratios = [_ratio(lat, name) for name in ("unmerged", "merged") if name in lat]
        lines += [line, f"  latency vs base, per interleaved round (median): {', '.join(ratios)}"]
    gen = rec.get("generation") or {}
    if "base" in gen:  # a causal LM's KV-cache generation
        speeds = ", ".join(f"{name} {gen[name]['prefill_ms']:.1f} ms / {gen[name]['decode_tokens_per_s']:.1f} tok/s"
                           for name in ("base", "unmerged", "merged")
                           if name in gen and gen[name]["decode_tokens_per_s"])
        lines.append(f"  generation (batch {gen['batch_size']}, prompt {gen['prompt_len']}, {gen['new_tokens']} new "
                     f"tokens) prefill / decode: {speeds}")
    for flag in rec.get("gpu_start", {}).get("flags", []):
        lines.append(f"  WARNING (GPU at run start): {flag}")
    if "adapter_bytes" in rec:
        lines.append(f"  stored weights {_fmt_bytes(rec['adapter_bytes'])} "
                     f"vs full model {_fmt_bytes(rec['full_model_bytes'])}")
    lines.append(f"  record: {path}")
    print("\n".join(lines))


def _mfu_text(rec: dict) -> str:
    """", MFU 41.2% of NVIDIA's bf16 datasheet peak" or ", MFU 1.1% of a measured fp32 peak" (the record's
    `train_flops`); empty when the run has none."""
    block = rec.get("train_flops") or {}
    if block.get("mfu_ratio") is None:
        return ""
    source = "NVIDIA's datasheet" if block["peak_source"] == "datasheet" else "a measured"
    return f", MFU {block['mfu_ratio']:.2%} of {source} {block['compute_dtype']} peak"
