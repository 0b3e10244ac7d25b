"""Regression tracking: compare a current sweep against a baseline, config by config over seeds.

    python -m analysis.compare --baseline results/baselines/cpu-smoke --current results/runs

Each side is a folder of run records or a table written by `python -m analysis.collect --out x.csv`.
Runs are matched by their config group: the hash of the effective config without the seed (new records
carry it as `config_group`, older ones get it from `effective_config`), so the seeds of one config are
one sample. Per config group:

- metric (`main_metric_value`, higher is better; `--metric` adds columns, and a name containing `loss`
  is lower-is-better): REGRESSION when the current mean is worse by at least `--min-effect` and
  - both sides ran the same seeds: paired by seed. Identical runs compare exactly (no difference: ok); with
    >= 2 seeds a one-sided paired t-test gives p < `--alpha` (equal differences on every seed count as
    significant); with one seed, the drop exceeds `--tolerance`;
  - the seeds differ and both sides have >= 2: Welch's t-test (one-sided) gives p < `--alpha`;
  - the seeds differ and a side has one: no verdict, "inconclusive: different seeds, n=1" (a seed change moves
    a small run by more than any fixed tolerance; run the same seeds, or more of them).
- memory (peak during training: CUDA peak allocated, CPU peak RSS; median over seeds) and speed (inference latency
  p50 of the base model, unmerged, and merged where present; training samples/s): beyond the limit (memory grew by
  more than `--memory-tol`; latency grew, or throughput shrank, by more than the factor `--time-factor`) is judged
  against the noise (see perf_check): a latency whose base model, timed in the same runs, moved as much is the
  machine (ok); a throughput that moved like every other config's is inconclusive (a busier machine, or shared code);
  where configs ran >= 2 seeds, a one-sided t-test on the logs against the pooled run-to-run spread decides
  (REGRESSION or inconclusive); with one run a side, timing is inconclusive and memory is a REGRESSION.
  Memory and speed are compared only when both sides ran on the same device with the same torch version
  and number of torch threads (else `n/a`), unless `--ignore-device`.
- a config with ok runs in the baseline and none in the current (failed or missing) is a REGRESSION
  unless `--allow-missing`; a missing config says which effective-config keys changed when a config with
  the same task/model/method/rank exists on the other side.

Above the table it lists what differs between the two sides' environments and inputs: package versions, the
lock file's hash, and the content fingerprints of data and model files (records from before fingerprints
were recorded show them as missing). Then it prints a Markdown table (config, check, baseline, current, delta,
verdict) and exits 1 on a regression, 0 otherwise, and 2 on a usage error (no such folder, no records).
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from analysis.collect import load_records, to_frame

MEMORY_COLUMNS = ("memory.train.peak_allocated_bytes", "memory.train.peak_rss_bytes")
LATENCY_COLUMNS = ("latency.unmerged.p50_ms", "latency.merged.p50_ms")
BASE_LATENCY_COLUMN = "latency.base.p50_ms"  # timed interleaved with the method in the same run: the control
THROUGHPUT_COLUMN = "train_samples_per_s"
LABEL_COLUMNS = ("task", "model", "method", "rank", "lr", "budget")
PROVENANCE_PREFIXES = ("provenance.versions.", "provenance.lock_sha256", "fingerprints.")


class UsageError(Exception):
    """A wrong argument (no such folder, a table without config groups): exit 2, where a regression is exit 1."""


def load_side(source: str | Path) -> tuple[pd.DataFrame, dict[str, dict]]:
    """A frame of runs with a `config_group` column, and the effective config of each group (records only)."""
    source = Path(source)
    if source.is_file() and source.suffix in (".csv", ".parquet"):
        df = pd.read_parquet(source) if source.suffix == ".parquet" else pd.read_csv(source)
        if "config_group" not in df.columns:
            raise UsageError(f"{source}: no config_group column; write the table with this version of "
                             f"`python -m analysis.collect --out`, or pass the records folder")
        return df, {}
    if not source.exists():
        raise UsageError(f"{source}: no such folder or table")
    records, problems = load_records(source)
    for line in problems:
        print(f"warning: {line}", file=sys.stderr)
    effective = {r["config_group"]: r["effective_config"] for r in records
                 if isinstance(r.get("effective_config"), dict)}
    return to_frame(records), effective


def _first_present(df: pd.DataFrame, columns: tuple[str, ...]) -> pd.Series:
    out = pd.Series(np.nan, index=df.index, dtype=float)
    for col in columns:
        if col in df.columns:
            out = out.fillna(pd.to_numeric(df[col], errors="coerce"))
    return out


def _label(rows: pd.DataFrame, group: str) -> str:
    row = rows.iloc[0]
    parts = []
    for col in LABEL_COLUMNS:
        value = row.get(col)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if col == "rank":
            parts.append(f"r{int(value)}")
        elif col == "lr":
            parts.append(f"lr={float(value):g}")
        elif col == "budget":
            parts.append(f"budget={value}")
        else:
            parts.append(str(value))
    return f"{' '.join(parts)} [{group[:6]}]"


def _label_key(row: pd.Series) -> tuple:
    """task, model, method, rank: what a person calls 'the same run' when the config hash differs."""
    rank = row.get("rank")
    rank = None if rank is None or (isinstance(rank, float) and math.isnan(rank)) else int(rank)
    return str(row.get("task")), str(row.get("model")), str(row.get("method")), rank


def _mode(values: pd.Series) -> str | None:
    values = values.dropna().map(lambda v: str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))
    return Counter(values).most_common(1)[0][0] if len(values) else None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(a: dict, b: dict, limit: int = 4) -> str:
    fa, fb = _flatten(a), _flatten(b)
    keys = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
    text = ", ".join(f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in keys[:limit])
    return text + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _fmt(values: np.ndarray, unit: str = "") -> str:
    if len(values) == 0:
        return "-"
    scale, suffix = (2**20, " MiB") if unit == "bytes" else (1.0, unit)
    mean = values.mean() / scale
    if len(values) == 1:
        return f"{mean:.4g}{suffix}"
    return f"{mean:.4g} ± {values.std(ddof=1) / scale:.2g}{suffix} (n={len(values)})"


def _one_sided_p(worse: float, p_worse: float, p_better: float, deterministic: bool) -> tuple[float, float]:
    if deterministic:  # no spread: any difference is real
        return (0.0, 1.0) if worse > 0 else ((1.0, 0.0) if worse < 0 else (1.0, 1.0))
    return p_worse, p_better


def _tested(worse: float, p_worse: float, p_better: float, alpha: float, min_effect: float) -> str:
    """The verdict of a one-sided test: worse (or better) by at least `min_effect` with p < `alpha`."""
    if worse >= min_effect and p_worse < alpha:
        return "REGRESSION"
    return "improved" if -worse >= min_effect and p_better < alpha else "ok"


def _within_tolerance(worse: float, tolerance: float, min_effect: float) -> str:
    """The verdict without a test (one seed): worse (or better) by more than the larger of the two."""
    limit = max(tolerance, min_effect)
    return "REGRESSION" if worse > limit else "improved" if -worse > limit else "ok"


def paired_check(base: pd.Series, cur: pd.Series, higher_is_better: bool, *, alpha: float, min_effect: float,
                 tolerance: float) -> tuple[str, str]:
    """(delta text, verdict) for a metric over the same seeds on both sides (Series indexed by seed)."""
    diff = (cur - base.reindex(cur.index)).to_numpy(float)
    delta = float(diff.mean())
    worse = -delta if higher_is_better else delta
    if np.all(diff == 0):
        return f"{delta:+.4g} (paired, {len(diff)} seed(s): identical)", "ok"
    if len(diff) == 1:
        text = f"{delta:+.4g} (paired, 1 seed: tolerance {max(tolerance, min_effect):g})"
        return text, _within_tolerance(worse, tolerance, min_effect)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        tail, other = ("less", "greater") if higher_is_better else ("greater", "less")
        p_worse, p_better = _one_sided_p(worse, float(stats.ttest_1samp(diff, 0.0, alternative=tail).pvalue),
                                         float(stats.ttest_1samp(diff, 0.0, alternative=other).pvalue),
                                         deterministic=np.ptp(diff) == 0)
    return f"{delta:+.4g} (paired, {len(diff)} seeds, p={p_worse:.2g})", _tested(worse, p_worse, p_better, alpha,
                                                                                min_effect)


def seed_check(base: pd.Series, cur: pd.Series, higher_is_better: bool, *, alpha: float, min_effect: float,
               tolerance: float) -> tuple[str, str]:
    """(delta text, verdict) for a metric over seeds (Series indexed by seed): paired when both sides ran the same
    seeds, Welch's test when both have >= 2 different ones, else inconclusive."""
    base, cur = base.groupby(level=0).mean(), cur.groupby(level=0).mean()
    kwargs = {"alpha": alpha, "min_effect": min_effect, "tolerance": tolerance}
    if set(base.index) == set(cur.index):
        return paired_check(base, cur, higher_is_better, **kwargs)
    if len(base) >= 2 and len(cur) >= 2:
        return metric_check(base.to_numpy(float), cur.to_numpy(float), higher_is_better, **kwargs)
    n = min(len(base), len(cur))
    return f"{float(cur.mean() - base.mean()):+.4g}", f"inconclusive: different seeds, n={n}"


