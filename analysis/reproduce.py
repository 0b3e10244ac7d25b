"""Our runs beside a published table: per cell (or experiment) our value, the published one, the difference, our
uncertainty and a verdict; the protocol deviations above the table.

    python -m analysis.reproduce results/lora_table2 --table lora-table2 [--out reproduce.md] [--tolerance 1.0]
    python -m analysis.reproduce results/peft_metamathqa --table peft-metamathqa

The published figures, their sources and the protocol behind them live in `analysis/published/<table>.yaml`. Its
`layout` says what kind of table it is:

- `method_x_task` (the default; `lora-table2`): a paper's method x task table over classification tasks, several
  seeds. This module compares it, below.
- `experiments` (`peft-metamathqa`): one row per experiment with several measures on one generation task, one run
  each; `analysis.reproduce_experiments` compares it with our generation runs.

A method x task table, per (model, budget) group of ok runs of classification tasks and per published cell (a row's
method x a task):

- ours: the statistic the paper used over seeds (`protocol.statistic`, the LoRA paper: median), of the task's
  main metric x 100, with n and a 95% t-interval for the mean (scipy; n=1: no interval);
- diff = ours - published;
- verdict: `reproduced` when |diff| <= max(`tolerance_points`, 2 x the published ±), else `not reproduced
  (below)` / `(above)`; `not run` when the group has no ok run of that method on that task (or the suite has no
  such method); `not judged (model differs)` when the runs' model is not the paper's, and `not judged (data
  sample)` when the task's training rows are an offline sample. Those cells still show the figures.
- A row with a rank (LoRA r=8) uses our runs at that rank, or else at the nearest rank we have (named in the
  deviations). Several configurations of one method and task (an lr sweep): the one with the best value counts,
  as the paper picked its lr by a sweep; the deviations say so.
- Orderings: per task, the rows that have both a published and our value ranked both ways, with Kendall's tau
  (scipy); and the same for the average over the tasks all of those rows have.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from analysis import reproduce_experiments as experiments
from analysis.collect import load_records, to_frame
from analysis.reproduce_experiments import ExperimentReproduction, PublishedExperiments
from analysis.tables import TASK_LABEL, TASK_ORDER, Table, is_generation, method_label, ok_frame, t_interval
from bench import BenchError

PUBLISHED_DIR = Path(__file__).resolve().parent / "published"
GLUE_TABLE, GENERATION_TABLE = "lora-table2", "peft-metamathqa"  # the report's choice for each kind of run
REPRODUCED = "reproduced"
NOT_RUN = "not run"
MODEL_DIFFERS = "not judged (model differs)"
DATA_SAMPLE = "not judged (data sample)"
# record fields the deviations need beyond analysis.collect's table (the effective config is not in it): their path
# in the effective config
_EFFECTIVE = {
    "eff.batch_size": ("budget", "batch_size"),
    "eff.grad_accum_steps": ("budget", "grad_accum_steps"),
    "eff.epochs": ("budget", "epochs"),
    "eff.max_steps": ("budget", "max_steps"),
    "eff.max_seq_len": ("budget", "max_seq_len"),
    "eff.keep_best": ("budget", "keep_best"),
    "eff.validation_rows": ("budget", "validation_rows"),
    "eff.lr_schedule": ("budget", "lr_schedule"),
    "eff.max_grad_norm": ("budget", "max_grad_norm"),
    "eff.warmup_ratio": ("method", "warmup_ratio"),
    "eff.weight_decay": ("method", "weight_decay"),
    "eff.dropout": ("method", "dropout"),
    "eff.precision": ("precision",),
    "eff.prompt_template": ("task", "prompt", "template"),
}


def _t(task: str) -> str:
    return TASK_LABEL.get(task, task)


@dataclass(frozen=True)
class PublishedRow:
    label: str
    method: str | None
    values: dict[str, float]
    pm: dict[str, float] = field(default_factory=dict)
    rank: int | None = None
    avg: float | None = None
    trainable_params: str = ""
    note: str = ""
    checked: bool = False
    checked_against: tuple[str, ...] = ()


@dataclass(frozen=True)
class Published:
    id: str
    version: int
    title: str
    source: dict
    checked: dict
    model: str
    metrics: dict
    tolerance_points: float
    protocol: dict
    notes: tuple[str, ...]
    rows: tuple[PublishedRow, ...]
    path: Path

    @property
    def tasks(self) -> list[str]:
        names = {t for r in self.rows for t in r.values}
        return sorted(names, key=lambda t: TASK_ORDER.index(t) if t in TASK_ORDER else 99)

    def source_line(self) -> str:
        s = self.source
        parts = [s.get("paper", ""), f"arXiv:{s['arxiv']}" if s.get("arxiv") else "", s.get("table", ""),
                 f"p. {s['page']}" if s.get("page") else ""]
        line = ", ".join(p for p in parts if p)
        if s.get("repository_file"):
            line += f"; {s['repository_file']}"
        return line


def available() -> dict[str, Path]:
    """{table id: file} of the published tables."""
    out = {}
    for path in sorted(PUBLISHED_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        out[str(data.get("id", path.stem))] = path
    return out


def load_published(name: str) -> Published | PublishedExperiments:
    """A published table by id (`lora-table2`, `peft-metamathqa`) or path; BenchError naming the choices."""
    tables = available()
    path = Path(name) if Path(name).suffix in (".yaml", ".yml") else tables.get(name)
    if path is None or not path.is_file():
        raise BenchError(f"unknown published table {name!r}; choose one of: {', '.join(tables) or '(none)'}")
    data = yaml.safe_load(path.read_text())
    layout = data.get("layout", "method_x_task")
    if layout == experiments.LAYOUT:
        return experiments.from_yaml(data, path)
    if layout != "method_x_task":
        raise BenchError(f"{path}: unknown layout {layout!r}; choose method_x_task or {experiments.LAYOUT}")
    rows = tuple(
        PublishedRow(
            label=r["label"], method=r.get("method"), values={k: float(v) for k, v in r["values"].items()},
            pm={k: float(v) for k, v in (r.get("pm") or {}).items()}, rank=r.get("rank"), avg=r.get("avg"),
            trainable_params=str(r.get("trainable_params", "")), note=r.get("note", ""),
            checked=bool(r.get("checked")), checked_against=tuple(r.get("checked_against") or ()),
        )
        for r in data["rows"]
    )
    return Published(
        id=str(data["id"]), version=int(data.get("version", 1)), title=data["title"], source=data.get("source", {}),
        checked=data.get("checked", {}), model=data["model"], metrics=data.get("metrics", {}),
        tolerance_points=float(data.get("tolerance_points", 1.0)), protocol=data.get("protocol", {}),
        notes=tuple(data.get("notes") or ()), rows=rows, path=path,
    )


def _effective(rec: dict, path: tuple[str, ...]):
    value = rec.get("effective_config") or {}
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def frame(records: list[dict]) -> pd.DataFrame:
    """analysis.collect's table plus the effective-config fields the deviations compare (`eff.*`)."""
    df = to_frame(records)
    for col, path in _EFFECTIVE.items():
        df[col] = [_effective(r, path) for r in records]
    return df


