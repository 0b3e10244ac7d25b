"""The tuned protocol's table (`+protocol=tuned`, bench/orchestrate/protocol.py): per method, the lr chosen on
validation, the test metric over seeds with its 95% bootstrap interval, and the paired difference against a reference
method on the same test examples.

    python -m analysis.tuned results/runs [--reference lora] [--out tuned.md]

Runs are grouped by their tuning group (the identity without seed and lr: bench/record/identity.py). In a group, the
trials are the runs at the seed(s) every lr of the grid ran with; each lr's validation score is their mean of
`validation_main_metric_value`, and the choice is bench/record/selection.py's (the protocol's own rule). The test
figures are those of every ok run at the chosen lr. A group whose runs carry no validation score (run without a
validation split) is listed as not tuned. Intervals: analysis/intervals.py.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analysis.collect import load_records, method_label_of
from analysis.intervals import Interval, bootstrap, paired_difference
from bench.metrics import higher_is_better
from bench.record.identity import tuning_group
from bench.record.selection import at_edge, choose


@dataclass
class Tuned:
    """One method's result under the protocol."""
    method: str
    label: str
    task: str
    model: str
    metric: str
    lrs: list[float]
    selection_seeds: list[int]
    trials: list[dict]  # {lr, validation}
    chosen_lr: float | None
    edge: bool
    finals: list[dict]  # the ok records at the chosen lr
    test: Interval | None = None
    versus: tuple[Interval, float] | None = None  # (paired difference vs the reference, one-sided p)


