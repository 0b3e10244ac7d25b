"""Plots of a sweep (seaborn), each saved as PNG and SVG.

    python -m analysis.plots results/runs [--out results/report]

- metric_vs_params: dev metric vs trainable parameters (excl. head, log scale) with the Pareto front
  (configurations no other one beats with fewer parameters), one panel per task;
- metric_vs_memory: dev metric vs peak training memory;
- metric_vs_rank: dev metric vs rank per method, full fine-tuning as a dashed reference line;
- metric_vs_eval_rank: dev metric vs the rank a run was evaluated at, from one training run (DyLoRA's
  `rank_metrics`), LoRA runs trained at each rank as a dashed reference;
- intruders_vs_rank: intruder dimensions vs rank per method, full fine-tuning as a reference line (the title names
  the top-k and ε the counts were computed with);
- forgetting_vs_metric: forgetting (ability lost on the probe) vs dev metric;
- latency: inference latency p50 of the base model, the method unmerged and merged.
A plot whose data are absent is skipped with the reason printed (and returned).
Points are runs; lines and the Pareto front use the mean over seeds of each configuration.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from analysis.collect import collect
from analysis.tables import (
    METHOD_LABEL,
    METHOD_ORDER,
    METRIC_ABBR,
    TASK_LABEL,
    TASK_ORDER,
    chance_levels,
    intruder_settings_text,
    ok_frame,
)

MIB = 2**20
_PALETTE = sns.color_palette("tab20", len(METHOD_ORDER))
COLOR = {m: _PALETTE[i] for i, m in enumerate(METHOD_ORDER)}
FULL_COLOR = "0.25"


def _label(method: str) -> str:
    return METHOD_LABEL.get(method, method)


def _methods(df: pd.DataFrame) -> list[str]:
    present = set(df["method"])
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def _with_labels(df: pd.DataFrame) -> pd.DataFrame:
    """`method_label`: the run's configured label (tables.ok_frame; e.g. "LoRA (α=16)"), else the method's."""
    if "method_label" in df.columns and df["method_label"].notna().all():
        return df
    return df.assign(method_label=df["method"].map(_label))


def _arms(df: pd.DataFrame) -> list[str]:
    """The labels present, in display order: one per method, or one per configuration where runs of a method
    carry different labels (LoRA α=2r vs α=16)."""
    pairs = df[["method", "method_label"]].drop_duplicates().itertuples(index=False)
    order = {m: i for i, m in enumerate(_methods(df))}
    return [label for _, label in sorted(pairs, key=lambda p: (order[p[0]], p[1]))]


def _palette(df: pd.DataFrame) -> dict[str, tuple]:
    """A colour per label: the method's own for its first label, distinct ones for its other labels."""
    labels = _arms(df)
    extra = sns.color_palette("husl", len(labels))
    method_of = dict(zip(df["method_label"], df["method"]))
    out, coloured = {}, set()
    for i, label in enumerate(labels):
        method = method_of[label]
        out[label] = COLOR.get(method, extra[i]) if method not in coloured else extra[i]
        coloured.add(method)
    return out


def _tasks(df: pd.DataFrame) -> list[str]:
    return sorted(df["task"].unique(), key=lambda t: TASK_ORDER.index(t) if t in TASK_ORDER else 99)


def _metric_label(df: pd.DataFrame, task: str) -> str:
    metric = df.loc[df["task"] == task, "main_metric"].iloc[0]
    return f"{TASK_LABEL.get(task, task)}: dev {METRIC_ABBR.get(metric, metric)} (x 100)"


def _save(fig, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / f"{name}.png", dpi=130, bbox_inches="tight")
    fig.savefig(out_dir / f"{name}.svg", bbox_inches="tight")
    plt.close(fig)
    return out_dir / f"{name}.png"


def _panels(n: int, width: float = 5.2, height: float = 4.0):
    fig, axes = plt.subplots(1, n, figsize=(width * n + 1.8, height), squeeze=False)
    return fig, list(axes[0])


def _legend_outside(fig, axes, title: str = "Method") -> None:
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
        if ax.get_legend():
            ax.get_legend().remove()
    fig.legend(
        [handles[lab] for lab in labels],
        labels,
        title=title,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        frameon=False,
    )