def _nearest_rank(wanted: int, have: list[float]) -> float:
    """The rank in `have` closest to `wanted` on a log scale (ties: the larger)."""
    return min(have, key=lambda r: (abs(math.log2(r) - math.log2(wanted)), -r))


@dataclass
class Reproduction:
    published: Published
    model: str | None
    budget_desc: str
    deviations: list[str]
    cells: pd.DataFrame
    orderings: pd.DataFrame
    tolerance_points: float

    @property
    def model_differs(self) -> bool:
        return self.model is not None and self.model != self.published.model

    def verdicts(self) -> dict[tuple[str, str], str]:
        """{(published row label, task): verdict}."""
        return {(r.row, r.task): r.verdict for r in self.cells.itertuples()}

    def cell_table(self) -> Table:
        header = ["Method (paper)", "Ours", "Task", "Published", "Ours: value (n)", "95% CI", "Diff",
                  "Tolerance", "Verdict"]
        rows = []
        for r in self.cells.itertuples():
            pub = f"{r.published:.1f}" + (f" ± {r.published_pm:.1f}" if np.isfinite(r.published_pm) else "")
            ours = f"{r.ours:.1f} (n={r.n})" if r.n else "–"
            ci = f"{r.ci_low:.1f} – {r.ci_high:.1f}" if np.isfinite(r.ci_low) else ("n=1" if r.n == 1 else "–")
            diff = f"{r.diff:+.1f}" if np.isfinite(r.diff) else "–"
            rows.append([r.row, r.ours_label or "–", _t(r.task), pub, ours, ci, diff, f"±{r.tolerance:.1f}",
                         r.verdict])
        return Table(f"Reproduction: {self.published.title}", header, rows)

    def ordering_table(self) -> Table:
        header = ["Tasks", "Methods compared", "Paper's order", "Our order", "Kendall τ"]
        rows = [[r.scope, str(r.n), r.published_order, r.our_order,
                 f"{r.tau:+.2f}" if np.isfinite(r.tau) else "n/a"] for r in self.orderings.itertuples()]
        return Table("Method orderings", header, rows)

    def summary(self) -> str:
        counts = self.cells["verdict"].value_counts()
        return ", ".join(f"{n} {v}" for v, n in counts.items())

    def markdown(self) -> str:
        pub = self.published
        lines = [
            f"## Reproduction: {pub.title}",
            "",
            f"Published figures: `{_rel(pub.path)}` (version {pub.version}). Source: {pub.source_line()}.",
            "",
            f"Our runs: model `{self.model or '(none)'}`, budget {self.budget_desc or '(none)'}. "
            f"Verdicts: {self.summary()}.",
            "",
        ]
        if self.model_differs:
            lines += [f"> **The model differs from the paper's**: these runs use `{self.model}`, the paper "
                      f"`{pub.model}`. The values are not judged against the paper's; the method orderings below "
                      "are the comparison that carries over.", ""]
        lines += ["### Deviations from the paper's protocol", ""]
        lines += [f"- {d}" for d in self.deviations] or ["- none found"]
        lines += ["", "### Cells", "", self.cell_table().markdown(), ""]
        lines += [
            f"Ours: the {pub.protocol.get('statistic', 'median')} over seeds of the dev metric x 100 (the paper's "
            f"statistic); 95% CI: t-interval for the mean over seeds. Reproduced: |diff| ≤ max("
            f"{self.tolerance_points:g} point, 2 x the published ±).",
            "",
        ]
        if not self.orderings.empty:
            lines += ["### Method orderings", "", self.ordering_table().markdown(), "",
                      "Kendall's τ between the paper's values and ours over the methods both have (1: same order; "
                      "−1: reversed; n/a below two methods or with ties throughout).", ""]
        lines += ["### Notes on the published figures", ""] + [f"- {n}" for n in pub.notes] + [""]
        return "\n".join(lines)


