"""Our generation runs beside a published table of experiments: one row per experiment, several measures on one
task, one run each. The table of this layout (`layout: experiments`) is peft's own method comparison, MetaMathQA ->
GSM8K on Llama-3.2-3B (`analysis/published/peft_metamathqa.yaml`):

    python -m analysis.reproduce results/peft_metamathqa --table peft-metamathqa

Per (model, task, budget) group of ok generation runs (`analysis.collect.task_kind_of`), and per published experiment
whose method the group ran (`rows[].method`, a registry name; `assign`: each of our configurations stands for the
nearest experiment of its method, by rank and then learning rate, and a rank or learning rate that is not the
experiment's is named in the deviations; among several configurations for one experiment the most accurate counts):

- accuracy: ours (the mean over seeds; one run: its own) x 100 with its 95% interval (one run: the Wilson interval
  of the record's `generation_eval`; several: the t-interval of the mean over seeds), theirs (correct / 1,319), the
  difference and the 95% interval of the difference (both accuracies' standard errors combined; theirs binomial,
  ours from one run's Wilson interval or from the spread over seeds). Verdict: `reproduced` when |difference| <=
  max(`tolerance_points`, that half-width), else `not reproduced (below)` / `(above)`; `not the same setup` when
  the group's model, task, optimiser steps, batch size or number of test questions is not theirs: the figures are
  shown, not judged.
- forgetting, train time, training tokens/s, peak memory, checkpoint size and trainable parameters: ours beside
  theirs with the difference or ratio and what makes them (in)comparable (another probe, another statistic, other
  hardware); no verdict.
- the deviations from their protocol the records show (model, data, steps, batch, test questions, lengths,
  precision, schedule, learning rates, prompt, loss, forgetting probe, hardware and versions, and what our shared
  loop does differently).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.tables import (
    DASH,
    MEASURED_MARK,
    TASK_LABEL,
    Table,
    fmt_mfu,
    fmt_params,
    is_generation,
    method_label,
    ok_frame,
    t_interval,
)

LAYOUT = "experiments"
Z95 = 1.959963984540054  # the normal distribution's 97.5% point
REPRODUCED = "reproduced"
NOT_SAME_SETUP = "not the same setup"
NOT_RUN = "not run"
GiB = 2**30
LORA_FAMILY = ("lora", "dora", "rslora")
# what our shared loop does differently from peft's run.py whatever the configuration (conf/sweep/peft_metamathqa.yaml)
LOOP_DIFFERENCES = (
    "shared loop: training rows are shuffled (peft keeps MetaMathQA's stored order in length-sorted chunks of 80); no "
    "50-question validation curve; the final evaluation decodes greedily with left padding and stops at the "
    "end-of-sequence token, as theirs")


@dataclass(frozen=True)
class Experiment:
    """One published experiment (a result file) and its figures."""
    experiment: str
    label: str
    file: str
    method: str | None
    rank: int | None
    settings: str
    lr: float
    weight_decay: float
    correct: int
    accuracy: float
    forgetting: float
    train_time_s: float
    step_time_s: float
    memory_max_bytes: int
    file_size_bytes: int
    trainable_params: int
    environment: dict = field(default_factory=dict)
    date: str = ""
    checked: bool = False
    checked_against: tuple[str, ...] = ()


@dataclass(frozen=True)
class PublishedExperiments:
    id: str
    version: int
    title: str
    source: dict
    checked: dict
    model: str
    model_hub_id: str
    task: str
    test_examples: int
    train_total_tokens: int
    tolerance_points: float
    measures: dict
    protocol: dict
    environment: dict
    notes: tuple[str, ...]
    rows: tuple[Experiment, ...]
    path: Path

    @property
    def tasks(self) -> list[str]:
        return [self.task]

    def source_line(self) -> str:
        s = self.source
        return f"{s.get('repository', '')} at commit {str(s.get('commit', ''))[:12]}, {s.get('folder', '')}: " \
               f"{s.get('files', '')}"

    def row(self, label: str) -> Experiment:
        return next(r for r in self.rows if r.label == label)


def from_yaml(data: dict, path: Path) -> PublishedExperiments:
    """The published table of `layout: experiments` in `data` (read from `path`)."""
    rows = tuple(
        Experiment(
            experiment=r["experiment"], label=r["label"], file=r["file"], method=r.get("method"), rank=r.get("rank"),
            settings=str(r.get("settings", "")), lr=float(r["lr"]), weight_decay=float(r["weight_decay"]),
            correct=int(r["correct"]), accuracy=float(r["accuracy"]), forgetting=float(r["forgetting"]),
            train_time_s=float(r["train_time_s"]), step_time_s=float(r["step_time_s"]),
            memory_max_bytes=int(r["memory_max_bytes"]), file_size_bytes=int(r["file_size_bytes"]),
            trainable_params=int(r["trainable_params"]), environment=dict(r.get("environment") or {}),
            date=str(r.get("date", "")), checked=bool(r.get("checked")),
            checked_against=tuple(r.get("checked_against") or ()),
        )
        for r in data["rows"]
    )
    return PublishedExperiments(
        id=str(data["id"]), version=int(data.get("version", 1)), title=data["title"], source=data.get("source", {}),
        checked=data.get("checked", {}), model=data["model"], model_hub_id=str(data.get("model_hub_id", "")),
        task=data["task"], test_examples=int(data["test_examples"]),
        train_total_tokens=int(data.get("train_total_tokens", 0)),
        tolerance_points=float(data.get("tolerance_points", 0.0)), measures=data.get("measures", {}),
        protocol=data.get("protocol", {}), environment=data.get("environment", {}),
        notes=tuple(data.get("notes") or ()), rows=rows, path=path,
    )


def _col(part: pd.DataFrame, name: str) -> pd.Series:
    return pd.to_numeric(part[name], errors="coerce") if name in part.columns else pd.Series(np.nan, index=part.index)


def _first(part: pd.DataFrame, name: str):
    """The column's first non-null value, or None."""
    if name not in part.columns:
        return None
    values = part[name].dropna()
    return values.iloc[0] if len(values) else None