def _config_means(df: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Mean over seeds per configuration (method and its label, rank, lr)."""
    keys = ["method", "rank_key", "lr"]
    if "method_label" in df.columns:
        keys.insert(1, "method_label")
    return df.groupby(keys, dropna=False)[[x, y]].mean().reset_index()


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Points not dominated by another with smaller-or-equal x and larger y (minimise x, maximise y)."""
    best, keep = -np.inf, []
    for idx, row in points.sort_values([x, y], ascending=[True, False]).iterrows():
        if row[y] > best:
            keep.append(idx)
            best = row[y]
    return points.loc[keep]


def _chance_line(ax, df: pd.DataFrame, task: str) -> None:
    """Dotted line at what a model that learned nothing scores (majority class; 0 for correlations)."""
    part = df[df["task"] == task]
    level = chance_levels(part).get(task)
    lo, hi = ax.get_ylim()
    if level is not None and lo - 5 <= level <= hi:  # far below the data it would only squash the plot
        ax.axhline(level, ls=":", color="0.5", lw=1.2, label="chance (majority class)")


def _min_span(ax, axis: str = "y", span: float = 5.0) -> None:
    """Widen an axis to at least `span` units so that tiny differences do not fill the whole plot."""
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    if hi - lo < span:
        mid = (lo + hi) / 2
        (ax.set_ylim if axis == "y" else ax.set_xlim)(mid - span / 2, mid + span / 2)


def _annotate_ranks(ax, df: pd.DataFrame, x: str, y: str, methods: tuple[str, ...] = ("lora",)) -> None:
    """Label the configuration means of the given methods with their rank (few labels, readable)."""
    means = _config_means(df[df["method"].isin(methods)], x, y) if len(df) else df
    for _, row in means.iterrows():
        if row["rank_key"] >= 0 and np.isfinite(row[x]) and np.isfinite(row[y]):
            ax.annotate(
                f"r={int(row['rank_key'])}",
                (row[x], row[y]),
                textcoords="offset points",
                xytext=(4, 3),
                fontsize=7,
                color="0.3",
            )


def _method_scatter(ax, df: pd.DataFrame, part: pd.DataFrame, x: str) -> None:
    """Dev metric (y) against `x` for the runs in `part`, one colour per method, the same across panels."""
    sns.scatterplot(data=part, x=x, y="metric_pct", hue="method_label", palette=_palette(df),
                    hue_order=_arms(df), s=60, ax=ax)


def metric_vs_params(df: pd.DataFrame, out_dir: Path, name: str = "metric_vs_params") -> Path | str:
    df = df[df["trainable_params_excl_head"].astype(float) > 0]
    if df.empty:
        return "no ok runs with trainable parameters outside the head"
    df = _with_labels(df)
    tasks = _tasks(df)
    fig, axes = _panels(len(tasks))
    for ax, task in zip(axes, tasks):
        part = df[df["task"] == task]
        _method_scatter(ax, df, part, "trainable_params_excl_head")
        front = pareto_front(
            _config_means(part, "trainable_params_excl_head", "metric_pct"),
            "trainable_params_excl_head",
            "metric_pct",
        )
        ax.plot(
            front["trainable_params_excl_head"],
            front["metric_pct"],
            "--",
            color="0.4",
            lw=1,
            drawstyle="steps-post",
            marker="o",
            mfc="none",
            mec="0.2",
            ms=11,
            label="Pareto front",
            zorder=0,
        )
        _annotate_ranks(ax, front, "trainable_params_excl_head", "metric_pct", tuple(front["method"]))
        ax.set_xscale("log")
        _chance_line(ax, df, task)
        _min_span(ax, "y", 5.0)
        ax.set_xlabel("Trainable parameters, excl. task head (count, log scale)")
        ax.set_ylabel(_metric_label(df, task))
        ax.set_title(TASK_LABEL.get(task, task))
    _legend_outside(fig, axes)
    fig.suptitle("Dev metric vs trainable parameters (dashed: Pareto front of configuration means)", y=1.02)
    return _save(fig, out_dir, name)


def metric_vs_memory(df: pd.DataFrame, out_dir: Path, name: str = "metric_vs_memory") -> Path | str:
    df = df[df["peak_train_memory_bytes"].notna()]
    if df.empty:
        return "no run recorded its peak training memory"
    kinds = ", ".join(sorted(df["memory_kind"].dropna().unique()))
    df = _with_labels(df).assign(memory_mib=df["peak_train_memory_bytes"] / MIB)
    tasks = _tasks(df)
    fig, axes = _panels(len(tasks))
    for ax, task in zip(axes, tasks):
        _method_scatter(ax, df, df[df["task"] == task], "memory_mib")
        _annotate_ranks(ax, df[df["task"] == task], "memory_mib", "metric_pct")
        _chance_line(ax, df, task)
        _min_span(ax, "y", 5.0)
        ax.set_xlabel(f"Peak training memory, MiB ({kinds})")
        ax.set_ylabel(_metric_label(df, task))
        ax.set_title(TASK_LABEL.get(task, task))
    _legend_outside(fig, axes)
    fig.suptitle("Dev metric vs peak training memory", y=1.02)
    return _save(fig, out_dir, name)


def _vs_rank(
    df: pd.DataFrame, y: str, ylabel, title: str, out_dir: Path, name: str, reference: str = "full"
) -> Path | str:
    ranked = df[(df["rank_key"] >= 0) & df[y].notna()]
    if ranked.empty:
        return f"no runs with a rank and a value for {y}"
    if ranked.groupby("method")["rank_key"].nunique().max() < 2:
        return "no method was run at two or more ranks"
    ranked = _with_labels(ranked)
    ref = df[(df["method"] == reference) & df[y].notna()]
    tasks = _tasks(ranked)
    fig, axes = _panels(len(tasks))
    for ax, task in zip(axes, tasks):
        part = ranked[ranked["task"] == task]
        sns.lineplot(
            data=part,
            x="rank_key",
            y=y,
            hue="method_label",
            palette=_palette(ranked),
            hue_order=_arms(ranked),
            marker="o",
            errorbar="sd",
            ax=ax,
        )
        r = ref[ref["task"] == task][y]
        if not r.empty:
            ax.axhline(r.mean(), ls="--", color=FULL_COLOR, lw=1.2, label=f"{_label(reference)} (no rank)")
        ax.set_xscale("log", base=2)
        ranks = sorted(part["rank_key"].unique())
        ax.set_xticks(ranks, [str(int(v)) for v in ranks])
        if y == "metric_pct":
            _chance_line(ax, df, task)
            _min_span(ax, "y", 5.0)
        else:
            lo, hi = ax.get_ylim()
            ax.set_ylim(min(lo, -0.5), max(hi, 5.0))
        ax.set_xlabel("Rank (LoRA r / target rank / width; log scale)")
        ax.set_ylabel(ylabel(task) if callable(ylabel) else ylabel)
        ax.set_title(TASK_LABEL.get(task, task))
    _legend_outside(fig, axes)
    fig.suptitle(title, y=1.02)
    return _save(fig, out_dir, name)


def metric_vs_rank(df: pd.DataFrame, out_dir: Path, name: str = "metric_vs_rank") -> Path | str:
    return _vs_rank(
        df,
        "metric_pct",
        lambda t: _metric_label(df, t),
        "Dev metric vs rank (mean ± sd over seeds; dashed: full fine-tuning)",
        out_dir,
        name,
    )


def rank_metrics_long(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, evaluated rank) from the records' `rank_metrics` (flattened as `rank_metrics.<rank>.<metric>`):
    columns run_id, task, method, method_label, seed, max_rank, eval_rank, metric_pct (the run's main metric x 100)."""
    rows = []
    for _, run in _with_labels(df).iterrows():
        for col in df.columns:
            parts = col.split(".")
            if len(parts) == 3 and parts[0] == "rank_metrics" and parts[2] == run.get("main_metric") \
                    and pd.notna(run[col]):
                rows.append({"run_id": run["run_id"], "task": run["task"], "method": run["method"],
                             "method_label": run["method_label"], "seed": run["seed"], "max_rank": run["rank"],
                             "eval_rank": int(parts[1]), "metric_pct": float(run[col]) * 100})
    return pd.DataFrame(rows)


def metric_vs_eval_rank(df: pd.DataFrame, out_dir: Path, name: str = "metric_vs_eval_rank") -> Path | str:
    """Dev metric against the rank each run was evaluated at after one training run (records with `rank_metrics`:
    DyLoRA), one line per run; LoRA runs trained at each rank, where present, as a dashed reference."""
    long = rank_metrics_long(df)
    if long.empty:
        return "no run evaluated at several ranks (records with rank_metrics: DyLoRA)"
    long["run"] = long.apply(lambda r: f"{r['method_label']} r_max={int(r['max_rank'])} s{r['seed']}", axis=1)
    lora = df[(df["method"] == "lora") & (df["rank_key"] >= 0) & df["metric_pct"].notna()] \
        if "rank_key" in df.columns else df.iloc[0:0]
    tasks = _tasks(long)
    fig, axes = _panels(len(tasks))
    for ax, task in zip(axes, tasks):
        part = long[long["task"] == task]
        sns.lineplot(data=part, x="eval_rank", y="metric_pct", hue="run", marker="o", ax=ax)
        ref = lora[lora["task"] == task]
        if not ref.empty:
            means = ref.groupby("rank_key")["metric_pct"].mean()
            ax.plot(means.index, means.values, ls="--", marker="s", color=COLOR.get("lora", FULL_COLOR),
                    label="LoRA trained at each rank (mean over seeds)")
        ranks = sorted(set(part["eval_rank"]) | set(ref["rank_key"].astype(int)))
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(int(v)) for v in ranks])
        _chance_line(ax, df, task)
        _min_span(ax, "y", 5.0)
        ax.set_xlabel("Rank evaluated at (the adapter truncated to its first r components; log scale)")
        ax.set_ylabel(_metric_label(df, task))
        ax.set_title(TASK_LABEL.get(task, task))
    _legend_outside(fig, axes, title="Run")
    fig.suptitle("Dev metric vs evaluated rank, each line one training run", y=1.02)
    return _save(fig, out_dir, name)


