"""Comparison tables from run records, as Markdown, CSV and LaTeX.

    python -m analysis.tables results/runs [--out results/report]

1. Method x task, in the style of the LoRA paper's Table 2 (Hu et al. 2021): one row per method (and rank,
   and learning rate where a sweep varied it), the trainable parameters excluding the task head, one column
   per task with its GLUE main metric x 100 (accuracy; Matthews correlation for CoLA; Pearson for STS-B),
   and the average over the table's tasks; mean ± std (sample std) over seeds; the best mean per column in
   bold. One table per model and training budget (runs with different budgets are never averaged).
2. Rank table: per task, method and rank: the metric, intruder dimensions (from `python -m analysis.analyse`; the
   header and notes give the ε and top-k stored with the counts), forgetting (the run's probe), peak training
   memory and parameters.
3. Causal LMs on classification tasks (`causal_lm_tables`) and generation tasks (`generation_tables`: question ->
   worked solution -> final number) have tables of their own; the tables above leave generation runs out.

Only `ok` runs count. Tasks whose offline data are samples (QNLI train, MNLI) are marked: not comparable to
published numbers.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from analysis.collect import add_derived, collect
from bench.data.tasks import GENERATION, TASKS
from bench.model import CAUSAL_LM
from methods import REGISTRY, in_display_order

# Display facts come from their owners: each method's yaml (conf/method/, through the registry), each task's yaml
# (conf/task/).
METHOD_ORDER = in_display_order()
METHOD_LABEL = {name: REGISTRY[name].display_label for name in METHOD_ORDER}
TASK_ORDER = sorted(TASKS, key=lambda name: TASKS[name].display_order)  # the LoRA paper's column order
TASK_LABEL = {name: task.label or name for name, task in TASKS.items()}
METRIC_ABBR = {
    "accuracy": "Acc",
    "matthews_correlation": "Mcc",
    "pearson": "Pearson",
    "spearmanr": "Spearman",
    "f1": "F1",
}
SAMPLE_NOTE = "offline data are samples of GLUE; not comparable to published numbers"
DASH = "–"


@dataclass
class Table:
    """A formatted table: header, rows of cells, which cells to mark best, footnotes, and the numbers."""

    title: str
    header: list[str]
    rows: list[list[str]]
    best: set[tuple[int, int]] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    numbers: pd.DataFrame = field(default_factory=pd.DataFrame)

    def markdown(self) -> str:
        def cell(i: int, j: int, text: str) -> str:
            return f"**{text}**" if (i, j) in self.best else text

        lines = ["| " + " | ".join(self.header) + " |", "|" + "|".join("---" for _ in self.header) + "|"]
        lines += [
            "| " + " | ".join(cell(i, j, c) for j, c in enumerate(row)) + " |"
            for i, row in enumerate(self.rows)
        ]
        return "\n".join(lines + ([""] + [f"{n}  " for n in self.notes] if self.notes else []))

    def latex(self) -> str:
        def esc(text: str) -> str:
            for a, b in (
                ("\\", r"\textbackslash{}"),
                ("&", r"\&"),
                ("%", r"\%"),
                ("_", r"\_"),
                ("#", r"\#"),
                ("±", r"$\pm$"),
                ("ε", r"$\varepsilon$"),
                ("–", "--"),
                ("−", "$-$"),
                ("·", "--"),
                ("|cos|", r"$|\cos|$"),
                ("†", r"$^\dagger$"),
                ("‡", r"$^\ddagger$"),
            ):
                text = text.replace(a, b)
            return text

        def cell(i: int, j: int, text: str) -> str:
            return rf"\textbf{{{esc(text)}}}" if (i, j) in self.best else esc(text)

        lines = [
            r"\begin{table}[t]",
            r"\centering",
            r"\small",
            r"\begin{tabular}{l" + "r" * (len(self.header) - 1) + "}",
            r"\toprule",
            " & ".join(esc(h) for h in self.header) + r" \\",
            r"\midrule",
        ]
        lines += [
            " & ".join(cell(i, j, c) for j, c in enumerate(row)) + r" \\" for i, row in enumerate(self.rows)
        ]
        lines += [
            r"\bottomrule",
            r"\end{tabular}",
            rf"\caption{{{esc(self.title)}. " + esc(" ".join(self.notes)) + "}",
            r"\end{table}",
        ]
        return "\n".join(lines)

    def write(self, out_dir: Path, stem: str) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [out_dir / f"{stem}.md", out_dir / f"{stem}.csv", out_dir / f"{stem}.tex"]
        paths[0].write_text(f"### {self.title}\n\n{self.markdown()}\n")
        self.numbers.to_csv(paths[1], index=False)
        paths[2].write_text(self.latex() + "\n")
        return paths


def fmt_params(n: float) -> str:
    if n is None or not np.isfinite(n):
        return DASH
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.{1 if n / div >= 10 else 2}f}{unit}"
    return f"{int(n)}"


def fmt_mean_std(values: pd.Series, digits: int = 1) -> str:
    v = values.dropna().astype(float)
    if v.empty:
        return DASH
    if len(v) == 1:
        return f"{v.iloc[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def method_label(method: str, rank: float, lr: float | None = None, label: str | None = None) -> str:
    """`label` (the run's configured label, e.g. "LoRA (α=2r)"; default: the method's) with the rank and lr."""
    label = label or METHOD_LABEL.get(method, method)
    if rank is not None and np.isfinite(rank):
        rank_format = REGISTRY[method].rank_format if method in REGISTRY else "r={}"
        rank_text = rank_format.format(int(rank))
        label = label[:-1] + f", {rank_text})" if label.endswith(")") else label + f" ({rank_text})"
    if lr is not None:
        label += f", lr={lr:g}"
    return label


def _method_sort_key(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def ok_frame(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty or "status" not in df.columns:
        return df.iloc[0:0]
    df = add_derived(df[df["status"] == "ok"])
    df["rank_key"] = df["rank"].astype(float).fillna(-1)
    df["lr"] = df["lr"].astype(float) if "lr" in df.columns else np.nan
    known = df["method_label"] if "method_label" in df.columns else pd.Series(np.nan, index=df.index, dtype=object)
    df["method_label"] = known.fillna(df["method"].map(lambda m: METHOD_LABEL.get(m, m)))
    return df


def chance_level(task: str, dev_rows: int | None = None, source: str | None = None) -> tuple[float, bool] | None:
    """What a model that learned nothing scores on the task's dev set (x 100), and whether that is exact: 0 for
    Matthews correlation and Pearson; for accuracy the majority class's share of the dev set (the task's
    `dev_labels`, conf/task/<name>.yaml), exact
    when the run evaluated the whole set and the full set's share (an estimate) when it evaluated a subset
    (`dev_rows` fewer). None when the facts do not cover the run's dev data (another source, more rows, QQP)."""
    task_facts = TASKS.get(task)
    if task_facts is None:
        return None
    if task_facts.main_metric != "accuracy":
        return 0.0, True
    counts, sources = task_facts.dev_labels.get("counts"), task_facts.dev_labels.get("sources") or ()
    kind = str(source).split(":", 1)[0] if source else None
    if not counts or (kind is not None and kind not in sources):
        return None
    rows = sum(counts)
    if dev_rows is not None and dev_rows > rows:
        return None
    return max(counts) / rows * 100, dev_rows is None or dev_rows == rows