def metric_check(base: np.ndarray, cur: np.ndarray, higher_is_better: bool, *, alpha: float,
                 min_effect: float, tolerance: float) -> tuple[str, str]:
    """(delta text, verdict) for a metric over seeds, unpaired (Welch's test with >= 2 seeds a side)."""
    delta = float(cur.mean() - base.mean())
    worse = -delta if higher_is_better else delta  # > 0: current is worse
    if len(base) >= 2 and len(cur) >= 2:
        tail, other = ("less", "greater") if higher_is_better else ("greater", "less")
        with warnings.catch_warnings():  # one side with identical seeds: scipy warns, the test holds
            warnings.simplefilter("ignore", RuntimeWarning)
            p_worse, p_better = _one_sided_p(
                worse, float(stats.ttest_ind(cur, base, equal_var=False, alternative=tail).pvalue),
                float(stats.ttest_ind(cur, base, equal_var=False, alternative=other).pvalue),
                deterministic=np.ptp(base) == 0 and np.ptp(cur) == 0)
        return f"{delta:+.4g} (p={p_worse:.2g})", _tested(worse, p_worse, p_better, alpha, min_effect)
    text = f"{delta:+.4g} (< 2 seeds: tolerance {max(tolerance, min_effect):g})"
    return text, _within_tolerance(worse, tolerance, min_effect)