def _distance(row: Experiment, rank: float, lr: float) -> tuple[float, float]:
    """How far our configuration (rank, lr) is from experiment `row`: rank on a log2 scale (0 where either has none),
    then lr on a log10 scale."""
    d_rank = abs(math.log2(rank) - math.log2(row.rank)) if row.rank is not None and rank > 0 else 0.0
    d_lr = abs(math.log10(lr) - math.log10(row.lr)) if lr > 0 else math.inf
    return d_rank, d_lr


def assign(part: pd.DataFrame, pub: PublishedExperiments, notes: dict[str, str]) -> dict[str, pd.DataFrame]:
    """{experiment label: our runs that stand for it}. Each of our configurations (method, rank, lr) stands for the
    nearest experiment of its method (`_distance`: the same rank first, then the nearest learning rate), so one run
    is never laid beside two experiments; among several configurations for one experiment the most accurate counts.
    Where the rank or learning rate is not the experiment's, `notes` says so."""
    out: dict[str, pd.DataFrame] = {}
    for (method, rank, lr), runs in part.groupby(["method", "rank_key", "lr"], dropna=False, sort=True):
        rows = [r for r in pub.rows if r.method == method]
        if not rows:
            continue
        lr = float(lr) if pd.notna(lr) else math.nan
        row = min(rows, key=lambda r: _distance(r, float(rank), lr))
        if row.rank is not None and rank > 0 and rank != row.rank:
            have = sorted(int(k) for k in part.loc[part["method"] == method, "rank_key"].unique() if k > 0)
            notes[f"rank:{row.label}:{int(rank)}"] = (
                f"rank: {row.label} is compared with our r={int(rank)} (no r={row.rank} run; ranks run: "
                f"{', '.join(map(str, have))})")
        out[row.label] = pd.concat([out[row.label], runs]) if row.label in out else runs
    for label, runs in list(out.items()):
        groups = list(runs.groupby("config_group", dropna=False)) if "config_group" in runs else [(None, runs)]
        if len(groups) > 1:
            _, best = max(groups, key=lambda kv: kv[1]["metric_pct"].mean())
            configs = ", ".join(sorted({f"r={int(k)} lr={v:g}" if k > 0 else f"lr={v:g}"
                                        for _, g in groups for k, v in zip(g["rank_key"], g["lr"])}))
            notes[f"configs:{label}"] = (f"configurations: {label}: {len(groups)} of ours ran ({configs}); the most "
                                         f"accurate counts ({best['method_label'].iloc[0]}, lr {best['lr'].iloc[0]:g})")
            out[label] = best
    return out