def _rel(path: Path) -> str:
    root = Path(__file__).resolve().parent.parent
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _statistic(values: np.ndarray, name: str) -> float:
    return float(np.median(values) if name == "median" else np.mean(values))


def _pick_runs(part: pd.DataFrame, row: PublishedRow, task: str, statistic: str, notes: dict[str, str]
               ) -> tuple[pd.DataFrame, str]:
    """The runs that stand for `row` on `task` (see the module docstring) and their label."""
    runs = part[(part["method"] == row.method) & (part["task"] == task)]
    if runs.empty:
        return runs, ""
    if row.rank is not None and (runs["rank_key"] >= 0).any():
        have = sorted(runs.loc[runs["rank_key"] >= 0, "rank_key"].unique())
        use = float(row.rank) if float(row.rank) in have else _nearest_rank(int(row.rank), have)
        if use != row.rank:
            notes[f"rank:{row.label}:{int(use)}"] = (
                f"{row.label}: the paper's r={row.rank} is compared with our r={int(use)} "
                f"(no r={row.rank} run; ranks run: {', '.join(str(int(r)) for r in have)})")
        runs = runs[runs["rank_key"] == use]
    groups = runs.groupby("config_group", dropna=False) if "config_group" in runs else [(None, runs)]
    groups = list(groups)
    if len(groups) > 1:
        best_key, runs = max(groups, key=lambda kv: _statistic(kv[1]["metric_pct"].to_numpy(float), statistic))
        lrs = sorted({f"{v:g}" for v in pd.concat([g["lr"] for _, g in groups]).dropna()})
        notes[f"configs:{row.label}:{task}"] = (
            f"{row.label} on {_t(task)}: {len(groups)} configurations ran (lr {', '.join(lrs) or '?'}); the best "
            f"{statistic} counts (lr {runs['lr'].iloc[0]:g}), as the paper picked its lr by a sweep")
    first = runs.iloc[0]
    label = method_label(first["method"], first["rank_key"] if first["rank_key"] >= 0 else np.nan, None,
                         first.get("method_label"))
    return runs, label