def _by_seed(runs: pd.DataFrame, column: str) -> pd.Series:
    """The column's values indexed by seed (runs without a seed get distinct negative ones: never paired)."""
    seeds = runs["seed"] if "seed" in runs.columns else pd.Series(np.nan, index=runs.index)
    seeds = [int(s) if pd.notna(s) else -1 - i for i, s in enumerate(seeds)]
    values = pd.Series(pd.to_numeric(runs[column], errors="coerce").to_numpy(float), index=seeds)
    return values.dropna()


def ratio_check(base: np.ndarray, cur: np.ndarray, limit: float, higher_is_worse: bool) -> tuple[str, str]:
    """(delta text, verdict) comparing medians: worse when cur/base beyond `limit` in the bad direction."""
    b, c = float(np.median(base)), float(np.median(cur))
    if b <= 0 or not math.isfinite(b) or not math.isfinite(c):
        return "-", "n/a"
    ratio = c / b
    return f"{100 * (ratio - 1):+.1f}%", "REGRESSION" if _beyond(ratio, limit, higher_is_worse) else "ok"


def _beyond(ratio: float, limit: float, higher_is_worse: bool) -> bool:
    """Whether a current/baseline ratio is beyond `limit` in the bad direction."""
    return ratio > limit if higher_is_worse else ratio < 1 / limit