def _accuracy(runs: pd.DataFrame) -> dict:
    """Our accuracy (x 100), its 95% interval and standard error, questions and runs."""
    values = runs["metric_pct"].dropna().to_numpy(float)
    examples = _col(runs, "generation_eval.examples")
    n_runs = len(values)
    ours = float(values.mean()) if n_runs else math.nan
    lo = hi = se = math.nan
    if n_runs == 1:  # the Wilson interval over its questions; its half-width as a standard error
        ci = _first(runs, "generation_eval.accuracy_ci95")
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci:
            lo, hi = float(ci[0]) * 100, float(ci[1]) * 100
            se = (hi - lo) / (2 * Z95) if hi > lo else math.nan
    elif n_runs > 1:  # the spread over seeds
        lo, hi = t_interval(values)
        lo, hi = max(lo, 0.0), min(hi, 100.0)
        se = float(np.std(values, ddof=1) / math.sqrt(n_runs)) or math.nan
    total = examples.sum()
    if not np.isfinite(se) and total > 0:  # no interval, or a degenerate one: the binomial SE over all questions
        p = ours / 100
        se = math.sqrt(max(p * (1 - p), 1 / total) / total) * 100
    return {"ours": ours, "ci_low": lo, "ci_high": hi, "se": se, "runs": n_runs,
            "examples": int(examples.median()) if examples.notna().any() else None,
            "correct": int(_col(runs, "generation_eval.correct").sum()) if n_runs == 1 else None}


def _ours_memory(runs: pd.DataFrame) -> tuple[float, str]:
    """Our peak memory (median over runs) as comparable with peft's as the records allow: CUDA reserved memory, the
    largest over the record's phases, over the reserved memory at run start; on CPU the process's peak RSS."""
    reserved = [c for c in runs.columns if c.startswith("memory.") and c.endswith(".peak_reserved_bytes")]
    if reserved and runs[reserved].notna().any().any():
        peak = runs[reserved].apply(pd.to_numeric, errors="coerce").max(axis=1)
        start = _col(runs, "gpu_start.start_reserved_bytes").fillna(0)
        return float((peak - start).median()), "cuda_reserved"
    rss = _col(runs, "peak_memory_bytes")
    kind = _first(runs, "peak_memory_kind") or "cpu_rss"
    return float(rss.median()), str(kind)


def _ratio(ours: float, theirs: float) -> str:
    return f"x {ours / theirs:.3g}" if np.isfinite(ours) and theirs else DASH


def fmt_bytes(n: float) -> str:
    """Bytes in decimal units, three significant digits: 36.7 MB, 29.7 kB, 6.43 GB."""
    if not np.isfinite(n):
        return DASH
    for div, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{int(n)} B"