def _chance_by_task(df: pd.DataFrame) -> dict[str, tuple[float, bool]]:
    out = {}
    for task, part in df.groupby("task"):
        cap = part["data.dev_rows"].max() if "data.dev_rows" in part else None
        sources = part["data.source"].dropna().unique() if "data.source" in part else []
        source = sources[0] if len(sources) == 1 else None
        if len(sources) > 1 and len({str(s).split(":", 1)[0] for s in sources}) > 1:
            continue  # runs of one task on different data: no one chance level
        level = chance_level(task, int(cap) if cap is not None and pd.notna(cap) else None, source)
        if level is not None:
            out[task] = level
    return out


def chance_levels(df: pd.DataFrame) -> dict[str, float]:
    """{task: chance level} for the tasks of a group of runs, from the task facts and the records' dev rows and
    data source; no data are read."""
    return {task: level for task, (level, _) in _chance_by_task(df).items()}


def chance_note(df: pd.DataFrame) -> str | None:
    """The tables' footnote on chance levels, marking (≈) those of runs that evaluated a subset of the dev set."""
    chance = _chance_by_task(df)
    if not chance:
        return None
    text = ", ".join(f"{TASK_LABEL.get(t, t)} {'' if exact else '≈'}{v:.1f}" for t, (v, exact) in chance.items())
    note = f"Chance level (majority class of the dev set; 0 for correlations): {text}."
    if not all(exact for _, exact in chance.values()):
        note += " ≈: the whole dev set's share; these runs evaluated a subset of it."
    return note


def sampled_tasks(df: pd.DataFrame) -> set[str]:
    """Tasks whose rows came from an offline sample (their record carries a data note)."""
    if "data.note" not in df.columns:
        return set()
    notes = df[["task", "data.note"]].dropna()
    return set(notes.loc[notes["data.note"].astype(str).str.len() > 0, "task"])


def _groups(df: pd.DataFrame):
    """(model, budget) groups, each a separate table."""
    for (model, _sig), part in df.groupby(["model", "budget_sig"], sort=True, dropna=False):
        yield model, str(part["budget_desc"].iloc[0]), part


