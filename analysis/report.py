"""One command from a results folder to a report a person reads top to bottom.

    python -m analysis.report results/runs [--out results/report] [--force] [--table auto]
        [--epsilon 0.5] [--k 10]

1. Intruder dimensions (top-k vectors, threshold ε) and ΔW spectrum for every ok run with saved weights
   (`analysis.analyse`; cached in each run folder as `analysis.json` under a key of its settings and weights, so a
   second report is fast; `--force` recomputes). Every count and label in the report is at the `--epsilon` and
   `--k` given here. Runs without saved weights are skipped (one line says how many) and nothing is loaded for
   them: a report from records alone needs no model, no dataset and no Hub.
2. All records into one table (`runs.csv`), the comparison tables (`tables/`: Markdown, CSV, LaTeX) and
   the plots (`plots/`: PNG and SVG).
3. `index.md`: what was run, the tables, the plots, intruders and spectrum, the published table reproduced
   beside our runs (`analysis.reproduce`, `--table`), the claims checked with their figures, and the runs that
   failed; `index.html`: the same as one self-contained page to browse (`analysis.html`: sortable tables, the
   reproduction, Pareto plots with filters, claims, failed runs, a section per run).
Runs of different models or training budgets are reported as separate groups, never mixed; causal-LM runs (record
`model_kind: causal_lm`) on classification tasks get their own section after the encoders' (`causal_lm_section`):
accuracy beside the zero-shot score, trainable parameters, peak memory beside the estimator's figure, training
tokens/s with MFU (model FLOPs utilisation), decode tokens/s, perplexity forgetting and intruders. Runs of
generation tasks (question -> worked solution -> final number; `analysis.collect.task_kind_of`) get theirs
(`generation_section`), one table per (model, task, budget): accuracy with its 95% interval beside the zero-shot
(and k-shot) accuracy, the no-answer share, the gold solution's loss, forgetting, memory, training tokens/s with MFU
and generation tokens/s. Records without `model_kind` are encoders. `--table auto` (default) reproduces the
published tables that fit the runs: `lora-table2` for classification runs, `peft-metamathqa` for generation runs.
Serving benchmark records (`serving-*.json` from `python -m bench.tools.perf.serving`) in `perf/` beside the results
folder get a section with their tables (`analysis.serving`). Intruder-mitigation results
(`<run dir>/mitigation.json` from `python -m analysis.mitigate`) get a section with each run's λ table and plot
(`analysis.mitigate`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import claims, intruders, plots, reproduce, tables, tuned
from analysis.analyse import analyse_all
from analysis.collect import load_records
from analysis.html import markdown_html, write_html
from analysis.mitigate import report_section as mitigation_section
from analysis.serving import serving_section
from bench import BenchError

PLOT_CAPTIONS = {
    "metric_vs_params": "Dev metric against trainable parameters (excluding the task head, log "
    "scale). The dashed "
    "steps join the Pareto front: configurations that no other one beats with fewer parameters.",
    "metric_vs_memory": "Dev metric against peak memory during training.",
    "metric_vs_rank": "Dev metric against rank for each method that has one; dashed: full fine-tuning.",
    "metric_vs_eval_rank": "Dev metric against the rank each run was evaluated at after training once "
    "(DyLoRA: the adapter truncated to its first r components); one line per training run, dashed: LoRA "
    "trained separately at each rank, where such runs exist.",
    "intruders_vs_rank": "Intruder dimensions ({settings}, summed over the layers) against rank; dashed: full "
    "fine-tuning.",
    "forgetting_vs_metric": "Task metric against forgetting (probe before − after, after − before for losses; "
    "right of zero = ability lost).",
    "latency": "Forward latency of one batch: the base model, the method as trained (unmerged) and "
    "merged into "
    "the weights.",
    "rank_lab": "Rank lab: relative error of the best rank-r approximation of each run's ΔW, over "
    "all analysed "
    "layers. Where a full fine-tuning curve reaches a small error tells which LoRA rank could "
    "express that update.",
}


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _config_label(row: pd.Series) -> str:
    label = tables.METHOD_LABEL.get(row["method"], row["method"])
    if pd.notna(row.get("rank")):
        label += f" r={int(row['rank'])}"
    return f"{tables.TASK_LABEL.get(row['task'], row['task'])} · {label} · s{row['seed']}"


def _run_labels(part: pd.DataFrame) -> pd.Series:
    """Readable labels, made unique with the config hash where two runs would share one."""
    labels = part.apply(_config_label, axis=1)
    dup = labels.duplicated(keep=False)
    labels[dup] = labels[dup] + " #" + part.loc[dup, "config_hash"].astype(str).str[:6]
    return labels


def intruder_section(part: pd.DataFrame, analyses: dict[str, dict]) -> tuple[str, pd.DataFrame]:
    """Markdown for intruders and the spectrum of one group, and the rank-lab curves."""
    rows, curves, times, top_layers = [], [], [], []
    part = part.assign(run_label=_run_labels(part))
    for _, r in part.sort_values(["task", "method", "rank_key", "seed"]).iterrows():
        res = analyses.get(str(Path(r["record_path"]).parent))
        label = r["run_label"]
        if res is None:
            rows.append([label, "not analysed (no saved weights, or --no-weights)"] + [""] * 6)
            continue
        if res.get("status") != "ok":
            rows.append([label, f"{res.get('status')}: {res.get('reason') or res.get('error')}"] + [""] * 6)
            continue
        intr, sp = res["intruders"], res["spectrum"]
        grid = intr["total_by_epsilon"]
        rows.append(
            [
                label,
                f"{intr['total']}",
                f"{intr['layers_with_intruders']}/{intr['layers']}",
                " / ".join(str(grid[e]) for e in ("0.3", "0.5", "0.7") if e in grid),
                f"{sp['mean_relative_update']:.1e}" if sp["mean_relative_update"] is not None else "0",
                f"{sp['mean_effective_rank'] or 0:.1f}",
                f"{sp['mean_numerical_rank'] or 0:.1f}",
                f"{sp['mean_energy90_rank'] or 0:.1f}",
            ]
        )
        if res.get("timing_s"):
            times.append(res["timing_s"])
        if intr["total"] and intr.get("per_layer"):
            layer, n = max(intr["per_layer"].items(), key=lambda kv: kv[1])
            top_layers.append(f"{label}: most in `{layer}` ({n})")
        lab = sp.get("rank_lab") or {"ranks": [], "model_relative_error": []}
        if not sp.get("changed_layers"):  # ΔW = 0 (e.g. BitFit): no update to approximate
            lab = {"ranks": [], "model_relative_error": []}
        curves += [
            {"label": label, "method": r["method"], "rank": k, "relative_error": e}
            for k, e in zip(lab["ranks"], lab["model_relative_error"])
        ]
    if not rows:
        return "No runs.\n", pd.DataFrame()
    header = [
        "Run",
        tables.intruder_header(part),
        "Layers with intruders",
        "Intruders at ε=0.3 / 0.5 / 0.7",
        "Mean ‖ΔW‖/‖W0‖",
        "Mean effective rank of ΔW",
        "Mean numerical rank",
        "Mean rank for 90% energy",
    ]
    text = tables.Table("", header, rows).markdown() + "\n\n"
    text += (
        f"Intruders: {tables.intruder_definition(part)} (Shuttleworth et al. 2024), over every linear "
        "layer except embeddings, pooler and task head. Effective rank: Roy & Vetterli entropy rank of ΔW's "
        "singular values; numerical rank: σ > 1e-3 σ_max; averages over the layers the run changed.\n"
    )
    if top_layers:
        text += "\n" + "\n".join(f"- {line}" for line in top_layers[:12]) + "\n"
    if times:
        t = pd.DataFrame(times)
        text += (
            "\nTime per run (when computed, not from cache): rebuild weights "
            f"{t['rebuild_weights'].median():.1f} s, "
            f"intruder SVDs {t['intruders'].median():.2f} s, spectrum {t['spectrum'].median():.2f} s "
            "(medians).\n"
        )
    return text, pd.DataFrame(curves)


def add_memory_estimates(df: pd.DataFrame, records: list[dict]) -> pd.DataFrame:
    """`memory_estimate_bytes` (bench/tools/memory_estimate.py `record_estimate`) for each ok causal-LM run; left empty
    where the record cannot be estimated (e.g. its model's config is not available offline)."""
    from bench.tools.memory_estimate import record_estimate

    estimates = {}
    for rec in records:
        if rec.get("status") != "ok" or rec.get("model_kind") != tables.CAUSAL_LM or "effective_config" not in rec:
            continue
        try:
            estimates[rec["run_id"]] = record_estimate(rec)["estimate_bytes"]
        except (BenchError, KeyError, ValueError, OSError) as exc:
            print(f"warning: no memory estimate for {rec.get('run_id')}: {exc}", file=sys.stderr)
    if estimates and "run_id" in df.columns:
        df = df.assign(memory_estimate_bytes=df["run_id"].map(estimates))
    return df


def causal_lm_section(ok: pd.DataFrame, analyses: dict[str, dict], out: Path) -> list[str]:
    """Markdown lines for the causal-LM runs on classification tasks (GLUE as text): one table per (model, budget),
    then their intruders and spectrum. Generation runs have their own section (`generation_section`)."""
    causal = ok[(tables.kind_of(ok) == tables.CAUSAL_LM) & ~tables.is_generation(ok)]
    if causal.empty:
        return []
    lines = ["## Causal language models", "",
             ("Decoder LMs answer each task as text; runs are compared with each other, never with the encoders "
              "above."), ""]
    lm_tables = tables.causal_lm_tables(causal)
    groups = list(causal.groupby(["model", "budget_sig"], dropna=False))
    for gi, ((model, _sig), part) in enumerate(groups):
        suffix = "" if len(groups) == 1 else f"_{gi + 1}"
        budget_desc = str(part["budget_desc"].iloc[0])
        lines += [f"### {model}, budget {budget_desc}", "",
                  (f"{len(part)} ok runs; tasks: {', '.join(sorted(part['task'].unique()))}; methods: "
                   f"{', '.join(sorted(part['method'].unique()))}."), ""]
        table = next((t for t in lm_tables if t.title == f"Causal LM: {model} · budget {budget_desc}"), None)
        lines += _lm_group_body(part, table, f"causal_lm{suffix}", analyses, out,
                                "Intruder dimensions and ΔW spectrum (q, k, v, o, gate, up, down projections)")
    return lines


def _lm_group_body(part: pd.DataFrame, table, stem: str, analyses: dict[str, dict], out: Path,
                   intruder_heading: str) -> list[str]:
    """Markdown lines of one causal-LM group after its heading: the random-init warning when it applies, its table
    (written to tables/<stem>.*), then its intruders and spectrum over the decoder's projections."""
    lines: list[str] = []
    if part.get("model_note") is not None and part["model_note"].notna().any():
        lines += ["> **Random-init test model: every metric in this group is meaningless** "
                  "(the group shows that the pipeline works, not how methods compare).", ""]
    if table is not None:
        table.write(out / "tables", stem)
        lines += [table.markdown(), "", f"Files: `tables/{stem}.md`, `.csv`, `.tex`.", ""]
    intr_text, _ = intruder_section(part, analyses)
    return lines + [f"#### {intruder_heading}", "",
                    intr_text.replace("except embeddings, pooler and task head", "except the embeddings and the "
                                      "LM head (tied to the embeddings)"), ""]


def generation_section(ok: pd.DataFrame, analyses: dict[str, dict], out: Path) -> list[str]:
    """Markdown lines for the runs of generation tasks (question -> worked solution -> final number): one table per
    (model, task, budget) (`tables.generation_tables`), then their intruders and spectrum. Never mixed with the
    encoders or the causal LMs' classification runs."""
    gen = ok[tables.is_generation(ok)]
    if gen.empty:
        return []
    lines = ["## Generation tasks", "",
             ("Question → worked solution → final number (GSM-Symbolic, GSM8K, MetaMathQA): each model answers the "
              "test questions by greedy decoding and is scored on the final number, beside the untrained model "
              "prompted the same way; compared with each other only."), ""]
    gen_tables = {t.title: t for t in tables.generation_tables(gen)}
    groups = list(gen.groupby(["model", "task", "budget_sig"], dropna=False, sort=True))
    for gi, ((model, task, _sig), part) in enumerate(groups):
        suffix = "" if len(groups) == 1 else f"_{gi + 1}"
        budget_desc = str(part["budget_desc"].iloc[0])
        task_label = tables.TASK_LABEL.get(task, task)
        examples = pd.to_numeric(part.get("generation_eval.examples"), errors="coerce").dropna()
        device = part["provenance.device"].dropna().iloc[0] if "provenance.device" in part and \
            part["provenance.device"].notna().any() else "?"
        lines += [f"### {model}, {task_label}, budget {budget_desc}", "",
                  (f"{len(part)} ok runs; methods: {', '.join(sorted(part['method'].unique()))}; test questions: "
                   f"{', '.join(str(int(n)) for n in sorted(examples.unique())) or '?'}; device: {device}."), ""]
        table = gen_tables.get(f"Generation: {model} · {task_label} · budget {budget_desc}")
        lines += _lm_group_body(part, table, f"generation{suffix}", analyses, out,
                                "Intruder dimensions and ΔW spectrum")
    return lines


def published_tables(df: pd.DataFrame) -> list[str]:
    """The published tables that fit the runs in `df` (`--table auto`): `lora-table2` when there are classification
    runs, `peft-metamathqa` when there are generation runs."""
    ok = tables.ok_frame(df)
    gen = tables.is_generation(ok)
    return ([reproduce.GLUE_TABLE] if (~gen).any() else []) + ([reproduce.GENERATION_TABLE] if gen.any() else [])


def build_report(
    results: str | Path, out: str | Path | None = None, force: bool = False, analyse: bool = True,
    table: str | None = "auto", *, epsilon: float = intruders.DEFAULT_EPSILON, k: int = intruders.DEFAULT_K,
) -> Path:
    """Write the report folder (index.md, index.html, tables/, plots/, runs.csv) and return index.md's path.
    `table`: the published table to reproduce (analysis/published/), several comma-separated, `auto` for those that
    fit the runs (`published_tables`), None for none. Intruders are counted over the
    top-`k` vectors at `epsilon`; `analyse=False` computes no weight analysis (caches at these settings are used)."""
    start = time.perf_counter()
    results = Path(results)
    out = Path(out) if out else results.parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    named = [t.strip() for t in (table or "").split(",") if t.strip()] if table != "auto" else []
    published = [reproduce.load_published(name) for name in named]  # an unknown name stops here, before any work
    analyses = analyse_all(results, force=force, k=k, epsilon=epsilon, compute=analyse)
    records, problems = load_records(results, analyses=analyses)
    records, unchosen = tuned.chosen_only(records)  # a tuning protocol's trials at lrs it did not choose
    df = reproduce.frame(records)
    if df.empty:
        print(f"error: no run records under {results}", file=sys.stderr)
        raise SystemExit(2)
    df = add_memory_estimates(df, records)
    df.to_csv(out / "runs.csv", index=False)
    ok = tables.ok_frame(df)
    encoders = ok[tables.kind_of(ok) != tables.CAUSAL_LM]
    failed = df[df["status"] != "ok"]

    lines = [
        f"# peft-bench report: `{results}`",
        "",
        f"Generated {dt.datetime.now().isoformat(timespec='seconds')} by `python -m analysis.report`. "
        f"{len(df)} run records: {len(ok)} ok, {len(failed)} not ok"
        + (f", {len(problems)} unreadable" if problems else "")
        + ". All runs in one table: `runs.csv`.",
        "",
    ]
    if unchosen:
        lines += [f"{unchosen} lr trials of a tuning protocol at learning rates it did not choose are left out: tables "
                  "and claims compare each method at the lr chosen on validation (`python -m analysis.tuned` shows "
                  "every trial).", ""]
    groups = list(encoders.groupby(["model", "budget_sig"], dropna=False)) if not encoders.empty else []
    if ok.empty:
        lines += ["No ok runs: nothing to compare.", ""]
    main_tables = {t.title: t for t in tables.method_task_tables(df)}
    rank_tables = tables.rank_tables(df)
    for gi, ((model, _sig), part) in enumerate(groups):
        budget_desc = str(part["budget_desc"].iloc[0])
        suffix = "" if len(groups) == 1 else f"_{gi + 1}"
        lines += [
            f"## {'Group ' + str(gi + 1) + ': ' if len(groups) > 1 else ''}{model}, budget {budget_desc}",
            "",
            (
                f"{len(part)} ok runs; tasks: {', '.join(sorted(part['task'].unique()))}; methods: "
                f"{', '.join(sorted(part['method'].unique()))}; seeds: "
                f"{', '.join(str(s) for s in sorted(part['seed'].unique()))}; device: "
                f"{part['provenance.device'].iloc[0] if 'provenance.device' in part else '?'}."
            ),
            "",
        ]
        if part.get("model_note") is not None and part["model_note"].notna().any():
            lines += [
                (
                    "> **Random-init test model: every metric in this group is meaningless** "
                    "(the group shows that the pipeline works, not how methods compare)."
                ),
                "",
            ]
        title = f"{model} · budget {budget_desc}"
        main = main_tables.get(title)
        lines += ["### Method × task (LoRA paper Table 2 style)", ""]
        if main is not None:
            main.write(out / "tables", f"main{suffix}")
            lines += [main.markdown(), "", f"Files: `tables/main{suffix}.md`, `.csv`, `.tex`.", ""]
        rank_t = next((t for t in rank_tables if t.title == f"Rank table: {title}"), None)
        if rank_t is not None:
            rank_t.write(out / "tables", f"rank{suffix}")
            lines += [
                "### Rank table: metric, intruders, forgetting and memory",
                "",
                rank_t.markdown(),
                "",
                f"Files: `tables/rank{suffix}.md`, `.csv`, `.tex`.",
                "",
            ]

        lines += ["### Plots", ""]
        made = plots.make_all(part, out / "plots", suffix)
        intr_text, curves = intruder_section(part, analyses)
        made["rank_lab"] = plots.rank_lab(curves, out / "plots", "rank_lab" + suffix)
        for name, res in made.items():
            if isinstance(res, Path):
                caption = PLOT_CAPTIONS[name].replace("{settings}", tables.intruder_settings_text(part))
                lines += [
                    f"**{name.replace('_', ' ')}**: {caption}",
                    "",
                    f"![{name}]({_rel(res, out)})",
                    "",
                ]
        skipped = [
            f"- {name.replace('_', ' ')}: skipped ({res})"
            for name, res in made.items()
            if not isinstance(res, Path)
        ]
        if skipped:
            lines += ["Plots not drawn:", ""] + skipped + [""]
        lines += ["", "### Intruder dimensions and ΔW spectrum", "", intr_text]
        if not curves.empty:
            picks = [r for r in (1, 4, 16, 64) if r <= curves["rank"].max()]
            lab = curves[curves["rank"].isin(picks)].pivot_table(
                index="label", columns="rank", values="relative_error"
            ).reindex(curves["label"].unique())  # the intruder table's order (task, method, rank, seed), not A-Z
            lab_rows = [[idx] + [f"{v:.3f}" for v in row] for idx, row in lab.iterrows()]
            lines += [
                "Rank lab (relative Frobenius error of the best rank-r approximation of ΔW, all layers):",
                "",
                tables.Table("", ["Run"] + [f"r={r}" for r in lab.columns], lab_rows).markdown(),
                "",
            ]

        lines += [
            "### Claims checked",
            "",
            (
                "Each claim is checked on this group's ok runs with the rule stated under it; the "
                "figures are "
                "what the runs measured, whichever way they point. A short CPU budget fine-tunes far "
                "less than "
                "the papers did, so read the verdicts as facts about these runs."
            ),
            "",
        ]
        for c in claims.check_all(part):
            lines += [c.markdown()]

    lines += causal_lm_section(ok, analyses, out)
    lines += generation_section(ok, analyses, out)
    after_training = serving_section(results)  # serving benchmark records in perf/ beside the results folder
    after_training += mitigation_section(results, out / "plots", lambda p: _rel(p, out))  # <run dir>/mitigation.json
    lines += after_training

    if table == "auto":
        published = [reproduce.load_published(name) for name in published_tables(df)]
    reproductions = [rep for pub in published for rep in reproduce.reproduce(df, pub)]
    for rep in reproductions:
        lines += [rep.markdown().replace("## Reproduction", "## Published results: reproduction", 1), ""]

    lines += ["## Runs that did not finish", ""]
    if failed.empty:
        lines += ["None.", ""]
    else:
        rows = [
            [r["run_id"], r["status"], str(r.get("error") or "")[:160].replace("|", "/")]
            for _, r in failed.iterrows()
        ]
        lines += [tables.Table("", ["Run", "Status", "Error"], rows).markdown(), ""]
    if problems:
        lines += ["Unreadable records:", ""] + [f"- {p}" for p in problems] + [""]
    not_analysed = [a for a in analyses.values() if a.get("status") == "error"]
    if not_analysed:
        lines += ["Runs whose weights could not be analysed:", ""]
        lines += [f"- {a['run_id']}: {a['error']}" for a in not_analysed] + [""]

    lines += [
        "## How to read this",
        "",
        (
            "- Metrics are dev-set GLUE metrics x 100 (accuracy; Matthews correlation for CoLA; Pearson for "
            "STS-B). Runs differ only in what the method and its own defaults change (same loop, data order, "
            "training subset, precision)."
        ),
        "- Trainable parameters exclude the task head (which trains for every method), as papers report.",
        (
            "- Memory on CPU is the process's peak resident set (model, optimiser, activations, "
            "data, Python), "
            "not comparable with CUDA allocator figures."
        ),
        (
            "- Latency: p50 over timed iterations after warm-up, for one synthetic batch; CPU figures on a "
            "shared machine are noisy."
        ),
        (
            "- QNLI (train) and MNLI: offline data are samples of GLUE, not comparable to published numbers; "
            "their columns are marked †."
        ),
        (
            "- Forgetting: the probe's score on the base model minus on the fine-tuned model (x 100), "
            "positive = ability lost; `sts` = zero-shot STS-B Spearman of mean-pooled embeddings."
        ),
        (
            "- Generation tasks: accuracy is the share of test questions whose greedy answer's final number is the "
            "gold one, with its 95% interval; their forgetting is a loss after − before (positive = ability lost)."
        ),
        "",
        f"Report written in {time.perf_counter() - start:.1f} s.",
    ]
    index = out / "index.md"
    index.write_text("\n".join(lines) + "\n")
    generated = f"Generated {dt.datetime.now().isoformat(timespec='seconds')} by python -m analysis.report."
    write_html(out / "index.html", title=f"peft-bench report: {results}", generated=generated, df=df,
               records=records, reproductions=reproductions, analyses=analyses, problems=problems,
               extra=markdown_html(after_training, out))
    return index


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="results folder (run folders with record.json)")
    ap.add_argument("--out", help="report folder (default: <results>/../report)")
    ap.add_argument("--force", action="store_true", help="recompute the cached per-run weight analysis")
    ap.add_argument("--no-weights", action="store_true",
                    help="compute no intruder/spectrum analysis (analyses cached at these settings are shown)")
    ap.add_argument("--epsilon", type=float, default=intruders.DEFAULT_EPSILON,
                    help=f"intruder threshold on |cos| (default {intruders.DEFAULT_EPSILON:g})")
    ap.add_argument("--k", type=int, default=intruders.DEFAULT_K,
                    help=f"top-k singular vectors checked for intruders (default {intruders.DEFAULT_K})")
    ap.add_argument("--table", default="auto",
                    help=f"published table(s) to reproduce, comma-separated ({', '.join(reproduce.available())}); "
                    "'auto' (default): those that fit the runs; 'none': skip")
    args = ap.parse_args(argv)
    if not Path(args.results).exists():
        ap.error(f"{args.results}: no such folder")  # exit 2: a usage error
    table = None if args.table == "none" else args.table
    try:
        index = build_report(args.results, args.out, args.force, analyse=not args.no_weights, table=table,
                             epsilon=args.epsilon, k=args.k)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"report: {index} and {index.with_suffix('.html')}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