def _measures(row: Experiment, runs: pd.DataFrame, pub: PublishedExperiments, device: str) -> list[dict]:
    """Forgetting, time, throughput, memory, checkpoint size and parameters: ours beside theirs, one dict each."""
    gpu = pub.environment.get("gpu", "?")
    same_gpu = gpu.lower() in device.lower()
    hardware = "" if same_gpu else f"other hardware (ours: {device}; theirs: {gpu})"
    out = []

    probe = _first(runs, "forgetting.probe")
    forgetting = _col(runs, "forgetting.forgetting").median()
    if probe is None or not np.isfinite(forgetting):
        f_ours, f_diff, f_note = DASH, DASH, "not measured here (forgetting=wiki measures it)"
    elif probe == "wiki":
        f_ours, f_diff = f"{forgetting:+.4f}", f"{forgetting - row.forgetting:+.4f}"
        source = _first(runs, "forgetting.text_source")
        f_note = (f"the same statistic (mean token cross-entropy, after − before) on other text: {source}"
                  if source else "the same statistic (mean token cross-entropy, after − before)")
    else:
        metric = _first(runs, "forgetting.metric") or probe
        f_ours, f_diff, f_note = f"{forgetting:+.4g} ({probe})", DASH, f"not comparable: probe {probe} ({metric})"
    out.append({"measure": "Forgetting (nats/token, after − before)", "theirs": f"{row.forgetting:+.4f}",
                "ours": f_ours, "compare": f_diff, "note": f_note})

    wall = _col(runs, "train.wall_s") + _col(runs, "generation_eval.eval_wall_s")
    t_ours = float(wall.median())
    out.append({"measure": "Train time (s)", "theirs": f"{row.train_time_s:,.0f}",
                "ours": f"{t_ours:,.0f}" if np.isfinite(t_ours) else DASH, "compare": _ratio(t_ours, row.train_time_s),
                "note": "ours: the training loop + the final evaluation; theirs also data preparation and both "
                        "forgetting passes, without validation" + (f"; {hardware}" if hardware else "")})

    theirs_rate = pub.train_total_tokens / row.step_time_s if row.step_time_s else math.nan
    rate = float(_col(runs, "train_tokens_per_s").median())
    mfu = fmt_mfu(runs)
    out.append({"measure": "Train tokens/s", "theirs": f"{theirs_rate:,.0f}",
                "ours": f"{rate:,.0f}" if np.isfinite(rate) else DASH, "compare": _ratio(rate, theirs_rate),
                "note": "training steps only, timed after warm-up (theirs: all tokens / the steps' time)"
                        + (f"; ours at MFU {mfu}" + (" (of a measured peak)" if mfu.endswith(MEASURED_MARK) else "")
                           if mfu != DASH else "")
                        + (f"; {hardware}" if hardware else "")})

    mem, kind = _ours_memory(runs)
    if kind == "cuda_reserved":
        m_note = "CUDA reserved memory over the start, the largest over our phases (training, evaluation, " \
                 "latency, generation); theirs: the whole run's"
        m_cmp = _ratio(mem, row.memory_max_bytes)
    else:
        m_note, m_cmp = f"not comparable: ours is {kind} (the process's resident set), theirs CUDA reserved", DASH
    out.append({"measure": "Peak memory (GiB)", "theirs": f"{row.memory_max_bytes / GiB:.2f} (reserved)",
                "ours": f"{mem / GiB:.2f}" if np.isfinite(mem) else DASH, "compare": m_cmp,
                "note": m_note + (f"; {hardware}" if hardware and kind == "cuda_reserved" else "")})

    size = float(_col(runs, "adapter_bytes").median())
    out.append({"measure": "Checkpoint size", "theirs": fmt_bytes(row.file_size_bytes), "ours": fmt_bytes(size),
                "compare": _ratio(size, row.file_size_bytes),
                "note": "theirs: an estimate, parameters x 2 bytes (bf16)" if row.method == "full"
                else "safetensors of what rebuilds the fine-tuned model"})

    params = float(_col(runs, "trainable_params").median())
    same = np.isfinite(params) and int(params) == row.trainable_params
    out.append({"measure": "Trainable parameters", "theirs": fmt_params(row.trainable_params),
                "ours": fmt_params(params), "compare": "same" if same else _ratio(params, row.trainable_params),
                "note": "" if same else "the method's configuration or the model differs"})
    return out


def _setup_differences(part: pd.DataFrame, model: str, task: str, pub: PublishedExperiments) -> list[str]:
    """Why these runs are not peft's setup (empty: the same model, task, steps, batch and test questions)."""
    proto = pub.protocol
    out = []
    if model != pub.model:
        out.append(f"model `{model}`, not `{pub.model}`")
    if task != pub.task:
        out.append(f"task `{task}`, not `{pub.task}`")
    steps, batch = _col(part, "train.steps").median(), _batch(part)
    if steps != proto.get("max_steps") or batch != proto.get("batch_size"):
        out.append(f"{steps:,.0f} steps of {batch:g}, not {proto.get('max_steps'):,} of {proto.get('batch_size')}")
    examples = _col(part, "generation_eval.examples").median()
    if examples != pub.test_examples:
        out.append(f"{examples:,.0f} test questions, not {pub.test_examples:,}")
    return out


