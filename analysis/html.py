"""The report as one self-contained HTML page (`index.html` beside `index.md`, written by `analysis.report`).

One file that opens from disk with no server and no network: the interactive tables are itables (DataTables,
its JavaScript and CSS bundled in the page: `connected=False`), the figures are seaborn PNGs inlined as base64.
Sections: what ran, the method x task tables (sortable), the causal LMs' and the generation tasks' tables, the
reproduction of the published tables, the Pareto
plots (metric vs trainable parameters and vs peak memory; one figure per model, budget and task, chosen with
three selects), the claims, the runs that failed, and one section per run (its facts, loss curve, latency,
memory, intruder dimensions and the whole record). External links that itables adds (its help pages) are
turned into plain text, so the page names no host.
"""

from __future__ import annotations

import base64
import html
import json
import re
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from itables import JavascriptFunction, to_html_datatable
from itables.javascript import generate_init_offline_itables_html

from analysis import claims, plots, tables
from analysis.reproduce import Reproduction
from analysis.reproduce_experiments import ExperimentReproduction
from bench.record import CURVE_FILE

_EXTERNAL_LINK = re.compile(r"<a\s+href=[\"']?https?://[^>]*>(.*?)</a>", re.DOTALL)
_PAGE_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1400px;padding:0 1.5em 4em;
color:#222;line-height:1.45}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:.5em 0;z-index:10}
nav a{margin-right:1.2em}
h2{border-bottom:2px solid #333;padding-bottom:.2em;margin-top:2em}
.note{color:#555;font-size:.92em}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:.5em 1em}
.verdict{font-weight:600}
figure{margin:1em 0}
figure img{max-width:100%;border:1px solid #eee}
.filters label{margin-right:1.5em}
details{border:1px solid #ddd;border-radius:4px;margin:.4em 0;padding:.3em .8em}
details>summary{cursor:pointer;font-weight:600}
pre{background:#f6f6f6;padding:.8em;overflow:auto;max-height:30em;font-size:.82em}
table.kv td{padding:.1em .8em .1em 0;vertical-align:top}
table.plain{border-collapse:collapse}
table.plain td,table.plain th{border:1px solid #ddd;padding:.2em .6em;text-align:right}
table.plain td:first-child,table.plain th:first-child{text-align:left}
"""
# Show the Pareto figures whose model, budget and task match the three selects ("all" matches any).
_FILTER_JS = """
function paretoFilter(){const v={};document.querySelectorAll('.filters select').forEach(s=>v[s.name]=s.value);
document.querySelectorAll('figure.pareto').forEach(f=>{f.hidden=!['model','budget','task'].every(
k=>v[k]==='all'||f.dataset[k]===v[k]);});}
document.querySelectorAll('.filters select').forEach(s=>s.addEventListener('change',paretoFilter));
"""


def _e(text) -> str:
    return html.escape(str(text))


def _code(text: str) -> str:
    """Escaped text with Markdown `code` spans as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", _e(text))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(text)).strip("-")


def _offline(markup: str) -> str:
    return _EXTERNAL_LINK.sub(r"\1", markup)


def _render(decimals: int | None = None) -> JavascriptFunction:
    """DataTables render function for one column: a missing value (null) is shown and searched as the dash and is
    empty to sorting and type detection (so a numeric column with gaps still sorts as numbers); numbers are shown
    with `decimals` places when given."""
    shown = "data" if decimals is None else f"(typeof data === 'number' ? data.toFixed({decimals}) : data)"
    return JavascriptFunction(
        "function (data, type) { if (data === null || data === undefined || (typeof data === 'number' && isNaN(data)))"
        f" {{ return type === 'display' || type === 'filter' ? '{tables.DASH}' : null; }}"
        f" return type === 'display' || type === 'filter' ? {shown} : data; }}"
    )


def _decimals(values: pd.Series, most: int = 4) -> int:
    """The fewest decimal places (up to `most`) that show every value of a numeric column as it is."""
    v = values.dropna().astype(float)
    return next((d for d in range(most) if (v.round(d) - v).abs().max() < 1e-9), most) if len(v) else 0


def _for_datatable(df: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """The frame with its missing values as nulls in the page's data rather than NaN, <NA> or None text (numeric
    columns become nullable floats, which itables writes as numbers and nulls; text columns get the dash), and one
    render definition per column (`_render`)."""
    out = df.copy()
    defs = []
    for i, col in enumerate(out.columns):
        values = out[col]
        if values.dtype.kind in "fiu":
            out[col] = values.astype("Float64")
            defs.append({"targets": i, "render": _render(_decimals(values))})
        else:
            if values.isna().any():
                out[col] = values.astype(object).where(values.notna(), tables.DASH)
            defs.append({"targets": i, "render": _render()})
    return out, defs


def datatable(df: pd.DataFrame, caption: str = "", **options) -> str:
    """An itables table (sortable, searchable), rendered offline, with every row on the page (no paging, no
    downsampling) and missing values shown as the dash."""
    frame, column_defs = _for_datatable(df)
    options.setdefault("display_logo_when_loading", False)
    options.setdefault("showIndex", False)
    options.setdefault("connected", False)
    options.setdefault("paging", False)
    options.setdefault("maxBytes", 0)  # itables would drop rows from a table larger than its 64 KB default
    options.setdefault("columnDefs", column_defs)
    options.setdefault("classes", "display compact cell-border")
    return _offline(to_html_datatable(frame, caption=caption or None, **options))


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _img(path: Path | str, alt: str) -> str:
    if not isinstance(path, Path):
        return f'<p class="note">{_e(alt)}: not drawn ({_e(path)}).</p>'
    return f'<img alt="{_e(alt)}" src="{_png(path)}">'


def markdown_html(lines: list[str], base: Path) -> str:
    """The report's Markdown sections that have no page of their own here (serving benchmarks, intruder mitigation)
    as HTML: headings, tables, images (inlined; their paths relative to `base`), list items and paragraphs."""
    parts: list[str] = []
    table: list[list[str]] = []

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    def flush() -> None:
        if table:
            parts.append(_plain_table(pd.DataFrame(table[1:], columns=table[0])))
            table.clear()

    for line in "\n".join(lines).splitlines():  # an item may hold several lines (a whole table)
        if line.startswith("|"):
            if not set(line) <= set("|-: "):  # the header's separator row
                table.append(cells(line))
            continue
        flush()
        if image := re.fullmatch(r"!\[(.*)\]\((.+)\)", line.strip()):
            path = base / image[2]
            parts.append(_img(path if path.suffix == ".png" and path.is_file() else str(path), image[1]))
        elif line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 4)
            parts.append(f"<h{level}>{_e(line.lstrip('#').strip())}</h{level}>")
        elif bold := re.fullmatch(r"\*\*(.+)\*\*", line.strip()):
            parts.append(f"<h4>{_e(bold[1])}</h4>")
        elif line.startswith("- "):
            parts.append(f"<p>• {_e(line[2:])}</p>")
        elif line.strip():
            parts.append(f"<p>{_e(line)}</p>")
    flush()
    return "".join(parts)


def _kv(pairs: list[tuple[str, object]]) -> str:
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in pairs if v is not None and v != "")
    return f'<table class="kv">{rows}</table>'


def _plain_table(df: pd.DataFrame) -> str:
    """A static table; missing values (NaN, and None, which pandas would print as "None") show as the dash."""
    df = df.infer_objects()
    df = df.where(df.notna(), float("nan"))
    return _offline(df.to_html(index=False, classes="plain", border=0, na_rep=tables.DASH,
                               float_format=lambda v: f"{v:.4g}"))


def _group_label(model: str, budget: str) -> str:
    return f"{model} · {budget}"


def method_task_frame(table: tables.Table) -> pd.DataFrame:
    """A Table's numbers as a sortable frame: method, parameters, per task mean (and sd), average."""
    num = table.numbers
    if num.empty:
        return pd.DataFrame()
    out = pd.DataFrame({"Method": [row[0] for row in table.rows],
                        "Trainable params (excl. head)": num["trainable_params_excl_head"].round().astype("Int64")})
    for col in num.columns:
        if col.endswith("_mean"):
            task = col[: -len("_mean")]
            header = next((h for h in table.header if h.startswith(tables.TASK_LABEL.get(task, task) + " ")), task)
            out[header] = num[col].round(2)
            out[f"{header} sd"] = num[f"{task}_std"].round(2)
            out[f"{header} n"] = num[f"{task}_n"]
    out["Avg."] = num["avg"].round(2)
    return out


def reproduction_frame(rep: Reproduction) -> pd.DataFrame:
    """The cells as a sortable frame, the cells we ran first (in the paper's order within each part)."""
    c = rep.cells.sort_values("n", ascending=False, kind="stable", key=lambda n: n > 0)
    return pd.DataFrame({
        "Method (paper)": c["row"], "Ours": c["ours_label"].replace("", "–"),
        "Task": c["task"].map(lambda t: tables.TASK_LABEL.get(t, t)), "Published": c["published"],
        "Published ±": c["published_pm"], "Ours (value)": c["ours"].round(2), "n": c["n"],
        "CI low": c["ci_low"].round(2), "CI high": c["ci_high"].round(2), "Diff": c["diff"].round(2),
        "Tolerance": c["tolerance"], "Verdict": c["verdict"],
    })


def _experiments_reproduction(rep: ExperimentReproduction, index: int) -> str:
    """One group of generation runs beside a published table of experiments (peft's method comparison)."""
    pub = rep.published
    task = tables.TASK_LABEL.get(rep.task, rep.task) if rep.task else "(none)"
    parts = [f"<h3>{_e(pub.title)}: our runs on <code>{_e(rep.model)}</code>, {_e(task)}, budget "
             f"{_e(rep.budget_desc)}</h3>",
             f'<p class="note">Source: {_e(pub.source_line())}. Figures checked: {_e(pub.checked.get("how", ""))} '
             f"Verdicts: {_e(rep.summary())}.</p>"]
    if rep.model_differs:
        parts.append(f'<p class="warn"><b>Not the same setup</b>: {_code("; ".join(rep.setup_differences))}. '
                     "peft's figures are shown beside ours; none is judged.</p>")
    parts.append("<h4>Deviations from peft's protocol</h4><ul>"
                 + "".join(f"<li>{_code(d)}</li>" for d in rep.deviations) + "</ul>")
    slug = _slug(f"{rep.model}-{rep.task}")
    if not rep.accuracy.empty:
        a = rep.accuracy
        acc = pd.DataFrame({
            "Experiment (peft)": a["experiment"], "Ours": a["ours_label"], "Theirs": a["theirs"].round(2),
            "Theirs correct": a["theirs_correct"], "Ours (value)": a["ours"].round(2),
            "Questions": pd.to_numeric(a["examples"], errors="coerce"), "Runs": a["runs"],
            "CI low": a["ci_low"].round(2), "CI high": a["ci_high"].round(2), "Diff": a["diff"].round(2),
            "Diff 95% ±": a["diff_halfwidth"].round(2), "Verdict": a["verdict"]})
        parts.append(datatable(acc, table_id=f"repro-{slug}-{index}-accuracy"))
        parts.append(f'<p class="note">Accuracy x 100. CI: one run\'s Wilson interval, or the t-interval over seeds. '
                     f"Reproduced: |diff| ≤ max({rep.tolerance_points:g}, the 95% interval of the difference).</p>")
        m = rep.measures.rename(columns={"experiment": "Experiment (peft)", "measure": "Measure", "theirs": "Theirs",
                                         "ours": "Ours", "compare": "Ours vs theirs", "note": "Note"})
        parts.append("<h4>Forgetting and cost</h4>" + datatable(m, table_id=f"repro-{slug}-{index}-cost"))
    if rep.not_run:
        parts.append(f'<p class="note">Published experiments without a run here: {_e(", ".join(rep.not_run))}.</p>')
    return "\n".join(parts)


def _reproduction_section(reps: list[Reproduction | ExperimentReproduction]) -> str:
    if not reps:
        return "<p>No published table was compared.</p>"
    parts = []
    for rep in reps:
        if isinstance(rep, ExperimentReproduction):
            parts.append(_experiments_reproduction(rep, len(parts)))
            continue
        pub = rep.published
        parts.append(f"<h3>{_e(pub.title)}: our runs on <code>{_e(rep.model)}</code>, budget "
                     f"{_e(rep.budget_desc)}</h3>")
        parts.append(f'<p class="note">Source: {_e(pub.source_line())}. Figures checked: '
                     f'{_e(pub.checked.get("how", ""))} Verdicts: {_e(rep.summary())}.</p>')
        if rep.model_differs:
            parts.append(f'<p class="warn"><b>The model differs from the paper\'s</b>: these runs use '
                         f'<code>{_e(rep.model)}</code>, the paper <code>{_e(pub.model)}</code>. The values are '
                         "not judged against the paper's; compare the method orderings.</p>")
        parts.append("<h4>Deviations from the paper's protocol</h4><ul>"
                     + "".join(f"<li>{_code(d)}</li>" for d in rep.deviations) + "</ul>")
        parts.append(datatable(reproduction_frame(rep), table_id=f"repro-{_slug(rep.model)}-{len(parts)}"))
        parts.append(f'<p class="note">Ours: the {_e(pub.protocol.get("statistic", "median"))} over seeds (the '
                     f"paper's statistic); CI: 95% t-interval for the mean over seeds. Reproduced: |diff| ≤ "
                     f"max({rep.tolerance_points:g}, 2 x the published ±).</p>")
        if not rep.orderings.empty:
            o = rep.orderings.rename(columns={"scope": "Tasks", "n": "Methods", "published_order": "Paper's order",
                                              "our_order": "Our order", "tau": "Kendall τ"})
            parts.append("<h4>Method orderings</h4>" + _plain_table(o))
    return "\n".join(parts)


def _pareto_section(ok: pd.DataFrame, work: Path) -> str:
    figures, keys = [], {"model": set(), "budget": set(), "task": set()}
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.95)
    for gi, ((model, _sig), part) in enumerate(ok.groupby(["model", "budget_sig"], dropna=False)):
        budget = str(part["budget_desc"].iloc[0])
        for task in plots._tasks(part):
            sub = part[part["task"] == task]
            for kind, fn in (("params", plots.metric_vs_params), ("memory", plots.metric_vs_memory)):
                res = fn(sub, work, f"pareto_{gi}_{task}_{kind}")
                label = f"{tables.TASK_LABEL.get(task, task)} · {model} · {budget}: metric vs " + (
                    "trainable parameters" if kind == "params" else "peak training memory")
                figures.append(f'<figure class="pareto" data-model="{_e(model)}" data-budget="{_e(budget)}" '
                               f'data-task="{_e(task)}">{_img(res, label)}<figcaption>{_e(label)}</figcaption>'
                               "</figure>")
            keys["model"].add(model)
            keys["budget"].add(budget)
            keys["task"].add(task)
    if not figures:
        return "<p>No ok runs: nothing to plot.</p>"
    selects = "".join(
        f'<label>{name}: <select name="{name}"><option value="all">all</option>'
        + "".join(f'<option value="{_e(v)}">{_e(tables.TASK_LABEL.get(v, v) if name == "task" else v)}</option>'
                  for v in sorted(values)) + "</select></label>"
        for name, values in keys.items())
    return (f'<div class="filters">{selects}</div><p class="note">Points are runs; dashed: the Pareto front of '
            "configuration means (no other configuration is better with fewer parameters). Memory: CUDA peak "
            f"allocated, or the CPU process's peak RSS.</p>{''.join(figures)}")


def _claims_section(ok: pd.DataFrame) -> str:
    parts = []
    for (model, _sig), part in ok.groupby(["model", "budget_sig"], dropna=False):
        parts.append(f"<h3>{_e(_group_label(model, part['budget_desc'].iloc[0]))}</h3>")
        for c in claims.check_all(part):
            parts.append(f'<p>"{_e(c.claim)}": <span class="verdict">{_e(c.verdict)}</span></p><ul>'
                         + "".join(f"<li>{_e(line)}</li>" for line in c.lines)
                         + f'</ul><p class="note">Rule: {_e(c.rule)}</p>')
    return "\n".join(parts) or "<p>No ok runs.</p>"


def _curve_png(run_dir: Path, work: Path, name: str) -> Path | str:
    path = run_dir / CURVE_FILE
    if not path.is_file():
        return "no curve.csv"
    try:
        curve = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        return f"unreadable curve.csv ({exc})"
    if curve.empty or not {"step", "loss"} <= set(curve.columns):
        return "empty curve"
    fig, ax = plt.subplots(figsize=(5.5, 2.6))
    sns.lineplot(data=curve, x="step", y="loss", ax=ax, marker="o", markersize=3)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss")
    fig.tight_layout()
    out = work / f"{name}.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def _phase_frame(block: dict | None, fields: list[str]) -> pd.DataFrame:
    rows = [{"": name, **{f: v.get(f) for f in fields}} for name, v in (block or {}).items() if isinstance(v, dict)]
    return pd.DataFrame(rows)


def _utilisation_text(rec: dict) -> str | None:
    """A run's MFU / HFU with the peak they are shares of: "41.2% / 41.2% of 989.5 TFLOP/s (datasheet: h100-sxm
    bf16)" or "1.06% / 1.06% of 118.5 GFLOP/s (measured: cpu: ... 1024x1024 fp32 matmuls, 1 threads)"; the
    record's note where it has no MFU."""
    block = rec.get("train_flops") or {}
    if block.get("mfu_ratio") is None:
        return block.get("note")
    peak = block.get("peak_flops_per_s") or 0.0
    rate = f"{peak / 1e12:.4g} TFLOP/s" if peak >= 1e12 else f"{peak / 1e9:.4g} GFLOP/s"
    world = f" x {block['world_size']} devices" if (block.get("world_size") or 1) > 1 else ""
    hfu = block.get("hfu_ratio", block["mfu_ratio"])
    return (f"{100 * block['mfu_ratio']:.3g}% / {100 * hfu:.3g}% of {rate}{world} "
            f"({block.get('peak_source')}: {block.get('peak_name')})")


def _run_section(rec: dict, analysis: dict | None, work: Path, index: int) -> str:
    run_dir = Path(rec["record_path"]).parent
    rid = str(rec.get("run_id", run_dir.name))
    metric = rec.get("main_metric_value")
    head = f"{rid} · {rec.get('status')}" + (f" · {rec.get('main_metric')} {metric:.4f}" if metric is not None else "")
    facts = _kv([("task", rec.get("task")), ("model", rec.get("model")), ("method", rec.get("method")),
                 ("rank", rec.get("rank")), ("seed", rec.get("seed")), ("lr", rec.get("lr")),
                 ("budget", rec.get("budget")), ("status", rec.get("status")), ("error", rec.get("error")),
                 ("trainable params (excl. head)", rec.get("trainable_params_excl_head")),
                 ("train steps", (rec.get("train") or {}).get("steps")),
                 ("train samples/s", rec.get("train_samples_per_s")),
                 ("train tokens/s", rec.get("train_tokens_per_s")), ("train MFU / HFU", _utilisation_text(rec)),
                 ("run wall s", rec.get("run_wall_s")),
                 ("adapter bytes", rec.get("adapter_bytes")), ("device", (rec.get("provenance") or {}).get("device")),
                 ("folder", str(run_dir))])
    lat = _phase_frame(rec.get("latency"), ["p50_ms", "p95_ms", "mean_ms"])
    mem_fields = ["kind", "peak_allocated_bytes", "peak_reserved_bytes", "peak_rss_bytes", "phase_s"]
    mem = _phase_frame(rec.get("memory"), mem_fields)
    mem = mem.dropna(axis=1, how="all") if not mem.empty else mem
    if analysis and analysis.get("status") == "ok":
        intr = analysis["intruders"]
        intr_html = _kv([(f"intruders (ε={intr['epsilon']:g}, top-{intr['k']})", intr.get("total")),
                         ("layers with intruders", f"{intr.get('layers_with_intruders')}/{intr.get('layers')}"),
                         ("by ε", json.dumps(intr.get("total_by_epsilon")))])
    elif analysis:
        intr_html = f"<p>{_e(analysis.get('status'))}: {_e(analysis.get('reason') or analysis.get('error'))}</p>"
    else:
        intr_html = "<p>not analysed (no saved weights, or the report ran with --no-weights)</p>"
    curve = _curve_png(run_dir, work, f"curve_{index}")
    body = json.dumps({k: v for k, v in rec.items() if k != "record_path"}, indent=1, default=str)
    return (f'<details id="run-{_slug(rid)}"><summary>{_e(head)}</summary>{facts}'
            f"<h4>Training loss</h4>{_img(curve, 'training loss')}"
            f"<h4>Latency</h4>{_plain_table(lat) if not lat.empty else '<p>not measured</p>'}"
            f"<h4>Memory</h4>{_plain_table(mem) if not mem.empty else '<p>not measured</p>'}"
            f"<h4>Intruder dimensions</h4>{intr_html}"
            f"<details><summary>record.json</summary><pre>{_e(body)}</pre></details></details>")


def write_html(path: Path, *, title: str, generated: str, df: pd.DataFrame, records: list[dict],
               reproductions: list[Reproduction | ExperimentReproduction], analyses: dict[str, dict],
               problems: list[str], extra: str = "") -> Path:
    """Write the whole report as one HTML file and return its path; `extra`: HTML sections placed before the failed
    runs (markdown_html of the serving and mitigation sections)."""
    ok = tables.ok_frame(df)
    failed = df[df["status"] != "ok"] if "status" in df else df.iloc[0:0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        main = []
        for t in tables.method_task_tables(df):
            frame = method_task_frame(t)
            main.append(f"<h3>{_e(t.title)}</h3>" + datatable(frame, table_id=f"main-{len(main)}")
                        + "".join(f'<p class="note">{_e(n)}</p>' for n in t.notes))
        causal = [f"<h3>{_e(t.title)}</h3>"
                  + datatable(pd.DataFrame(t.rows, columns=t.header), table_id=f"causal-lm-{i}")
                  + "".join(f'<p class="note">{_e(n)}</p>' for n in t.notes)
                  for i, t in enumerate(tables.causal_lm_tables(df))]
        generation = [f"<h3>{_e(t.title)}</h3>"
                      + datatable(pd.DataFrame(t.rows, columns=t.header), table_id=f"generation-{i}")
                      + "".join(f'<p class="note">{_e(n)}</p>' for n in t.notes)
                      for i, t in enumerate(tables.generation_tables(df))]
        pareto = _pareto_section(ok, work)
        runs_index = pd.DataFrame([{
            "Run": f'<a href="#run-{_slug(r.get("run_id"))}">{_e(r.get("run_id"))}</a>',
            "Status": r.get("status"), "Task": r.get("task"), "Model": r.get("model"), "Method": r.get("method"),
            "Rank": r.get("rank"), "Seed": r.get("seed"), "Metric": r.get("main_metric_value"),
            "Trainable params": r.get("trainable_params_excl_head")} for r in records])
        if not runs_index.empty:
            for col in ("Rank", "Seed", "Trainable params"):
                runs_index[col] = pd.to_numeric(runs_index[col], errors="coerce").round().astype("Int64")
        sections = [_run_section(r, analyses.get(str(Path(r["record_path"]).parent)), work, i)
                    for i, r in enumerate(records)]
    if failed.empty:
        failed_html = "<p>None.</p>"
    else:
        cols = [c for c in ("run_id", "status", "task", "method", "error") if c in failed.columns]
        frame = failed[cols].assign(error=failed["error"].str[:300]) if "error" in cols else failed[cols]
        failed_html = datatable(frame, table_id="failed-runs")
    if problems:
        failed_html += "<p>Unreadable records:</p><ul>" + "".join(f"<li>{_e(p)}</li>" for p in problems) + "</ul>"
    nav = "".join(f'<a href="#{k}">{v}</a>' for k, v in (
        ("tables", "Method × task"), *((("generation", "Generation tasks"),) if generation else ()),
        ("reproduction", "Reproduction"), ("pareto", "Pareto"),
        ("claims", "Claims"), ("failed", "Failed runs"), ("runs", "Runs")))
    random_init = "model_note" in ok and ok["model_note"].notna().any()
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<style>{_PAGE_CSS}</style>
{_offline(generate_init_offline_itables_html(_dt_bundle()))}
</head><body>
<h1>{_e(title)}</h1>
<nav>{nav}</nav>
<p class="note">{_e(generated)} {len(df)} run records: {len(ok)} ok, {len(failed)} not ok.</p>
{'<p class="warn">Some runs use a random-init test model: their metrics are meaningless.</p>' if random_init else ''}
<h2 id="tables">Method × task</h2>
{''.join(main) or '<p>No ok runs.</p>'}
{'<h2 id="causal-lm">Causal language models</h2>' + ''.join(causal) if causal else ''}
{'<h2 id="generation">Generation tasks</h2><p class="note">Question → worked solution → final number, scored by '
 'greedy decoding beside the untrained model; compared with each other only.</p>' + ''.join(generation)
 if generation else ''}
<h2 id="reproduction">Reproduction of published results</h2>
{_reproduction_section(reproductions)}
<h2 id="pareto">Pareto: metric vs trainable parameters and vs peak memory</h2>
{pareto}
<h2 id="claims">Claims checked</h2>
{_claims_section(ok) if not ok.empty else '<p>No ok runs.</p>'}
{extra}
<h2 id="failed">Runs that did not finish</h2>
{failed_html}
<h2 id="runs">Runs</h2>
{datatable(runs_index, table_id="runs-index", allow_html=True) if not runs_index.empty else ''}
{''.join(sections)}
<script>{_FILTER_JS}</script>
</body></html>
"""
    path.write_text(page, encoding="utf-8")
    return path


def _dt_bundle() -> Path:
    import itables

    return Path(itables.__file__).parent / "html" / "dt_bundle.js"


def external_urls(page: str) -> list[str]:
    """The http(s) URLs a page would load or link to from an attribute (src=, href=) or CSS url()."""
    return re.findall(r"""(?:\b(?:src|href)\s*=\s*["']?|url\(\s*["']?)(https?://[^\s"'>)]+)""", page)