def is_generation(df: pd.DataFrame) -> pd.Series:
    """True for the runs of generation tasks (column `task_kind`, analysis.collect.task_kind_of)."""
    if "task_kind" not in df.columns:
        return pd.Series(False, index=df.index)
    return df["task_kind"] == GENERATION


def t_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """95% t-interval for the mean; (nan, nan) for n < 2; (mean, mean) when the values agree exactly."""
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    mean, sem = float(np.mean(values)), float(stats.sem(values))
    if sem == 0:
        return mean, mean
    lo, hi = stats.t.interval(confidence, n - 1, loc=mean, scale=sem)
    return float(lo), float(hi)


def method_task_tables(df: pd.DataFrame) -> list[Table]:
    """Per (model, budget), the runs of classification tasks: method x task (generation runs: `generation_tables`)."""
    df = ok_frame(df)
    df = df[~is_generation(df)]
    tables = []
    for model, budget_desc, part in _groups(df):
        tasks = sorted(part["task"].unique(), key=lambda t: TASK_ORDER.index(t) if t in TASK_ORDER else 99)
        metric_of = part.groupby("task")["main_metric"].first().to_dict()
        sampled = sampled_tasks(part)
        varied_lr = part.groupby(["method", "method_label", "rank_key"])["lr"].nunique().max() > 1
        keys = ["method", "method_label", "rank_key"] + (["lr"] if varied_lr else [])
        row_groups = sorted(
            part.groupby(keys, dropna=False), key=lambda kv: (_method_sort_key(kv[0][0]), kv[0][1:])
        )
        header = ["Method", "# Trainable params (excl. head)"]
        header += [
            f"{TASK_LABEL.get(t, t)} ({METRIC_ABBR.get(metric_of[t], metric_of[t])})"
            + ("†" if t in sampled else "")
            for t in tasks
        ] + ["Avg."]
        rows, numbers, means = [], [], []
        for key, g in row_groups:
            method, label, rank = key[0], key[1], key[2]
            lr = key[3] if varied_lr else None
            params = g["trainable_params_excl_head"].astype(float)
            row = [
                method_label(method, rank if rank >= 0 else np.nan, lr, label),
                fmt_params(params.median()) + ("*" if params.nunique() > 1 else ""),
            ]
            num = {
                "model": model,
                "budget": budget_desc,
                "method": method,
                "method_label": label,
                "rank": rank if rank >= 0 else None,
                "lr": lr,
                "trainable_params_excl_head": params.median(),
            }
            task_means = []
            for t in tasks:
                vals = g.loc[g["task"] == t, "metric_pct"]
                row.append(fmt_mean_std(vals))
                m = vals.mean() if vals.notna().any() else np.nan
                task_means.append(m)
                num.update(
                    {
                        f"{t}_mean": m,
                        f"{t}_std": vals.std(ddof=1) if len(vals) > 1 else np.nan,
                        f"{t}_n": int(vals.notna().sum()),
                    }
                )
            avg = float(np.mean(task_means)) if task_means and np.all(np.isfinite(task_means)) else np.nan
            row.append(f"{avg:.1f}" if np.isfinite(avg) else DASH)
            num["avg"] = avg
            rows.append(row)
            numbers.append(num)
            means.append(task_means + [avg])
        best = set()
        arr = np.array(means, dtype=float) if means else np.zeros((0, 0))
        for j in range(arr.shape[1] if arr.size else 0):
            col = arr[:, j]
            if np.isfinite(col).sum() >= 2:
                top = np.nanmax(col)
                best |= {(i, j + 2) for i in np.where(np.isclose(col, top))[0]}
        n_seeds = part.groupby(keys + ["task"], dropna=False).size()
        notes = [
            (
                f"Dev-set {', '.join(sorted({METRIC_ABBR.get(m, m) for m in metric_of.values()}))} x 100; "
                f"mean ± std over seeds where a cell has more than one run (runs per cell: "
                f"{n_seeds.min()}–{n_seeds.max()}); best mean per column in bold; Avg. over the columns "
                f"when a row has them all."
            )
        ]
        chance = chance_note(part)
        if chance:
            notes.append(chance)
        if any("*" in r[1] for r in rows):
            notes.append("* trainable parameters differ between tasks; the median is shown.")
        if sampled:
            notes.append(f"† {', '.join(TASK_LABEL.get(t, t) for t in sorted(sampled))}: {SAMPLE_NOTE}.")
        if part.get("model_note") is not None and part["model_note"].notna().any():
            notes.append("Random-init test model: the metrics are meaningless.")
        tables.append(
            Table(f"{model} · budget {budget_desc}", header, rows, best, notes, pd.DataFrame(numbers))
        )
    return tables