def intruders_vs_rank(df: pd.DataFrame, out_dir: Path, name: str = "intruders_vs_rank") -> Path | str:
    if df["intruders"].notna().sum() == 0:
        return (
            "no intruder analysis (run python -m analysis.analyse, or the report, on runs with saved weights)"
        )
    return _vs_rank(
        df,
        "intruders",
        "Intruder dimensions (count)",
        f"Intruder dimensions vs rank ({intruder_settings_text(df)}, summed over all layers; dashed: full FT)",
        out_dir,
        name,
    )


def forgetting_vs_metric(df: pd.DataFrame, out_dir: Path, name: str = "forgetting_vs_metric") -> Path | str:
    df = df[df["forgetting_value"].notna()]
    if df.empty:
        return "no run measured forgetting (run with forgetting=sts)"
    probes = ", ".join(sorted(df["forgetting.probe"].dropna().unique()))
    metric = ", ".join(sorted(df["forgetting.metric"].dropna().unique()))
    df = _with_labels(df).assign(forgetting_pts=df["forgetting_value"] * 100)
    tasks = _tasks(df)
    fig, axes = _panels(len(tasks))
    for ax, task in zip(axes, tasks):
        _method_scatter(ax, df, df[df["task"] == task], "forgetting_pts")
        _annotate_ranks(ax, df[df["task"] == task], "forgetting_pts", "metric_pct")
        ax.axvline(0, color="0.6", lw=0.8)
        _chance_line(ax, df, task)
        _min_span(ax, "y", 5.0)
        _min_span(ax, "x", 2.0)
        ax.set_xlabel(f"Forgetting ({probe_label(probes, metric)}, ability lost, x 100)")
        ax.set_ylabel(_metric_label(df, task))
        ax.set_title(TASK_LABEL.get(task, task))
    _legend_outside(fig, axes)
    fig.suptitle("Task metric vs forgetting (right of 0: ability lost)", y=1.02)
    return _save(fig, out_dir, name)