def run_to_run_spread(frames: tuple[pd.DataFrame, ...], column: str) -> tuple[float, int]:
    """(sigma, degrees of freedom) of log(column) between runs of one config: the within-config deviations of every
    config group with >= 2 ok runs, on either side, pooled (one machine's run-to-run noise is shared by its configs).
    (nan, 0) when no config ran twice."""
    squares, dof = 0.0, 0
    for df in frames:
        if column not in df.columns:
            continue
        ok = df[df["_ok"]]
        for _, runs in ok.groupby("config_group"):
            logs = np.log(pd.to_numeric(runs[column], errors="coerce").dropna().to_numpy(float))
            logs = logs[np.isfinite(logs)]
            if len(logs) >= 2:
                squares += float(((logs - logs.mean()) ** 2).sum())
                dof += len(logs) - 1
    return (math.sqrt(squares / dof), dof) if dof else (math.nan, 0)


def _within_spread(base: np.ndarray, cur: np.ndarray, worse: float, spread: tuple[float, int],
                   alpha: float) -> tuple[str, str | None]:
    """(text, verdict) of a change beyond its limit against the run-to-run spread: REGRESSION when a one-sided
    t-test on the logs (pooled sigma) gives p < alpha, else inconclusive; verdict None when no spread is measured."""
    sigma, dof = spread
    if not dof:
        return "", None
    se = sigma * math.sqrt(1 / len(base) + 1 / len(cur))
    if se == 0:
        return f"; spread 0 over {dof} df", "REGRESSION"
    p = float(stats.t.sf(worse / se, dof))
    text = f"; run-to-run spread ±{100 * math.expm1(sigma):.0f}% ({dof} df), p={p:.2g}"
    return text, "REGRESSION" if p < alpha else "inconclusive: within the run-to-run spread"


def common_shift(base: pd.DataFrame, cur: pd.DataFrame, column: str) -> float | None:
    """The median over config groups (ok runs on both sides, at least 2 groups) of current/baseline median ratio of a
    column: how much the whole sweep moved. None with fewer than 2 groups."""
    ratios = []
    for group, b in base[base["_ok"]].groupby("config_group"):
        c = cur[(cur["config_group"] == group) & cur["_ok"]]
        if column in b.columns and column in c.columns:
            bv, cv = (pd.to_numeric(x[column], errors="coerce").dropna() for x in (b, c))
            if len(bv) and len(cv) and bv.median() > 0:
                ratios.append(float(cv.median() / bv.median()))
    return float(np.median(ratios)) if len(ratios) >= 2 else None