def rank_tables(df: pd.DataFrame) -> list[Table]:
    """Per (model, budget): task, method, rank -> metric, intruders, forgetting, memory, params (classification
    tasks; generation runs: `generation_tables`)."""
    df = ok_frame(df)
    df = df[~is_generation(df)]
    tables = []
    for model, budget_desc, part in _groups(df):
        sampled = sampled_tasks(part)
        probes = sorted(part["forgetting.probe"].dropna().unique()) if "forgetting.probe" in part else []
        kinds = sorted(part["memory_kind"].dropna().unique())
        header = [
            "Task",
            "Method",
            "Rank",
            "Metric",
            intruder_header(part),
            "Forgetting",
            "Peak train memory (MiB)",
            "Trainable params (excl. head)",
            "Runs",
        ]
        rows, numbers = [], []
        groups = part.groupby(["task", "method", "method_label", "rank_key"], dropna=False)
        for (task, method, label, rank), g in sorted(
            groups,
            key=lambda kv: (
                TASK_ORDER.index(kv[0][0]) if kv[0][0] in TASK_ORDER else 99,
                _method_sort_key(kv[0][1]),
                kv[0][2],
                kv[0][3],
            ),
        ):
            metric = METRIC_ABBR.get(g["main_metric"].iloc[0], g["main_metric"].iloc[0])
            intr_text = _intruders_text(g)
            mem = g["peak_train_memory_bytes"] / 2**20
            rows.append(
                [
                    TASK_LABEL.get(task, task) + ("†" if task in sampled else ""),
                    label,
                    str(int(rank)) if rank >= 0 else DASH,
                    f"{fmt_mean_std(g['metric_pct'])} ({metric})",
                    intr_text,
                    fmt_mean_std(g["forgetting_value"] * 100, 1),
                    fmt_mean_std(mem, 0),
                    fmt_params(g["trainable_params_excl_head"].astype(float).median()),
                    str(len(g)),
                ]
            )
            numbers.append(
                {
                    "model": model,
                    "budget": budget_desc,
                    "task": task,
                    "method": method,
                    "method_label": label,
                    "rank": rank if rank >= 0 else None,
                    "metric": g["main_metric"].iloc[0],
                    "metric_pct_mean": g["metric_pct"].mean(),
                    "intruders_mean": g["intruders"].mean(),
                    "forgetting_x100_mean": (g["forgetting_value"] * 100).mean(),
                    "peak_train_memory_mib_mean": mem.mean(),
                    "trainable_params_excl_head": g["trainable_params_excl_head"].median(),
                    "runs": len(g),
                }
            )
        notes = [
            f"Metric x 100 (mean ± std over seeds where more than one run). Intruders: {intruder_definition(part)}, "
            "summed over the layers; n/a where the method leaves the weights unchanged; – where not analysed."
        ]
        notes.append(
            "Forgetting x 100: probe score before − after fine-tuning (after − before for losses) "
            + (f"(probe: {', '.join(probes)})" if probes else "(no run had a forgetting probe)")
            + "; positive = ability lost."
        )
        if kinds:
            notes.append(
                f"Memory: {', '.join(kinds)} during training"
                + (
                    " (whole process: model, data, Python; not comparable to GPU figures)."
                    if any("CPU" in k for k in kinds)
                    else "."
                )
            )
        if sampled:
            notes.append(f"† {SAMPLE_NOTE}.")
        tables.append(
            Table(
                f"Rank table: {model} · budget {budget_desc}",
                header,
                rows,
                set(),
                notes,
                pd.DataFrame(numbers),
            )
        )
    return tables





def kind_of(df: pd.DataFrame) -> pd.Series:
    """Each run's model kind (the record's `model_kind`: `causal_lm` or `classifier`); empty for failed runs."""
    if "model_kind" not in df.columns:
        return pd.Series(None, index=df.index, dtype=object)
    return df["model_kind"].astype(object)


def intruder_settings(df: pd.DataFrame) -> tuple[list[float], list[int]]:
    """The ε values and top-k sizes that the intruder counts of `df`'s analysed runs were computed with (columns
    `analysis.intruders.epsilon` and `.k`), each sorted and without repeats."""
    def values(col: str) -> list:
        return sorted(pd.to_numeric(df[col], errors="coerce").dropna().unique()) if col in df.columns else []

    return [float(e) for e in values("analysis.intruders.epsilon")], [int(k) for k in values("analysis.intruders.k")]


def _listed(values: list) -> str:
    return ", ".join(f"{v:g}" for v in values)


def intruder_header(df: pd.DataFrame) -> str:
    """Column header for `df`'s intruder counts, naming the ε they were counted at ("Intruders (ε=0.5)"), or saying
    that it differs between runs."""
    eps, _ = intruder_settings(df)
    if not eps:
        return "Intruders"
    return f"Intruders (ε={eps[0]:g})" if len(eps) == 1 else f"Intruders (ε differs between runs: {_listed(eps)})"