def _batch(part: pd.DataFrame) -> float:
    return float(_col(part, "eff.batch_size").median() * _col(part, "eff.grad_accum_steps").fillna(1).median())


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def deviations(part: pd.DataFrame, model: str, task: str, pub: PublishedExperiments,
               matched: list[tuple[Experiment, pd.DataFrame]]) -> list[str]:
    """What differs between these runs and peft's protocol, one line each."""
    proto, env = pub.protocol, pub.environment
    out = []
    if model != pub.model:
        out.append(f"model: `{model}`, not peft's `{pub.model}` ({pub.model_hub_id}, the base model)")
    note = _first(part, "model_note")
    if note:
        out.append(f"model: {note}")
    if task != pub.task:
        data_note = _first(part, "data.note")
        out.append(f"data: task `{task}` ({TASK_LABEL.get(task, task)}" + (f": {data_note}" if data_note else "")
                   + f"), not peft's `{pub.task}` (train on MetaMathQA, test on GSM8K)")
    steps, batch = _col(part, "train.steps").median(), _batch(part)
    rows = _col(part, "data.train_rows").median()
    if steps != proto["max_steps"] or batch != proto["batch_size"] or rows != proto["train_samples"]:
        out.append(f"training: {steps:,.0f} optimiser steps of {batch:g} examples from {rows:,.0f} training rows; "
                   f"peft: {proto['max_steps']:,} steps of {proto['batch_size']} from {proto['train_samples']:,} rows")
    examples = _col(part, "generation_eval.examples").median()
    if examples != pub.test_examples:
        out.append(f"test: {examples:,.0f} questions; peft: all {pub.test_examples:,} of the GSM8K test set")
    checks = [
        ("max length", _col(part, "eff.max_seq_len"), proto.get("max_seq_len"), "tokens"),
        ("generated tokens", _col(part, "data.prompt.max_new_tokens"), proto.get("max_new_tokens"), "at most"),
        ("warm-up ratio", _col(part, "eff.warmup_ratio"), proto.get("warmup_ratio"), ""),
        ("gradient clipping", _col(part, "eff.max_grad_norm"), proto.get("grad_norm_clip"), "max norm"),
        ("seed", _col(part, "seed"), proto.get("seed"), ""),
    ]
    for name, values, theirs, unit in checks:
        have = sorted(set(values.dropna()))
        if theirs is not None and have and have != [float(theirs)]:
            out.append(f"{name}: {', '.join(f'{v:g}' for v in have)}{' ' + unit if unit else ''}; peft: {theirs}")
    schedule = sorted(set(part["eff.lr_schedule"].dropna())) if "eff.lr_schedule" in part else []
    if schedule and schedule != [proto.get("schedule")]:
        out.append(f"schedule: {', '.join(schedule)}; peft: {proto.get('schedule')} after a warm-up")
    precision = sorted(set(part["eff.precision"].dropna())) if "eff.precision" in part else []
    how = {"fp32": "fp32 throughout", "bf16": "bf16 autocast over fp32 weights (the frozen base included, so it "
           "holds twice peft's weight memory)", "fp16": "fp16 autocast over fp32 weights"}
    out.append(f"precision: {'; '.join(how.get(p, p) for p in precision) or '?'}; peft: the base held in bf16 "
               "without autocast, adapters upcast to fp32, full fine-tuning in pure bf16")
    loss_on = sorted(set(part["data.prompt.loss_on"].dropna())) if "data.prompt.loss_on" in part else []
    if loss_on and loss_on != [proto.get("loss_on")]:
        out.append(f"loss: on the {', '.join(loss_on)} tokens; peft: on every token (the prompt included)")
    chat = sorted({bool(v) for v in part["data.prompt.chat_template"].dropna()}) \
        if "data.prompt.chat_template" in part else []
    if True in chat:
        out.append("prompt: wrapped in the tokenizer's chat template; peft: plain text, no chat template")
    template = _first(part, "eff.prompt_template")
    theirs_template = str(proto.get("query_template", "")).replace("{query}", "{text_a}")
    if template and theirs_template and template != theirs_template:
        out.append(f"prompt template: {template!r}; peft: {theirs_template!r}")
    probes = sorted(set(part["forgetting.probe"].dropna())) if "forgetting.probe" in part else []
    if not probes:
        out.append("forgetting: not measured (forgetting=wiki); peft: " + str(proto.get("forgetting", "")))
    elif probes != ["wiki"]:
        out.append(f"forgetting: probe {', '.join(probes)}, not comparable with peft's ({proto.get('forgetting')})")
    else:
        source = _first(part, "forgetting.text_source")
        out.append(f"forgetting: mean token cross-entropy on {source or 'Wikipedia text'}; peft: "
                   f"{proto.get('forgetting')}")
    for row, runs in matched:
        lr = sorted(set(runs["lr"].dropna().astype(float)))
        if lr and not np.allclose(lr, row.lr, rtol=1e-6):
            out.append(f"learning rate: {row.label}: ours {', '.join(f'{v:g}' for v in lr)}; peft {row.lr:g}")
        wd = sorted(set(_col(runs, "eff.weight_decay").dropna()))
        if wd and not np.allclose(wd, row.weight_decay, rtol=1e-6):
            out.append(f"weight decay: {row.label}: ours {', '.join(f'{v:g}' for v in wd)}; peft {row.weight_decay:g}")
        dropout = sorted(set(_col(runs, "eff.dropout").dropna()))
        if row.method in LORA_FAMILY and dropout and dropout != [0.0]:
            out.append(f"dropout: {row.label}: ours {', '.join(f'{v:g}' for v in dropout)} on the adapter's input; "
                       f"peft 0 (`method.dropout=0`)")
    device = _first(part, "provenance.device") or "?"
    if str(env.get("gpu", "")).lower() not in str(device).lower():
        out.append(f"hardware: {device}; peft: one {env.get('gpu')}")
    versions = [(name, _first(part, f"provenance.versions.{name}"), env.get(name))
                for name in ("torch", "transformers", "peft")]
    differ = [f"{n} {o} (peft: {t})" for n, o, t in versions if o and t and str(o) != str(t)]
    if differ:
        out.append("versions: " + ", ".join(differ))
    out.append(LOOP_DIFFERENCES)
    return out