def perf_check(base: np.ndarray, cur: np.ndarray, limit: float, higher_is_worse: bool, *, spread: tuple[float, int],
               alpha: float, timing: bool, control: tuple[np.ndarray, np.ndarray] | None = None,
               shift: float | None = None) -> tuple[str, str]:
    """(delta text, verdict) of a memory or speed figure (positive values; runs of one config per side).

    Beyond `limit` (cur/base median ratio in the bad direction) is a REGRESSION only when the noise cannot explain it:
    - `control` (latency: the base model's, timed interleaved in the same runs) moved as much: the machine's state
      changed, not the method (ok);
    - without a control, timing whose sweep `shift` (every config's median ratio, see common_shift) is beyond the limit
      too, and this config within the limit of it: every config moved alike, which a busier machine does as well as
      code they all share (inconclusive);
    - a measured run-to-run `spread` (see run_to_run_spread): a one-sided t-test on the logs at `alpha`;
    - no spread measured: timing is inconclusive (timing moves between runs by more than any fixed factor: one seed a
      side measured +67% on a 3.7 ms p50 with the code unchanged); memory, which repeats within a few percent, is
      judged by its tolerance alone."""
    text, verdict = ratio_check(base, cur, limit, higher_is_worse)
    if verdict != "REGRESSION":
        return text, verdict
    if control is not None:
        (b_ctl, c_ctl) = control
        c_text, c_verdict = ratio_check(b_ctl, c_ctl, limit, higher_is_worse)
        overhead, o_verdict = ratio_check(base / b_ctl, cur / c_ctl, limit, higher_is_worse)
        if c_verdict == "REGRESSION" and o_verdict == "ok":
            return (f"{text} (the base model {c_text} in the same runs; over base {overhead})",
                    "ok: the machine, not the method")
    elif timing and shift is not None:
        alike = not _beyond(float(np.median(cur) / np.median(base)) / shift, limit, higher_is_worse)
        if alike and _beyond(shift, limit, higher_is_worse):
            return (f"{text} (every config's median {100 * (shift - 1):+.1f}%)",
                    "inconclusive: every config moved alike (the machine, or code they share)")
    logs = np.log(base), np.log(cur)
    worse = float(logs[1].mean() - logs[0].mean()) * (1 if higher_is_worse else -1)
    more, tested = _within_spread(base, cur, worse, spread, alpha)
    if tested is not None:
        return text + more, tested
    if timing:
        return f"{text} (one run a side: spread unmeasured)", "inconclusive: run >= 2 seeds a side"
    return text, verdict


def compare(base: pd.DataFrame, cur: pd.DataFrame, *, metrics: list[str], alpha: float = 0.05,
            min_effect: float = 0.01, tolerance: float = 0.02, memory_tol: float = 0.10,
            time_factor: float = 1.5, ignore_device: bool = False, allow_missing: bool = False,
            base_configs: dict | None = None, cur_configs: dict | None = None) -> pd.DataFrame:
    """One row per (config group, check): config, check, baseline, current, delta, verdict."""
    rows = []
    for df in (base, cur):
        df["_memory"] = _first_present(df, MEMORY_COLUMNS)
        df["_ok"] = df["status"] == "ok"
    perf = [("peak memory (train)", "_memory", 1 + memory_tol, True, "bytes")]
    perf += [(col, col, time_factor, True, " ms") for col in (BASE_LATENCY_COLUMN, *LATENCY_COLUMNS)]
    perf += [(THROUGHPUT_COLUMN, THROUGHPUT_COLUMN, time_factor, False, "/s")]
    spreads = {col: run_to_run_spread((base, cur), col) for _, col, *_ in perf}
    shifts = {col: common_shift(base, cur, col) for _, col, *_ in perf}
    cur_by_label = {_label_key(g.iloc[0]): k for k, g in cur.groupby("config_group")}
    base_by_label = {_label_key(g.iloc[0]): k for k, g in base.groupby("config_group")}

    for group, b_all in base.groupby("config_group", sort=False):
        label = _label(b_all, group)
        b = b_all[b_all["_ok"]]
        if b.empty:
            continue  # nothing ok to compare against
        c_all = cur[cur["config_group"] == group]
        c = c_all[c_all["_ok"]]
        if c.empty:
            if c_all.empty:
                hint = ""
                other = cur_by_label.get(_label_key(b_all.iloc[0]))
                if other and group in (base_configs or {}) and other in (cur_configs or {}):
                    changed = config_diff(base_configs[group], cur_configs[other])
                    hint = f"; current has this method/task with {changed}"
                what = f"missing in current{hint}"
            else:
                statuses = ", ".join(c_all["status"].astype(str))
                errors = c_all["error"].dropna().astype(str).tolist() if "error" in c_all.columns else []
                what = f"no ok run (status {statuses})" + (f": {errors[0][:120]}" if errors else "")
            rows.append({"config": label, "check": "runs", "baseline": f"{len(b)} ok", "current": what,
                         "delta": "-", "verdict": "n/a (missing)" if allow_missing else "REGRESSION"})
            continue
        for metric in metrics:
            if metric not in b.columns or metric not in c.columns:
                continue
            bs, cs = _by_seed(b, metric), _by_seed(c, metric)
            if bs.empty or cs.empty:
                continue
            delta, verdict = seed_check(bs, cs, "loss" not in metric, alpha=alpha, min_effect=min_effect,
                                        tolerance=tolerance)
            rows.append({"config": label, "check": metric, "baseline": _fmt(bs.to_numpy(float)),
                         "current": _fmt(cs.to_numpy(float)), "delta": delta, "verdict": verdict})

        same = _same_device(b, c)
        for name, col, limit, higher_is_worse, unit in perf:
            if col not in b.columns or col not in c.columns:
                continue
            pair = _positive(b, c, col, BASE_LATENCY_COLUMN if col in LATENCY_COLUMNS else None)
            if pair is None:
                continue
            (bv, cv), control = pair
            delta, verdict = perf_check(bv, cv, limit, higher_is_worse, spread=spreads[col], alpha=alpha,
                                        timing=col != "_memory", control=control, shift=shifts[col])
            if same is not None and not ignore_device:
                verdict = f"n/a ({same})"
            rows.append({"config": label, "check": name, "baseline": _fmt(bv, unit), "current": _fmt(cv, unit),
                         "delta": delta, "verdict": verdict})

    for group, c_all in cur.groupby("config_group", sort=False):
        if group not in set(base["config_group"]):
            other = base_by_label.get(_label_key(c_all.iloc[0]))
            hint = ""
            if other and other in (base_configs or {}) and group in (cur_configs or {}):
                hint = f" (baseline has it with {config_diff(base_configs[other], cur_configs[group])})"
            rows.append({"config": _label(c_all, group), "check": "runs", "baseline": "-",
                         "current": f"{int(c_all['_ok'].sum())} ok{hint}", "delta": "-", "verdict": "new"})
    return pd.DataFrame(rows, columns=["config", "check", "baseline", "current", "delta", "verdict"])