def _k_text(ks: list[int]) -> str:
    if len(ks) == 1:
        return f"top-{ks[0]}"
    return f"top-k (k differs between runs: {_listed(ks)})" if ks else "top-k"


def _eps_text(eps: list[float]) -> str:
    if len(eps) == 1:
        return f"ε = {eps[0]:g}"
    return f"ε (differs between runs: {_listed(eps)})" if eps else "ε"


def intruder_settings_text(df: pd.DataFrame) -> str:
    """"top-10 vectors, ε = 0.5": the settings of `df`'s intruder counts, for captions and titles."""
    eps, ks = intruder_settings(df)
    return f"{_k_text(ks)} vectors, {_eps_text(eps)}"


def intruder_definition(df: pd.DataFrame) -> str:
    """What an intruder is, with the top-k and ε of `df`'s counts."""
    eps, ks = intruder_settings(df)
    return (f"{_k_text(ks)} left singular vectors of each fine-tuned weight whose largest |cos| with all of the "
            f"pre-trained weight's left singular vectors is below {_eps_text(eps)}")


def _intruders_text(g: pd.DataFrame) -> str:
    """A group's intruder count: mean ± std over its runs (one value when they agree), "n/a" where the analysis
    does not apply (weights unchanged), a dash where it has not run."""
    intr = g["intruders"]
    status = g.get("analysis.status")
    if intr.notna().any():
        return fmt_mean_std(intr, 1) if intr.nunique() > 1 else f"{int(intr.dropna().iloc[0])}"
    if status is not None and (status == "n/a").any():
        return "n/a"
    return DASH


def _col(g: pd.DataFrame, name: str) -> pd.Series:
    return pd.to_numeric(g[name], errors="coerce") if name in g.columns else pd.Series(np.nan, index=g.index)


def _fmt_rate(values: pd.Series) -> str:
    v = values.dropna()
    if v.empty:
        return DASH
    return f"{v.median():,.0f}" if v.median() >= 100 else f"{v.median():.3g}"


MEASURED_MARK = "‡"  # † marks sampled tasks
MFU_NOTE = ("MFU: model FLOPs utilisation, the training FLOPs the model's maths needs per second (PaLM's count, "
            "bench/measure/flops.py) over the device's peak in the run's compute dtype (median over runs); "
            f"{MEASURED_MARK} marks a measured peak (a CPU, or a GPU not in NVIDIA's datasheet table): the best rate "
            "of plain matmuls timed in the run's process, not a hardware limit.")


def fmt_mfu(g: pd.DataFrame) -> str:
    """The median MFU of a group's runs in percent (record `train_flops.mfu_ratio`), marked where any of their peaks
    was measured rather than read from a datasheet; the dash where no run has one."""
    mfu = _col(g, "train_flops.mfu_ratio").dropna()
    if mfu.empty:
        return DASH
    measured = "train_flops.peak_source" in g and (g.loc[mfu.index, "train_flops.peak_source"] == "measured").any()
    return f"{100 * mfu.median():.3g}%" + (MEASURED_MARK if measured else "")