@dataclass
class ExperimentReproduction:
    published: PublishedExperiments
    model: str | None
    task: str | None
    budget_desc: str
    device: str
    setup_differences: list[str]
    deviations: list[str]
    accuracy: pd.DataFrame
    measures: pd.DataFrame
    not_run: list[str]
    tolerance_points: float

    @property
    def same_setup(self) -> bool:
        return self.model is not None and not self.setup_differences

    @property
    def model_differs(self) -> bool:
        """Not peft's setup (model, task, steps, batch or test questions): the figures are not judged."""
        return self.model is not None and bool(self.setup_differences)

    def verdicts(self) -> dict[str, str]:
        """{published experiment label: verdict} for the experiments these runs have."""
        return dict(zip(self.accuracy["experiment"], self.accuracy["verdict"])) if not self.accuracy.empty else {}

    def summary(self) -> str:
        if self.accuracy.empty:
            return f"none ({len(self.not_run)} experiments not run)"
        counts = self.accuracy["verdict"].value_counts()
        return ", ".join(f"{n} {v}" for v, n in counts.items()) + f"; {len(self.not_run)} experiments not run"

    def accuracy_table(self) -> Table:
        header = ["Experiment (peft)", "Ours", "Theirs", "Ours (questions, runs)", "95% CI", "Diff", "Diff 95%",
                  "Verdict"]
        rows = []
        for r in self.accuracy.itertuples():
            ci = f"{r.ci_low:.1f} – {r.ci_high:.1f}" if np.isfinite(r.ci_low) else DASH
            questions = f"{r.examples:,}" if r.examples else "?"
            theirs = f"{r.theirs:.1f} ({r.theirs_correct}/{self.published.test_examples})"
            rows.append([r.experiment, r.ours_label, theirs,
                         f"{r.ours:.1f} ({questions}, n={r.runs})", ci, f"{r.diff:+.1f}",
                         f"±{r.diff_halfwidth:.1f}" if np.isfinite(r.diff_halfwidth) else DASH, r.verdict])
        return Table(f"Accuracy: {self.published.title}", header, rows)

    def measure_table(self) -> Table:
        header = ["Experiment (peft)", "Measure", "Theirs", "Ours", "Ours vs theirs", "Note"]
        rows = [[r.experiment, r.measure, r.theirs, r.ours, r.compare, r.note] for r in self.measures.itertuples()]
        return Table("Forgetting and cost", header, rows)

    def markdown(self) -> str:
        pub = self.published
        task = TASK_LABEL.get(self.task, self.task) if self.task else "(none)"
        lines = [
            f"## Reproduction: {pub.title}",
            "",
            f"Published figures: `{_rel(pub.path)}` (version {pub.version}). Source: {pub.source_line()}. Their "
            f"environment: {pub.environment.get('gpu')}, torch {pub.environment.get('torch')}, transformers "
            f"{pub.environment.get('transformers')}, peft {pub.environment.get('peft')} at "
            f"{str(pub.environment.get('peft_commit', ''))[:9]}.",
            "",
            f"Our runs: model `{self.model or '(none)'}`, task {task}, budget {self.budget_desc or '(none)'}, device "
            f"{self.device}. Verdicts: {self.summary()}.",
            "",
        ]
        if self.model_differs:
            lines += [f"> **Not the same setup**: {'; '.join(self.setup_differences)}. peft's figures are shown "
                      "beside ours; none is judged.", ""]
        lines += ["### Deviations from peft's protocol", ""]
        lines += [f"- {d}" for d in self.deviations] or ["- none found"]
        if not self.accuracy.empty:
            lines += ["", "### Accuracy", "", self.accuracy_table().markdown(), "",
                      "Accuracy x 100 on the test questions (greedy decoding, the final number compared). Ours: the "
                      "mean over runs; 95% CI: one run's Wilson interval, or the t-interval over seeds. Theirs: one "
                      f"run, correct / {pub.test_examples:,}. Diff 95%: the interval of the difference (both standard "
                      f"errors). Reproduced: |diff| ≤ max({self.tolerance_points:g} points, Diff 95%).",
                      "", "### Forgetting and cost", "", self.measure_table().markdown(), ""]
        if self.not_run:
            lines += ["", f"Published experiments without a run here: {', '.join(self.not_run)}.", ""]
        lines += ["### Notes on the published figures", ""] + [f"- {n}" for n in pub.notes] + [""]
        return "\n".join(lines)