def _cells(part: pd.DataFrame, pub: Published, tol_points: float, model_differs: bool, sampled: set[str],
           notes: dict[str, str]) -> pd.DataFrame:
    statistic = pub.protocol.get("statistic", "median")
    out = []
    for row in pub.rows:
        for task in pub.tasks:
            if task not in row.values:
                continue
            published, pm = row.values[task], row.pm.get(task, math.nan)
            tol = max(tol_points, 2 * pm) if np.isfinite(pm) else tol_points
            cell = {"row": row.label, "method": row.method, "task": task, "published": published,
                    "published_pm": pm, "tolerance": tol, "ours_label": "", "n": 0, "ours": math.nan,
                    "mean": math.nan, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan, "diff": math.nan}
            if row.method is None:
                cell["verdict"] = f"{NOT_RUN} (no such method here)"
                out.append(cell)
                continue
            runs, label = _pick_runs(part, row, task, statistic, notes) if not part.empty else (part, "")
            values = runs["metric_pct"].dropna().to_numpy(float) if not runs.empty else np.array([])
            if len(values) == 0:
                cell["verdict"] = NOT_RUN
                out.append(cell)
                continue
            ours = _statistic(values, statistic)
            lo, hi = t_interval(values)
            diff = ours - published
            if model_differs:
                verdict = MODEL_DIFFERS
            elif task in sampled:
                verdict = DATA_SAMPLE
            elif abs(diff) <= tol + 1e-9:
                verdict = REPRODUCED
            else:
                verdict = "not reproduced (" + ("below" if diff < 0 else "above") + ")"
            cell.update(ours_label=label, n=len(values), ours=ours, mean=float(values.mean()),
                        std=float(values.std(ddof=1)) if len(values) > 1 else math.nan, ci_low=lo, ci_high=hi,
                        diff=diff, verdict=verdict)
            out.append(cell)
    return pd.DataFrame(out)


def _order(values: dict[str, float]) -> str:
    return " > ".join(k for k, _ in sorted(values.items(), key=lambda kv: -kv[1]))


def _tau(a: list[float], b: list[float]) -> float:
    if len(a) < 2:
        return math.nan
    return float(stats.kendalltau(a, b).statistic)