def causal_lm_tables(df: pd.DataFrame) -> list[Table]:
    """Per (model, budget) of causal-LM runs on classification tasks (GLUE as text; generation tasks have
    `generation_tables`): task, method -> accuracy (the task's main metric from label log-likelihood scoring) and
    the pre-trained model's zero-shot score on the same evaluation, trainable parameters, peak training memory (and
    the estimator's figure, column `memory_estimate_bytes` when the caller added it), training tokens/s and MFU, decode
    tokens/s with the KV cache (record `generation`), perplexity forgetting (probe `ppl`) and intruder
    dimensions."""
    df = ok_frame(df)
    df = df[(kind_of(df) == CAUSAL_LM) & ~is_generation(df)]
    out = []
    for model, budget_desc, part in _groups(df):
        kinds = sorted(part["memory_kind"].dropna().unique())
        header = ["Task", "Method", "Accuracy", "Zero-shot", "Trainable params", "Peak train memory (MiB)",
                  "Estimated peak (MiB)", "Train tokens/s", "MFU", "Decode tokens/s (unmerged / merged)",
                  "PPL before → after", intruder_header(part), "Runs"]
        rows, numbers = [], []
        # lm.eval_mode (records before it existed scored by log-likelihood): its runs are not pooled with the other's
        mode_col = "data.prompt.eval_mode"
        part = part.assign(eval_mode=part[mode_col].fillna("loglik") if mode_col in part else "loglik")
        groups = part.groupby(["task", "method", "method_label", "rank_key", "eval_mode"], dropna=False)
        for (task, method, label, rank, mode), g in sorted(
            groups, key=lambda kv: (TASK_ORDER.index(kv[0][0]) if kv[0][0] in TASK_ORDER else 99,
                                    _method_sort_key(kv[0][1]), kv[0][2], kv[0][3], kv[0][4])):
            metric = METRIC_ABBR.get(g["main_metric"].iloc[0], g["main_metric"].iloc[0])
            if mode == "generate":
                metric += ", greedy exact match"
            zero = _col(g, "zero_shot_main_metric_value") * 100
            mem = g["peak_train_memory_bytes"] / 2**20
            est = _col(g, "memory_estimate_bytes") / 2**20
            unmerged = _col(g, "generation.unmerged.decode_tokens_per_s")
            merged = _col(g, "generation.merged.decode_tokens_per_s")
            ppl = g["forgetting.probe"] == "ppl" if "forgetting.probe" in g else pd.Series(False, index=g.index)
            before, after = _col(g, "forgetting.before")[ppl], _col(g, "forgetting.after")[ppl]
            intr_text = _intruders_text(g)
            rows.append([
                TASK_LABEL.get(task, task),
                method_label(method, rank if rank >= 0 else np.nan, None, label),
                f"{fmt_mean_std(g['metric_pct'])} ({metric})",
                fmt_mean_std(zero),
                fmt_params(g["trainable_params"].astype(float).median()),
                fmt_mean_std(mem, 0),
                fmt_mean_std(est, 0),
                _fmt_rate(_col(g, "train_tokens_per_s")),
                fmt_mfu(g),
                f"{_fmt_rate(unmerged)} / {_fmt_rate(merged)}",
                f"{before.median():.1f} → {after.median():.1f}" if before.notna().any() else DASH,
                intr_text,
                str(len(g)),
            ])
            numbers.append({
                "model": model, "budget": budget_desc, "task": task, "method": method, "method_label": label,
                "rank": rank if rank >= 0 else None, "metric": g["main_metric"].iloc[0], "eval_mode": mode,
                "metric_pct_mean": g["metric_pct"].mean(), "zero_shot_pct_mean": zero.mean(),
                "trainable_params": g["trainable_params"].astype(float).median(),
                "peak_train_memory_mib_mean": mem.mean(), "estimated_peak_mib_mean": est.mean(),
                "train_tokens_per_s_median": _col(g, "train_tokens_per_s").median(),
                "train_mfu_median": _col(g, "train_flops.mfu_ratio").median(),
                "decode_tokens_per_s_unmerged_median": unmerged.median(),
                "decode_tokens_per_s_merged_median": merged.median(),
                "ppl_before_median": before.median(), "ppl_after_median": after.median(),
                "intruders_mean": g["intruders"].mean(), "runs": len(g),
            })
        base = _col(part, "generation.base.decode_tokens_per_s")
        notes = [
            "Accuracy: the task's main metric x 100, each label scored by the log-likelihood of its answer text "
            "(mean ± std over seeds), or, marked 'greedy exact match' (lm.eval_mode=generate), the label whose answer "
            "greedy decoding produced exactly (no match counts as wrong); zero-shot: the pre-trained LM scored the "
            "same way before training. "
            "Trainable parameters: a causal LM has no task head, so all of them count.",
            "Decode: greedy generation with the KV cache, tokens/s (median over runs); "
            + (f"the base model decodes {base.median():,.0f} tokens/s here. " if base.notna().any() else "")
            + "PPL: perplexity of the forgetting probe's held-out text before → after fine-tuning (lower is "
            "better; a rise is ability lost).",
            MFU_NOTE,
        ]
        if kinds:
            notes.append(f"Memory: {', '.join(kinds)} during training"
                         + (" (whole process: model, data, Python; the estimate counts tensors only, so it is "
                            "not comparable on CPU)." if any("CPU" in k for k in kinds) else ".")
                         + " Estimate: bench/tools/memory_estimate.py (weights, gradients, optimiser states, "
                         "activations with the logits over the vocabulary).")
        if part.get("model_note") is not None and part["model_note"].notna().any():
            notes.append("Random-init test model: the metrics are meaningless.")
        out.append(Table(f"Causal LM: {model} · budget {budget_desc}", header, rows, set(), notes,
                         pd.DataFrame(numbers)))
    return out


def _ci_text(g: pd.DataFrame) -> tuple[str, float, float]:
    """A group's 95% interval of the accuracy (x 100): one run's Wilson interval from its record
    (`generation_eval.accuracy_ci95`), or the t-interval of the mean over several runs (seeds)."""
    if len(g) == 1:
        ci = g["generation_eval.accuracy_ci95"].iloc[0] if "generation_eval.accuracy_ci95" in g else None
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci:
            lo, hi = float(ci[0]) * 100, float(ci[1]) * 100
            return f"{lo:.1f} – {hi:.1f}", lo, hi
        return DASH, math.nan, math.nan
    lo, hi = t_interval(g["metric_pct"].dropna().to_numpy(float))
    lo, hi = max(lo, 0.0), min(hi, 100.0)  # an accuracy's interval stays within 0-100
    return (f"{lo:.1f} – {hi:.1f} (t, n={len(g)})", lo, hi) if np.isfinite(lo) else (DASH, lo, hi)