def _rel(path: Path) -> str:
    root = Path(__file__).resolve().parent.parent
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _not_run(pub: PublishedExperiments, matched: set[str]) -> list[str]:
    return [r.label + ("" if r.method else " (no such method here)") for r in pub.rows if r.label not in matched]


def _group(part: pd.DataFrame, model: str, task: str, pub: PublishedExperiments, tol: float
           ) -> ExperimentReproduction:
    notes: dict[str, str] = {}
    device = str(_first(part, "provenance.device") or "?")
    differences = _setup_differences(part, model, task, pub)
    acc_rows, measure_rows, matched = [], [], []
    assigned = assign(part, pub, notes)
    for row in pub.rows:
        runs = assigned.get(row.label)
        if runs is None:
            continue
        matched.append((row, runs))
        first = runs.iloc[0]
        label = method_label(first["method"], first["rank_key"] if first["rank_key"] >= 0 else np.nan, None,
                             first.get("method_label"))
        acc = _accuracy(runs)
        theirs = row.correct / pub.test_examples * 100
        se_theirs = math.sqrt(row.accuracy * (1 - row.accuracy) / pub.test_examples) * 100
        half = Z95 * math.hypot(acc["se"], se_theirs) if np.isfinite(acc["se"]) else math.nan
        diff = acc["ours"] - theirs
        if differences:
            verdict = NOT_SAME_SETUP
        elif abs(diff) <= max(tol, half if np.isfinite(half) else 0.0) + 1e-9:
            verdict = REPRODUCED
        else:
            verdict = "not reproduced (" + ("below" if diff < 0 else "above") + ")"
        acc_rows.append({"experiment": row.label, "method": row.method, "ours_label": label, "theirs": theirs,
                         "theirs_correct": row.correct, **acc, "diff": diff, "diff_halfwidth": half,
                         "verdict": verdict})
        measure_rows += [{"experiment": row.label, **m} for m in _measures(row, runs, pub, device)]
    devs = deviations(part, model, task, pub, matched) + list(notes.values())
    return ExperimentReproduction(
        pub, model, task, str(part["budget_desc"].iloc[0]), device, differences, devs, pd.DataFrame(acc_rows),
        pd.DataFrame(measure_rows, columns=["experiment", "measure", "theirs", "ours", "compare", "note"]),
        _not_run(pub, {r.label for r, _ in matched}), tol)


def reproduce(df: pd.DataFrame, pub: PublishedExperiments, tolerance: float | None = None
              ) -> list[ExperimentReproduction]:
    """One ExperimentReproduction per (model, task, budget) group of ok generation runs in `df`
    (analysis.reproduce.frame), or one with every experiment not run when there is none."""
    tol = pub.tolerance_points if tolerance is None else float(tolerance)
    ok = ok_frame(df)
    ok = ok[is_generation(ok)] if not ok.empty else ok
    if ok.empty:
        return [ExperimentReproduction(pub, None, None, "", "?", [], ["no ok runs of a generation task: nothing ran"],
                                       pd.DataFrame(), pd.DataFrame(), _not_run(pub, set()), tol)]
    return [_group(part, model, task, pub, tol)
            for (model, task, _sig), part in ok.groupby(["model", "task", "budget_sig"], dropna=False, sort=True)]