def _groups(records: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        if rec.get("status") == "ok" and isinstance(rec.get("effective_config"), dict):
            groups[tuning_group(rec["effective_config"])].append(rec)
    return groups


def select(runs: list[dict]) -> Tuned | None:
    """The protocol's choice for one tuning group, recomputed from its records; None when no run has a validation
    score."""
    scored = [r for r in runs if r.get("validation_main_metric_value") is not None]
    if not scored:
        return None
    first = scored[0]
    metric = str(first["main_metric"])
    seeds_by_lr: dict[float, set[int]] = defaultdict(set)
    for r in scored:
        seeds_by_lr[float(r["lr"])].add(int(r["seed"]))
    common = sorted(set.intersection(*seeds_by_lr.values()))
    lrs = sorted(seeds_by_lr)
    trials = []
    for lr in lrs:
        values = [r["validation_main_metric_value"] for r in scored if float(r["lr"]) == lr and r["seed"] in common]
        trials.append({"lr": lr, "validation": float(np.mean(values)) if values else None})
    best = choose(trials, higher_is_better(metric)) if common else None
    chosen = best["lr"] if best else None
    finals = sorted((r for r in runs if chosen is not None and float(r["lr"]) == chosen), key=lambda r: r["seed"])
    label = method_label_of(first) + (f", r={first['rank']}" if first.get("rank") is not None else "")
    eff = first.get("effective_config") or {}
    targets = (eff.get("method") or {}).get("target_modules")
    if isinstance(targets, list) and targets != (eff.get("model") or {}).get("lora_targets"):
        label += f", on {'/'.join(map(str, targets))}"  # not the model's default targets (a target-modules study)
    return Tuned(str(first["method"]), label, str(first["task"]), str(first["model"]), metric, lrs,
                 common, trials, chosen, chosen is not None and at_edge(chosen, lrs), finals)


def chosen_only(records: list[dict]) -> tuple[list[dict], int]:
    """(the records without the lr trials a tuning protocol did not choose, how many were left out): where a tuning
    group ran several lrs with validation scores, only the chosen lr's runs stay, so tables and claims compare each
    method at its chosen lr instead of pooling its trials. Other records (one lr, no validation, not ok) stay."""
    dropped: set[int] = set()
    for runs in _groups(records).values():
        t = select(runs)
        if t is not None and len(t.lrs) > 1 and t.chosen_lr is not None:
            dropped |= {id(r) for r in runs if float(r["lr"]) != t.chosen_lr}
    return [r for r in records if id(r) not in dropped], len(dropped)


def _outcomes(t: Tuned) -> list[dict]:
    return [r["dev_predictions"] for r in t.finals if r.get("dev_predictions")]


def tuned_results(records: list[dict], reference: str | None = "lora", n_boot: int = 2000) -> list[Tuned]:
    """Every tuning group's result, with test intervals and paired differences against `reference` (same task and
    model)."""
    results = [t for t in (select(runs) for runs in _groups(records).values()) if t is not None]
    for t in results:
        if _outcomes(t):
            t.test = bootstrap(_outcomes(t), t.metric, n_boot=n_boot)
    for t in results:
        ref = next((r for r in results if r.method == reference and (r.task, r.model) == (t.task, t.model)), None)
        if ref is not None and ref is not t and _outcomes(t) and _outcomes(ref):
            try:
                t.versus = paired_difference(_outcomes(t), _outcomes(ref), t.metric, n_boot=n_boot)
            except ValueError:
                t.versus = None  # different test examples: no pairing
    return sorted(results, key=lambda t: (t.task, t.model, -(t.test.estimate if t.test else -math.inf)))


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def table(results: list[Tuned], reference: str | None) -> str:
    ref, metric = reference or "reference", results[0].metric if results else ""
    lines = [f"| task | model | method | lr trials (validation {metric}) | chosen lr | test {metric} (95% CI) | seeds "
             f"| vs {ref} (95% CI, p) | trainable excl. head | peak train memory (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in results:
        trials = ", ".join(_trial(x) for x in t.trials)
        chosen = "-" if t.chosen_lr is None else f"{t.chosen_lr:g}" + (" (edge)" if t.edge else "")
        test = t.test.text() if t.test else "-"
        versus = "-" if t.versus is None else f"{t.versus[0].text(digits=1)}, p={t.versus[1]:.3f}"
        first = t.finals[0] if t.finals else {}
        lines.append(f"| {t.task} | {t.model} | {t.label} | {trials} | {chosen} | {test} | "
                     f"{len(t.finals)} | {versus} | {first.get('trainable_params_excl_head', '-')} | "
                     f"{_mib(first.get('peak_memory_bytes'))} |")
    return "\n".join(lines)


def _trial(x: dict) -> str:
    return f"{x['lr']:g}: " + ("-" if x["validation"] is None else f"{100 * x['validation']:.1f}")


def lr_ratio(results: list[Tuned], a: str = "lora", b: str = "full") -> list[str]:
    """'LoRA's chosen lr / full fine-tuning's' per task and model, where both were tuned."""
    out = []
    for t in results:
        if t.method != a or t.chosen_lr is None:
            continue
        other = next((r for r in results if r.method == b and (r.task, r.model) == (t.task, t.model)), None)
        if other is not None and other.chosen_lr:
            out.append(f"{t.task}/{t.model}: {a} lr {t.chosen_lr:g} / {b} lr {other.chosen_lr:g} = "
                       f"{t.chosen_lr / other.chosen_lr:.3g}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="a results folder (records of a +protocol=tuned sweep)")
    ap.add_argument("--reference", default="lora", help="the method paired differences are against")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap replicates")
    ap.add_argument("--out", help="also write the Markdown here")
    args = ap.parse_args(argv)
    if not Path(args.root).exists():
        print(f"error: {args.root}: no such folder", file=sys.stderr)
        return 2
    records, problems = load_records(args.root)
    for line in problems:
        print(f"warning: {line}", file=sys.stderr)
    results = tuned_results(records, args.reference, args.boot)
    if not results:
        print(f"error: no run in {args.root} has a validation score: run the sweep with +protocol=tuned "
              "(or budget.validation_rows > 0)", file=sys.stderr)
        return 2
    text = [table(results, args.reference), ""]
    text += [f"- {line}" for line in lr_ratio(results)]
    edge = [t.method for t in results if t.edge]
    if edge:
        text.append(f"- chosen at the grid's edge (the best lr may lie outside it): {', '.join(edge)}")
    text.append(f"- intervals: {args.boot} bootstrap replicates over test examples and seeds (analysis/intervals.py); "
                "selection on validation only")
    report = "\n".join(text)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