def _arrow(before: pd.Series, after: pd.Series, digits: int) -> str:
    """"before → after" of two columns' medians; the dash where neither was measured."""
    if before.notna().any() or after.notna().any():
        def one(v: pd.Series) -> str:
            return f"{v.median():.{digits}f}" if v.notna().any() else DASH

        return f"{one(before)} → {one(after)}"
    return DASH


def _baseline_text(values: pd.Series) -> str:
    """The untrained model's score over a group's runs: one value where they agree (the same model on the same
    questions), else mean ± std."""
    v = values.dropna()
    return f"{v.iloc[0]:.1f}" if len(v) and np.allclose(v, v.iloc[0]) else fmt_mean_std(v)


def _forgetting_text(g: pd.DataFrame) -> str:
    """The group's forgetting (median), its probe and the probe's score before → after: "+0.050 (wiki 2.310 →
    2.360)"; the dash when no run had a probe."""
    probes = g["forgetting.probe"].dropna().unique() if "forgetting.probe" in g else []
    value = _col(g, "forgetting.forgetting")
    if len(probes) == 0 or value.isna().all():
        return DASH
    if len(probes) > 1:
        return f"probes differ: {', '.join(sorted(map(str, probes)))}"
    before, after = _col(g, "forgetting.before"), _col(g, "forgetting.after")
    digits = 3 if after.abs().median() < 100 else 1
    return f"{value.median():+.3g} ({probes[0]} {before.median():.{digits}f} → {after.median():.{digits}f})"