def orderings(cells: pd.DataFrame) -> pd.DataFrame:
    """Per task and over the average: the paper's order of the rows vs ours, with Kendall's tau."""
    have = cells[cells["n"] > 0]
    rows = []
    for task, part in have.groupby("task", sort=False):
        if len(part) < 2:
            continue
        pub = dict(zip(part["row"], part["published"]))
        ours = dict(zip(part["row"], part["ours"]))
        rows.append({"scope": _t(task), "n": len(part), "published_order": _order(pub), "our_order": _order(ours),
                     "tau": _tau(list(pub.values()), [ours[k] for k in pub])})
    wide = have.pivot_table(index="row", columns="task", values=["published", "ours"])
    if not wide.empty:
        complete = wide["ours"].dropna(axis=1, how="any").columns
        if len(complete) >= 2 and len(wide) >= 2:
            pub = wide["published"][complete].mean(axis=1).to_dict()
            ours = wide["ours"][complete].mean(axis=1).to_dict()
            rows.append({"scope": "average of " + ", ".join(_t(t) for t in complete), "n": len(pub),
                         "published_order": _order(pub), "our_order": _order(ours),
                         "tau": _tau(list(pub.values()), [ours[k] for k in pub])})
    return pd.DataFrame(rows, columns=["scope", "n", "published_order", "our_order", "tau"])


def _fmt_set(values) -> str:
    vals = sorted({v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))}, key=str)
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in vals) or "?"


def deviations(part: pd.DataFrame, pub: Published, model: str | None, sampled: set[str]) -> list[str]:
    """What differs between these runs and the paper's protocol, one line each."""
    proto = pub.protocol
    out = []
    if model is None:
        return ["no ok runs: nothing ran"]
    if model != pub.model:
        out.append(f"model: `{model}`, not the paper's `{pub.model}`")
    if "model_note" in part and part["model_note"].notna().any():
        out.append(f"model: {part['model_note'].dropna().iloc[0]}")
    for task in sorted(sampled, key=lambda t: TASK_ORDER.index(t) if t in TASK_ORDER else 99):
        note = part.loc[(part["task"] == task) & part["data.note"].notna(), "data.note"].iloc[0]
        out.append(f"data: {_t(task)}: {note}")
    missing = [t for t in pub.tasks if t not in set(part["task"])]
    if missing:
        out.append(f"tasks not run: {', '.join(_t(t) for t in missing)}")
    epochs, batch = proto.get("epochs", {}), proto.get("batch_size", {})
    for task, g in sorted(part.groupby("task"), key=lambda kv: TASK_ORDER.index(kv[0]) if kv[0] in TASK_ORDER else 99):
        if task not in pub.tasks:
            continue
        steps = g["train.steps"].median() if "train.steps" in g else math.nan
        rows = g["data.train_rows"].median() if "data.train_rows" in g else math.nan
        b = g["eff.batch_size"].median() * g["eff.grad_accum_steps"].fillna(1).median()
        ours_epochs = steps * b / rows if rows and np.isfinite(rows) and np.isfinite(steps) else math.nan
        paper = f"{epochs[task]} epochs at batch {batch.get(task, '?')}" if task in epochs else "?"
        text = (f"steps: {_t(task)}: {steps:,.0f} optimiser steps at batch {b:g} over {rows:,.0f} training rows "
                f"({ours_epochs:.3g} epoch(s)); the paper: {paper}")
        if task in epochs and np.isfinite(ours_epochs) and abs(ours_epochs - epochs[task]) / epochs[task] < 0.05 \
                and int(b) == int(batch.get(task, -1)):
            continue  # matches the protocol
        out.append(text)
    if proto.get("max_seq_len"):
        lens = set(part["eff.max_seq_len"].dropna().astype(int))
        if lens != {int(proto["max_seq_len"])}:
            out.append(f"max length: {_fmt_set(lens)} tokens; the paper: {proto['max_seq_len']}")
    if proto.get("best_epoch") and not part["eff.keep_best"].fillna(False).astype(bool).all():
        out.append("best epoch: the paper reports each run's best epoch; these runs (some or all) report the last "
                   "step (budget.keep_best=false)")
    elif proto.get("best_epoch"):
        rows = _fmt_set(set(part["eff.validation_rows"].dropna().astype(int))) if "eff.validation_rows" in part \
            else "?"
        out.append(f"best epoch: chosen on a validation split of {rows} rows carved from train (which trains without "
                   "them); the paper chose it on the dev set it reports")
    if proto.get("warmup_ratio") is not None:
        w = set(part["eff.warmup_ratio"].dropna().astype(float))
        if w and w != {float(proto["warmup_ratio"])}:
            out.append(f"warm-up ratio: {_fmt_set(w)}; the paper: {proto['warmup_ratio']}")
    seeds = part.groupby(["method", "task", "rank_key"])["seed"].nunique()
    if proto.get("seeds") and (seeds.min() != proto["seeds"] or seeds.max() != proto["seeds"]):
        out.append(f"seeds: {seeds.min()}–{seeds.max()} per cell; the paper: {proto['seeds']} "
                   f"({proto.get('statistic', 'median')})")
    lr_paper = proto.get("lr", {})
    lora = part[part["method"] == "lora"]
    if lr_paper and not lora.empty:
        off = [f"{_t(t)} {_fmt_set(g['lr'])} (paper {lr_paper[t]:g})" for t, g in lora.groupby("task")
               if t in lr_paper and not np.allclose(g["lr"].dropna().astype(float), float(lr_paper[t]))]
        if off:
            out.append("LoRA learning rate: " + "; ".join(off))
    init = [t for t in proto.get("mnli_init", []) if t in set(part["task"])]
    if init:
        out.append(f"initialisation: {', '.join(_t(t) for t in init)} start from the pre-trained model; the paper "
                   "started LoRA from its best MNLI checkpoint (this loop cannot start a run from another run's "
                   "weights)")
    for row in pub.rows:
        if row.method is None:
            out.append(f"not run: {row.label}: {row.note or 'no such method in the suite'}")
    return out