def _positive(b: pd.DataFrame, c: pd.DataFrame, col: str, control: str | None):
    """((base values, current values), (base control, current control) or None) over the runs where the figure (and
    its control, when it has one on both sides) is a positive number; None when a side has none."""
    def values(df: pd.DataFrame, with_control: bool) -> tuple[np.ndarray, np.ndarray | None]:
        v = pd.to_numeric(df[col], errors="coerce")
        ctl = pd.to_numeric(df[control], errors="coerce") if with_control else None
        keep = v > 0 if ctl is None else (v > 0) & (ctl > 0)
        return v[keep].to_numpy(float), None if ctl is None else ctl[keep].to_numpy(float)

    with_control = control is not None and control in b.columns and control in c.columns
    (bv, bc), (cv, cc) = values(b, with_control), values(c, with_control)
    if len(bv) == 0 or len(cv) == 0:
        return None
    return (bv, cv), ((bc, cc) if with_control else None)


def _same_device(b: pd.DataFrame, c: pd.DataFrame) -> str | None:
    """None when both sides ran on the same device and torch version, else why not."""
    for col, what in (("provenance.device", "device"), ("provenance.versions.torch", "torch"),
                      ("provenance.torch_threads", "threads")):
        bd = _mode(b[col]) if col in b.columns else None
        cd = _mode(c[col]) if col in c.columns else None
        if bd != cd and not (what == "threads" and None in (bd, cd)):  # a record may not say its thread count
            return f"{what} differs"
    return None