def generation_tables(df: pd.DataFrame) -> list[Table]:
    """Per (model, task, budget) of generation-task runs (question -> worked solution -> final number, scored by greedy
    decoding): method, rank -> accuracy and its 95% interval, the untrained model's zero-shot (and k-shot) accuracy,
    the share of answers with no final number (zero-shot -> tuned), the gold solution's teacher-forced loss
    (zero-shot -> tuned), forgetting (the probe named), peak training memory, training tokens/s and MFU, generated
    tokens/s during the evaluation and trainable parameters. Never mixed with classification runs."""
    df = ok_frame(df)
    df = df[is_generation(df)]
    out = []
    for (model, task, _sig), part in df.groupby(["model", "task", "budget_sig"], sort=True, dropna=False):
        budget_desc = str(part["budget_desc"].iloc[0])
        shots = sorted({int(k) for k, a in zip(_col(part, "data.prompt.shots"), _col(part, "few_shot_metrics.accuracy"))
                        if pd.notna(k) and pd.notna(a) and k > 0})
        shot_header = [f"{shots[0]}-shot" if len(shots) == 1 else "k-shot"] if shots else []
        header = (["Method", "Rank", "Accuracy", "95% CI", "Zero-shot"] + shot_header
                  + ["No answer % (zero-shot → tuned)", "Gold-solution loss (zero-shot → tuned)", "Forgetting",
                     "Peak train memory (MiB)", "Train tokens/s", "MFU", "Generated tokens/s", "Trainable params",
                     "Runs"])
        varied_lr = part.groupby(["method", "method_label", "rank_key"])["lr"].nunique().max() > 1
        keys = ["method", "method_label", "rank_key"] + (["lr"] if varied_lr else [])
        rows, numbers = [], []
        for key, g in sorted(part.groupby(keys, dropna=False), key=lambda kv: (_method_sort_key(kv[0][0]), kv[0][1:])):
            method, label, rank = key[0], key[1], key[2]
            lr = key[3] if varied_lr else None
            ci_text, lo, hi = _ci_text(g)
            zero = _col(g, "zero_shot_metrics.accuracy") * 100
            few = _col(g, "few_shot_metrics.accuracy") * 100
            no_answer = _col(g, "metrics.no_answer_fraction") * 100
            zero_no_answer = _col(g, "zero_shot_metrics.no_answer_fraction") * 100
            loss, zero_loss = _col(g, "metrics.eval_loss"), _col(g, "zero_shot_metrics.eval_loss")
            mem = g["peak_train_memory_bytes"] / 2**20
            gen_rate = _col(g, "generation_eval.generated_tokens_per_s")
            rows.append([
                method_label(method, np.nan, lr, label), str(int(rank)) if rank >= 0 else DASH,
                fmt_mean_std(g["metric_pct"]), ci_text, _baseline_text(zero),
                *([_baseline_text(few)] if shots else []),
                _arrow(zero_no_answer, no_answer, 0), _arrow(zero_loss, loss, 3), _forgetting_text(g),
                fmt_mean_std(mem, 0), _fmt_rate(_col(g, "train_tokens_per_s")), fmt_mfu(g), _fmt_rate(gen_rate),
                fmt_params(g["trainable_params"].astype(float).median()), str(len(g)),
            ])
            numbers.append({
                "model": model, "task": task, "budget": budget_desc, "method": method, "method_label": label,
                "rank": rank if rank >= 0 else None, "lr": lr, "accuracy_pct_mean": g["metric_pct"].mean(),
                "ci95_low_pct": lo, "ci95_high_pct": hi, "examples": _col(g, "generation_eval.examples").median(),
                "zero_shot_pct_mean": zero.mean(), "few_shot_pct_mean": few.mean(),
                "shots": shots[0] if len(shots) == 1 else None, "no_answer_pct_mean": no_answer.mean(),
                "zero_shot_no_answer_pct_mean": zero_no_answer.mean(), "eval_loss_median": loss.median(),
                "zero_shot_eval_loss_median": zero_loss.median(),
                "forgetting_median": _col(g, "forgetting.forgetting").median(),
                "forgetting_probe": ", ".join(sorted(map(str, g["forgetting.probe"].dropna().unique())))
                if "forgetting.probe" in g else "",
                "peak_train_memory_mib_mean": mem.mean(),
                "train_tokens_per_s_median": _col(g, "train_tokens_per_s").median(),
                "train_mfu_median": _col(g, "train_flops.mfu_ratio").median(),
                "generated_tokens_per_s_median": gen_rate.median(),
                "trainable_params": g["trainable_params"].astype(float).median(), "runs": len(g),
            })
        examples = _col(part, "generation_eval.examples").dropna()
        rule = part["generation_eval.answer_rule"].dropna().unique() if "generation_eval.answer_rule" in part else []
        notes = [
            "Accuracy: x 100, the share of the "
            + (f"{int(examples.median())} " if examples.nunique() == 1 else "")
            + "test questions whose greedy answer's final number equals the gold one"
            + (f" (answer rule {', '.join(rule)})" if len(rule) else "")
            + "; no number read counts as wrong; mean ± std over seeds where a row has several runs. 95% CI: the "
            "run's Wilson interval over its questions, or with several runs the t-interval of their mean (cut to "
            "0-100).",
            "Zero-shot" + (f" and {shot_header[0]}" if shots else "") + ": the untrained model on the same questions"
            + (f", prompted with {shots[0]} solved training problems" if len(shots) == 1 else "")
            + ". No answer: the share of answers with no final number read. Gold-solution loss: the teacher-forced "
            "loss of the gold worked solution (nats per token), before training and after.",
            "Forgetting: the probe's score after − before for losses (before − after for scores): positive = ability "
            "lost; wiki: mean token cross-entropy on Wikipedia text, ppl: perplexity on held-out English.",
            "Generated tokens/s: tokens decoded in the final evaluation / its decoding time (all questions of a batch "
            "decode together). Trainable parameters: a causal LM has no task head, so all of them count.",
            MFU_NOTE,
        ]
        kinds = sorted(part["memory_kind"].dropna().unique())
        if kinds:
            notes.append(f"Memory: {', '.join(kinds)} during training"
                         + (" (whole process: model, data, Python; not comparable to GPU figures)."
                            if any("CPU" in k for k in kinds) else "."))
        data_notes = part["data.note"].dropna().unique() if "data.note" in part else []
        data_notes = [n for n in data_notes if str(n)]
        if data_notes:
            notes.append(f"Data: {'; '.join(map(str, data_notes))}.")
        if part.get("model_note") is not None and part["model_note"].notna().any():
            notes.append("Random-init test model: the metrics are meaningless.")
        title = f"Generation: {model} · {TASK_LABEL.get(task, task)} · budget {budget_desc}"
        out.append(Table(title, header, rows, set(), notes, pd.DataFrame(numbers)))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", default="results/runs")
    ap.add_argument("--out", help="folder for .md/.csv/.tex files (default: print Markdown only)")
    args = ap.parse_args(argv)
    df = collect(args.results)
    tables = method_task_tables(df) + rank_tables(df) + generation_tables(df)
    if not tables:
        raise SystemExit(f"no ok runs under {args.results}")
    for i, table in enumerate(tables):
        print(f"### {table.title}\n\n{table.markdown()}\n")
        if args.out:
            stem = ("rank" if table.title.startswith("Rank") else "generation" if table.title.startswith("Generation")
                    else "main") + f"_{i}"
            for path in table.write(Path(args.out), stem):
                print(f"wrote {path}")


if __name__ == "__main__":
    main()