def reproduce(df: pd.DataFrame, pub: Published | PublishedExperiments, tolerance: float | None = None
              ) -> list[Reproduction] | list[ExperimentReproduction]:
    """A method x task table: one Reproduction per (model, budget) group of ok classification runs in `df`
    (analysis.reproduce.frame), or one with every cell `not run` when there is no ok run. A table of experiments:
    `analysis.reproduce_experiments.reproduce` over the generation runs."""
    if isinstance(pub, PublishedExperiments):
        return experiments.reproduce(df, pub, tolerance)
    tol = pub.tolerance_points if tolerance is None else float(tolerance)
    ok = ok_frame(df)
    ok = ok[~is_generation(ok)] if not ok.empty else ok
    if ok.empty:
        empty = ok.assign(metric_pct=[])
        cells = _cells(empty, pub, tol, False, set(), {})
        return [Reproduction(pub, None, "", ["no ok runs: nothing ran"], cells, orderings(cells), tol)]
    out = []
    for (model, _sig), part in ok.groupby(["model", "budget_sig"], dropna=False, sort=True):
        sampled = set()
        if "data.note" in part:
            notes = part[["task", "data.note"]].dropna()
            sampled = set(notes.loc[notes["data.note"].astype(str).str.len() > 0, "task"])
        notes: dict[str, str] = {}
        cells = _cells(part, pub, tol, model != pub.model, sampled, notes)
        devs = deviations(part, pub, model, sampled) + list(notes.values())
        out.append(Reproduction(pub, model, str(part["budget_desc"].iloc[0]), devs, cells, orderings(cells), tol))
    return out


def reproduce_folder(results: str | Path, table: str, tolerance: float | None = None
                     ) -> tuple[list[Reproduction], list[str]]:
    records, problems = load_records(results)
    return reproduce(frame(records), load_published(table), tolerance), problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="results folder (run folders with record.json)")
    ap.add_argument("--table", default=GLUE_TABLE, help=f"published table: {', '.join(available())}")
    ap.add_argument("--tolerance", type=float, help="points (x 100) a reproduced cell may differ by at least "
                    "(default: the table's tolerance_points)")
    ap.add_argument("--out", help="also write the Markdown here")
    args = ap.parse_args(argv)
    if not Path(args.results).is_dir():
        print(f"error: {args.results}: no such folder", file=sys.stderr)
        return 2
    try:
        reps, problems = reproduce_folder(args.results, args.table, args.tolerance)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in problems:
        print(f"warning: {line}", file=sys.stderr)
    text = "\n".join(r.markdown() for r in reps)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