def to_markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in table.iterrows():
        verdict = f"**{row['verdict']}**" if row["verdict"] == "REGRESSION" else row["verdict"]
        cells = [str(row[c]).replace("|", "/") for c in cols[:-1]] + [verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _describe(df: pd.DataFrame, name: str, source: str) -> str:
    devices = sorted(set(df["provenance.device"].dropna().astype(str))) if "provenance.device" in df else []
    torch_v = sorted(set(df["provenance.versions.torch"].dropna().astype(str))) \
        if "provenance.versions.torch" in df else []
    ok = int((df["status"] == "ok").sum())
    return (f"{name}: {source}: {len(df)} runs ({ok} ok) in {df['config_group'].nunique()} configs; "
            f"device {', '.join(devices) or '?'}; torch {', '.join(torch_v) or '?'}")


def _values(df: pd.DataFrame, col: str) -> list[str]:
    if col not in df.columns:
        return ["missing"]
    values = df[col].map(lambda v: "missing" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    return sorted(set(values))


def environment_diff(base: pd.DataFrame, cur: pd.DataFrame) -> list[str]:
    """One line per package version, lock hash or content fingerprint whose values differ between the sides."""
    columns = sorted({c for df in (base, cur) for c in df.columns if c.startswith(PROVENANCE_PREFIXES)
                      and not c.endswith("_files")})  # the file lists come with their hash

    def show(values: list[str]) -> str:
        short = [v[:12] if len(v) == 64 else v for v in values]  # sha256s: a prefix is enough to tell them apart
        return ", ".join(short[:3]) + (f" (+{len(short) - 3} more)" if len(short) > 3 else "")

    lines = []
    for col in columns:
        b, c = _values(base, col), _values(cur, col)
        if b != c:
            name = col.removeprefix("provenance.versions.").removeprefix("provenance.")
            lines.append(f"- {name}: {show(b)} -> {show(c)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--baseline", required=True, help="records folder or table (.csv/.parquet)")
    ap.add_argument("--current", required=True, help="records folder or table (.csv/.parquet)")
    ap.add_argument("--metric", action="append", default=None,
                    help="metric column(s) to test (repeat); default main_metric_value")
    ap.add_argument("--alpha", type=float, default=0.05, help="significance level of the one-sided Welch test")
    ap.add_argument("--min-effect", type=float, default=0.01,
                    help="smallest metric drop (absolute, e.g. 0.01 = 1 accuracy point) that can be a regression")
    ap.add_argument("--tolerance", type=float, default=0.02,
                    help="metric drop allowed when a side has fewer than 2 seeds")
    ap.add_argument("--memory-tol", type=float, default=0.10, help="relative peak-memory growth allowed")
    ap.add_argument("--time-factor", type=float, default=1.5,
                    help="latency growth / throughput shrink factor allowed")
    ap.add_argument("--ignore-device", action="store_true",
                    help="compare memory and speed even across devices or torch versions")
    ap.add_argument("--allow-missing", action="store_true",
                    help="a baseline config without an ok current run is not a regression")
    ap.add_argument("--out", help="also write the Markdown report here")
    args = ap.parse_args(argv)

    try:
        base, base_configs = load_side(args.baseline)
        cur, cur_configs = load_side(args.current)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for df, src in ((base, args.baseline), (cur, args.current)):
        if df.empty or "config_group" not in df.columns:
            print(f"error: no run records with a config in {src}", file=sys.stderr)
            return 2
    table = compare(base, cur, metrics=args.metric or ["main_metric_value"], alpha=args.alpha,
                    min_effect=args.min_effect, tolerance=args.tolerance, memory_tol=args.memory_tol,
                    time_factor=args.time_factor, ignore_device=args.ignore_device,
                    allow_missing=args.allow_missing, base_configs=base_configs, cur_configs=cur_configs)
    n_reg = int((table["verdict"] == "REGRESSION").sum())
    differences = environment_diff(base, cur)
    report = "\n".join([
        _describe(base, "baseline", args.baseline), "", _describe(cur, "current", args.current), "",
        "Environment and inputs that differ (baseline -> current):" if differences else
        "Environment and inputs: the same package versions, lock and fingerprints on both sides.",
        *differences, "",
        to_markdown(table), "",
        f"{n_reg} regression(s) in {table['config'].nunique()} configs" if n_reg else
        f"no regression in {table['config'].nunique()} configs",
    ])
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return 1 if n_reg else 0


if __name__ == "__main__":
    sys.exit(main())