def probe_label(probes: str, metric: str) -> str:
    return {"sts": "zero-shot STS-B Spearman", "mlm": "MLM loss", "ppl": "perplexity",
            "wiki": "Wikipedia cross-entropy"}.get(probes, metric)


def latency(df: pd.DataFrame, out_dir: Path, name: str = "latency") -> Path | str:
    cols = {
        "base": "latency.base.p50_ms",
        "unmerged": "latency.unmerged.p50_ms",
        "merged": "latency.merged.p50_ms",
    }
    if cols["base"] not in df.columns or df[cols["base"]].isna().all():
        return "no run measured latency"
    rows = []
    for _, r in df.iterrows():
        label = _label(r["method"]) + (f" r={int(r['rank_key'])}" if r["rank_key"] >= 0 else "")
        for variant, col in cols.items():
            if col in df.columns and pd.notna(r.get(col)):
                rows.append(
                    {
                        "config": label,
                        "method": r["method"],
                        "rank_key": r["rank_key"],
                        "variant": variant,
                        "p50_ms": r[col],
                    }
                )
    long = pd.DataFrame(rows)
    order = (
        long[["config", "method", "rank_key"]]
        .drop_duplicates()
        .assign(o=lambda d: d["method"].map(lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99))
        .sort_values(["o", "rank_key"])["config"]
        .tolist()
    )
    fig, ax = plt.subplots(figsize=(max(7.0, 0.6 * len(order) + 3), 4.5))
    sns.barplot(
        data=long,
        x="config",
        y="p50_ms",
        hue="variant",
        order=order,
        hue_order=[v for v in cols if v in set(long["variant"])],
        errorbar=("pi", 100),
        palette={"base": "0.7", "unmerged": "#d95f02", "merged": "#1b9e77"},
        ax=ax,
    )
    shape = ""
    if "latency.batch_size" in df.columns:
        shape = (
            f"batch {int(df['latency.batch_size'].iloc[0])} x {int(df['latency.seq_len'].iloc[0])} tokens, "
        )
    device = df["provenance.device"].iloc[0] if "provenance.device" in df.columns else ""
    ax.set_ylabel("Forward latency p50 (ms per batch)")
    ax.set_xlabel("")
    ax.tick_params(axis="x", rotation=40)
    plt.setp(ax.get_xticklabels(), ha="right")
    ax.legend(title="Model variant", frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(
        f"Inference latency ({shape}{device})\nbars: mean over runs; whiskers: min–max over runs", fontsize=10
    )
    return _save(fig, out_dir, name)


def rank_lab(curves: pd.DataFrame, out_dir: Path, name: str = "rank_lab") -> Path | str:
    """Relative Frobenius error of the best rank-r approximation of ΔW (whole model) vs r, one line per run.
    `curves`: columns label, method, rank (r), relative_error."""
    if curves.empty:
        return "no analysed run (needs saved weights of a method that changes W)"
    if "full" not in set(curves["method"]):
        note = " (no full fine-tuning run analysed)"
    else:
        note = ""
    labels = curves[["label", "method"]].drop_duplicates()
    palette = {}
    for method, group in labels.groupby("method"):
        shades = sns.light_palette(COLOR.get(method, "0.3"), n_colors=len(group) + 2)[2:]
        palette.update({lab: shades[i] for i, lab in enumerate(group["label"])})
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    sns.lineplot(data=curves, x="rank", y="relative_error", hue="label", palette=palette, ax=ax, lw=1.6)
    ax.set_xscale("log", base=2)
    ticks = [r for r in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if r <= curves["rank"].max()]
    ax.set_xticks(ticks, [str(r) for r in ticks])
    ax.set_xlabel("Rank r of the approximation (log scale)")
    ax.set_ylabel("‖ΔW − ΔW_r‖_F / ‖ΔW‖_F (all layers)")
    ax.set_ylim(0, 1.02)
    ax.legend(title="Run", frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    ax.set_title("Rank lab: how well a rank-r update reproduces each run's ΔW" + note, fontsize=10)
    return _save(fig, out_dir, name)


PLOTS = {
    "metric_vs_params": metric_vs_params,
    "metric_vs_memory": metric_vs_memory,
    "metric_vs_rank": metric_vs_rank,
    "metric_vs_eval_rank": metric_vs_eval_rank,
    "intruders_vs_rank": intruders_vs_rank,
    "forgetting_vs_metric": forgetting_vs_metric,
    "latency": latency,
}


def make_all(df: pd.DataFrame, out_dir: Path, suffix: str = "") -> dict[str, Path | str]:
    """Every plot for one group of ok runs: {name: PNG path, or the reason it was skipped}."""
    df = ok_frame(df) if "rank_key" not in df.columns else df
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.95)
    out = {}
    for name, fn in PLOTS.items():
        if df.empty:
            out[name] = "no ok runs"
            continue
        out[name] = fn(df, out_dir, name + suffix)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", default="results/runs")
    ap.add_argument("--out", default="results/report")
    args = ap.parse_args(argv)
    df = ok_frame(collect(args.results))
    for (model, sig), part in df.groupby(["model", "budget_sig"], dropna=False):
        suffix = "" if df.groupby(["model", "budget_sig"]).ngroups == 1 else f"_{model}_{sig}"
        for name, res in make_all(part, Path(args.out), suffix).items():
            print(f"{name}: {res if isinstance(res, Path) else 'skipped: ' + res}")


if __name__ == "__main__":
    main()
