"""Popular claims about LoRA, checked against a sweep's runs and stated with the figures, whichever way
they come out (used by `analysis.report`).

Rules (also printed with each verdict):
- Tasks where the reference did not learn (mean within 2 points of chance level: the majority class's share,
  or 0 for correlations) are reported but not judged.
- "LoRA matches full fine-tuning": per task, the mean over seeds of LoRA at each rank against full
  fine-tuning; a rank *matches* when it is within max(1 point, 2 x the larger seed std) of full FT (metric
  x 100) or better. Supported when the best LoRA rank matches on every task; partly when on some.
- "LoRA does not forget": LoRA's forgetting (probe before − after, x 100) at every rank is at most 1 point.
  Also says whether LoRA forgets less than full fine-tuning.
- "merged LoRA adds no latency": the median over LoRA runs of merged / base latency is at most
  1 + max(5%, the base model's own p95/p50 spread); not enough data when that spread exceeds 25%.
  The ratio of a run is the median over its interleaved rounds of merged / base (paired by round, so a slow
  spell of a shared machine cancels out; records from before it existed: the p50 ratio). Runs whose rounds
  disagree by more than 2 x `measure.latency_noise_tol` (`latency.merged_over_base_too_noisy`) are left out;
  when no run is left, the verdict is "too noisy to tell". Unmerged / base is shown beside it.
- "intruders grow as rank falls": over LoRA runs analysed at three or more ranks, Spearman's ρ between rank
  and intruder count is negative and the lowest rank has more intruders than the highest.
- "intruder dimensions track forgetting": over LoRA runs with an intruder count and a forgetting probe (5 or more per
  task, 3 or more of them off the most common count), Spearman's ρ between the two is positive with its 95% bootstrap
  interval over runs above 0.

Power: the comparisons of means say what they can detect. With n_a and n_b runs and a per-run standard deviation sd,
a two-sided test at 5% finds a true difference with 80% probability when it is at least
(1.96 + 0.84) x sd x sqrt(1/n_a + 1/n_b) (the normal approximation); the runs a side needed to tell an observed
difference d apart are 2 x ((1.96 + 0.84) x sd / d)^2. sd is the seeds' pooled standard deviation where a side ran
two or more seeds, else the dev set's own sampling sd of an accuracy, 100 x sqrt(p(1 - p) / N) points (a floor: seeds
add their own spread on top).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from analysis.tables import TASK_LABEL, chance_levels

LEARN_POINTS = 2.0  # a configuration "learned" the task when its mean is this far above chance level
MATCH_POINTS = 1.0
FORGET_POINTS = 1.0
LATENCY_TOL = 0.05
MAX_NOISE = 0.25  # base p95/p50 above 1.25: too noisy to judge a few-percent claim


Z_POWER = 1.96 + 0.84  # two-sided 5% test, 80% power


def detectable(sd: float, n_a: int, n_b: int) -> float:
    """The smallest true difference a two-sided 5% test finds with 80% probability (module docstring)."""
    return Z_POWER * sd * math.sqrt(1 / n_a + 1 / n_b)


def runs_needed(sd: float, diff: float) -> int:
    """Runs a side for a two-sided 5% test to find `diff` with 80% probability."""
    return max(2, math.ceil(2 * (Z_POWER * sd / abs(diff)) ** 2)) if diff else 0


def _spread(groups: list[pd.Series], mean_pct: float, dev_rows: float) -> tuple[float, str]:
    """(sd in points, what it is): the seeds' pooled sd where a group has two or more runs, else the dev set's sampling
    sd of an accuracy of `mean_pct` over `dev_rows` examples."""
    dof = sum(len(g) - 1 for g in groups if len(g) >= 2)
    if dof:
        squares = sum(float(((g - g.mean()) ** 2).sum()) for g in groups if len(g) >= 2)
        return math.sqrt(squares / dof), f"seed sd over {dof} df"
    p = min(max(mean_pct / 100, 0.0), 1.0)
    if dev_rows and dev_rows > 0:
        return 100 * math.sqrt(max(p * (1 - p), 1e-4) / dev_rows), f"the {int(dev_rows)} dev examples' sampling sd"
    return float("nan"), "no spread known"


def power_line(label: str, a: pd.Series, b: pd.Series, dev_rows: float) -> str:
    """What a comparison of two groups of runs (metric x 100) can detect, and the runs that would decide it."""
    diff = float(a.mean() - b.mean())
    sd, what = _spread([a, b], float(pd.concat([a, b]).mean()), dev_rows)
    if not math.isfinite(sd):
        return f"{label}: power unknown (no spread measured)"
    text = (f"{label}: with {len(a)} vs {len(b)} run(s) and sd {sd:.2f} points ({what}), differences under "
            f"{detectable(sd, len(a), len(b)):.1f} points are not detectable")
    need = runs_needed(sd, diff)
    if need > max(len(a), len(b)):
        text += f"; the observed {diff:+.1f} needs about {need} runs a side to be told from noise"
    elif need:
        text += f"; the observed {diff:+.1f} is above that"
    return text


@dataclass
class Claim:
    claim: str
    verdict: str  # supported | partly supported | not supported | not enough data | too noisy to tell
    lines: list[str] = field(default_factory=list)
    rule: str = ""

    def markdown(self) -> str:
        body = "\n".join(f"- {line}" for line in self.lines)
        return f'**"{self.claim}"**: **{self.verdict}**.\n\n{body}\n\n_Rule: {self.rule}_\n'


def _t(task: str) -> str:
    return TASK_LABEL.get(task, task)


def _means(df: pd.DataFrame, value: str, keys=("task", "method", "rank_key")) -> pd.DataFrame:
    g = df.groupby(list(keys), dropna=False)[value]
    return pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n": g.count()}).reset_index()


def lora_matches_full(df: pd.DataFrame) -> Claim:
    rule = (
        f"a LoRA rank matches when its mean is within max({MATCH_POINTS:g} point, 2 x the larger seed std) "
        f"of full FT, or above it; supported when the best rank matches on every task"
    )
    claim = "LoRA matches full fine-tuning"
    m = _means(df[df["method"].isin(["lora", "full"])], "metric_pct")
    tasks = sorted(set(m.loc[m["method"] == "lora", "task"]) & set(m.loc[m["method"] == "full", "task"]))
    if not tasks:
        missing = [name for name in ("lora", "full") if name not in set(df["method"])]
        return Claim(
            claim,
            "not enough data",
            [
                (
                    f"needs LoRA and full fine-tuning runs on the same task "
                    f"(missing: {', '.join(missing) or 'a common task'}): one run each gives a verdict, three seeds "
                    f"each detect differences of about {detectable(1.0, 3, 3):.1f} seed sds (80% power, 5% test)"
                )
            ],
            rule,
        )
    lines, best_matches, judged = [], 0, 0
    chance = chance_levels(df)
    for task in tasks:
        full = m[(m["task"] == task) & (m["method"] == "full")].iloc[0]
        lora = m[(m["task"] == task) & (m["method"] == "lora")].sort_values("rank_key")
        if task in chance and full["mean"] < chance[task] + LEARN_POINTS:
            lines.append(
                f"{_t(task)}: full FT {full['mean']:.1f} is within {LEARN_POINTS:g} points of chance "
                f"({chance[task]:.1f}): it did not learn the task in this budget, nothing to match"
            )
            continue
        judged += 1
        parts, ok_any = [], False
        for _, r in lora.iterrows():
            tol = max(MATCH_POINTS, 2 * np.nanmax([r["std"], full["std"], 0.0]))
            diff = r["mean"] - full["mean"]
            ok = diff >= -tol
            ok_any |= ok
            parts.append(f"r={int(r['rank_key'])}: {r['mean']:.1f} ({diff:+.1f}{'' if ok else ', no'})")
        best_matches += ok_any
        lines.append(f"{_t(task)}: full FT {full['mean']:.1f} (n={int(full['n'])}); LoRA " + "; ".join(parts))
        best = lora.sort_values("mean").iloc[-1]
        runs = df[df["task"] == task]
        full_runs = runs.loc[runs["method"] == "full", "metric_pct"].dropna()
        lora_runs = runs.loc[(runs["method"] == "lora") & (runs["rank_key"] == best["rank_key"]), "metric_pct"].dropna()
        dev_rows = float(runs["data.dev_rows"].median()) if "data.dev_rows" in runs else float("nan")
        lines.append(power_line(f"{_t(task)} power (LoRA r={int(best['rank_key'])} vs full FT)", lora_runs,
                                full_runs, dev_rows))
    if not judged:
        return Claim(claim, "not enough data", lines, rule)
    verdict = "not supported"
    if best_matches:
        verdict = "supported" if best_matches == judged else "partly supported"
    return Claim(claim, verdict, lines, rule)


def lora_does_not_forget(df: pd.DataFrame) -> Claim:
    claim = "LoRA does not forget"
    rule = f"LoRA's forgetting is at most {FORGET_POINTS:g} point (probe score x 100) at every rank"
    d = df[df["forgetting_value"].notna()].assign(f100=lambda x: x["forgetting_value"] * 100)
    if "forgetting.note" in d.columns:  # the STS probe on an STS-B run measures learning, not forgetting
        d = d[d["forgetting.note"].isna()]
    lora = d[d["method"] == "lora"]
    if lora.empty:
        return Claim(
            claim, "not enough data", ["no LoRA run measured forgetting (run with forgetting=sts)"], rule
        )
    probe = ", ".join(sorted(d["forgetting.probe"].dropna().unique()))
    m = _means(d[d["method"].isin(["lora", "full"])], "f100")
    lines, worst, less_than_full = [], -np.inf, []
    chance = chance_levels(d)
    learned = _means(lora, "metric_pct")
    for task in sorted(set(m.loc[m["method"] == "lora", "task"])):
        lo = m[(m["task"] == task) & (m["method"] == "lora")].sort_values("rank_key")
        full = m[(m["task"] == task) & (m["method"] == "full")]
        best = learned.loc[learned["task"] == task, "mean"].max()
        if task in chance and best < chance[task] + LEARN_POINTS:
            lines.append(
                f"{_t(task)}: LoRA's best metric {best:.1f} is within {LEARN_POINTS:g} points of chance "
                f"({chance[task]:.1f}): it barely changed the model, so its forgetting says little"
            )
            continue
        worst = max(worst, lo["mean"].max())
        text = f"{_t(task)}: LoRA forgets " + "; ".join(
            f"r={int(r['rank_key'])}: {r['mean']:+.2f}" for _, r in lo.iterrows()
        )
        if not full.empty:
            f = full["mean"].iloc[0]
            less_than_full.append(bool(lo["mean"].max() < f))
            text += f"; full FT {f:+.2f}"
        lines.append(text + " points")
        worst_rank = lo.sort_values("mean").iloc[-1]["rank_key"]
        runs = d[d["task"] == task]
        worst_runs = runs.loc[(runs["method"] == "lora") & (runs["rank_key"] == worst_rank), "f100"]
        if not full.empty:  # forgetting has no sampling formula: the spread is the seeds' or unknown
            lines.append(power_line(f"{_t(task)} power (LoRA r={int(worst_rank)} vs full FT forgetting)", worst_runs,
                                    runs.loc[runs["method"] == "full", "f100"], float("nan")))
        elif len(worst_runs) >= 2:
            sd = float(worst_runs.std(ddof=1))
            lines.append(f"{_t(task)} power: {len(worst_runs)} seeds at r={int(worst_rank)}, sd {sd:.2f} points: "
                         f"forgetting within {Z_POWER * sd / math.sqrt(len(worst_runs)):.2f} points of the "
                         f"{FORGET_POINTS:g}-point limit cannot be told from it")
    if not np.isfinite(worst):
        return Claim(claim, "not enough data", lines, rule)
    base_before = lora["forgetting.before"].mean() * 100 if "forgetting.before" in lora else np.nan
    lines.append(f"probe: {probe}; base model score {base_before:.1f} (x 100); positive = ability lost")
    if less_than_full:
        lines.append(
            f"LoRA forgets less than full FT on {sum(less_than_full)} of {len(less_than_full)} tasks "
            f"(comparing LoRA's worst rank with full FT)"
        )
    else:
        lines.append("no full FT run with forgetting to compare against")
    return Claim(claim, "supported" if worst <= FORGET_POINTS else "not supported", lines, rule)


def _flag(df: pd.DataFrame, column: str) -> pd.Series:
    """A boolean column, False where the records do not have the field (the column may be missing altogether)."""
    if column not in df:
        return pd.Series(False, index=df.index)
    return df[column].map(lambda v: v is True or v == 1.0).astype(bool)


def _ratio(df: pd.DataFrame, variant: str) -> pd.Series:
    """Per run: `variant` / base latency paired by round where recorded, else the ratio of p50s."""
    p50 = df[f"latency.{variant}.p50_ms"] / df["latency.base.p50_ms"]
    column = f"latency.{variant}_over_base_ratio"
    return pd.to_numeric(df[column], errors="coerce").fillna(p50) if column in df else p50


def merged_lora_no_latency(df: pd.DataFrame) -> Claim:
    claim = "merged LoRA adds no latency"
    rule = (
        f"median over LoRA runs of merged / base (paired by round) ≤ 1 + max({LATENCY_TOL:.0%}, the base "
        f"model's median p95/p50 − 1); runs flagged too noisy (rounds disagree) left out"
    )
    need = ["latency.base.p50_ms", "latency.merged.p50_ms"]
    lora = df[df["method"] == "lora"]
    if lora.empty or any(c not in lora.columns for c in need) or lora[need].isna().any(axis=1).all():
        return Claim(claim, "not enough data", ["no LoRA run with base and merged latency"], rule)
    lora = lora.dropna(subset=need)
    noisy = _flag(lora, "latency.merged_over_base_too_noisy")
    if noisy.all():
        return Claim(claim, "too noisy to tell", [
            f"the interleaved latency rounds of all {len(lora)} LoRA runs disagree by more than twice "
            f"measure.latency_noise_tol (their merged / base medians: {_ratio(lora, 'merged').round(3).tolist()}); "
            "re-measure on a quiet machine (cpu_threads=1, more measure.latency_rounds)"], rule)
    left_out = int(noisy.sum())
    lora = lora[~noisy]
    merged = _ratio(lora, "merged")
    noise = (
        float((lora["latency.base.p95_ms"] / lora["latency.base.p50_ms"] - 1).median())
        if "latency.base.p95_ms" in lora
        else 0.0
    )
    tol = max(LATENCY_TOL, noise)
    if noise > MAX_NOISE:
        return Claim(
            claim,
            "not enough data",
            [
                (
                    f"the base model's own latency is too noisy to judge: median p95/p50 = {1 + noise:.2f} "
                    f"(allowed up to {1 + MAX_NOISE:.2f}); merged / base p50 median "
                    f"{merged.median():.3f} over "
                    f"{len(lora)} LoRA runs. Re-measure on a quiet machine (more measure.latency_iters)"
                )
            ],
            rule,
        )
    lines = [
        (
            f"merged / base: median {merged.median():.3f} (range {merged.min():.3f}–{merged.max():.3f}) "
            f"over {len(lora)} LoRA runs" + (f" ({left_out} too noisy to use, left out)" if left_out else "")
        )
    ]
    if "latency.unmerged.p50_ms" in lora:
        unmerged = _ratio(lora, "unmerged")
        lines.append(
            f"unmerged / base: median {unmerged.median():.3f} (range {unmerged.min():.3f}–"
            f"{unmerged.max():.3f})"
        )
    if len(merged) >= 2:
        sd = float(merged.std(ddof=1))
        lines.append(f"power: {len(merged)} runs, merged / base sd {sd:.3f}: a slowdown under "
                     f"{Z_POWER * sd / math.sqrt(len(merged)):.1%} is not detectable (80% power, 5% test)")
    else:
        lines.append("power: one run, no spread of merged / base: repeat the run (seeds) to know what it can detect")
    lines.append(
        f"base p50 {lora['latency.base.p50_ms'].median():.1f} ms, merged "
        f"{lora['latency.merged.p50_ms'].median():.1f} ms (medians); noise allowance {tol:.1%}"
    )
    if merged.median() < 1 - tol:
        lines.append(
            "merged is clearly *faster* than the base model measured in the same run: the base "
            "measurement (taken first) is likely disturbed by warm-up or machine load; "
            "compare the ratios with care"
        )
    return Claim(claim, "supported" if merged.median() <= 1 + tol else "not supported", lines, rule)


def intruders_grow_as_rank_falls(df: pd.DataFrame) -> Claim:
    claim = "intruders grow as rank falls"
    rule = (
        "over LoRA runs at ≥ 3 ranks: Spearman's ρ(rank, intruders) < 0 and more intruders at the lowest "
        "rank than at the highest"
    )
    lora = df[(df["method"] == "lora") & df["intruders"].notna()]
    if lora.empty:
        return Claim(
            claim, "not enough data", ["no LoRA run has an intruder analysis (needs saved weights)"], rule
        )
    lines, verdicts = [], []
    full = df[(df["method"] == "full") & df["intruders"].notna()]
    for task, part in lora.groupby("task"):
        ranks = sorted(part["rank_key"].unique())
        means = part.groupby("rank_key")["intruders"].mean()
        text = f"{_t(task)}: " + ", ".join(f"r={int(r)}: {means[r]:.1f}" for r in ranks)
        f = full[full["task"] == task]["intruders"]
        if not f.empty:
            text += f"; full FT {f.mean():.1f}"
        if len(ranks) < 3:
            lines.append(text + f" (only {len(ranks)} rank(s): not enough)")
            continue
        rho = spearmanr(part["rank_key"], part["intruders"]).statistic
        grows = bool(np.isfinite(rho) and rho < 0 and means[ranks[0]] > means[ranks[-1]])
        verdicts.append(grows)
        lines.append(
            text + f"; Spearman ρ(rank, intruders) = {rho:+.2f}"
            if np.isfinite(rho)
            else text + "; ρ undefined (constant counts)"
        )
    if not verdicts:
        return Claim(
            claim, "not enough data", lines + ["needs LoRA runs analysed at three or more ranks"], rule
        )
    verdict = "supported" if all(verdicts) else "partly supported" if any(verdicts) else "not supported"
    return Claim(claim, verdict, lines, rule)


def spearman_interval(x: np.ndarray, y: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(Spearman's ρ, 95% bootstrap percentile interval over runs): runs drawn with replacement; draws where either
    variable is constant (ρ undefined) are left out."""
    rho = float(spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(x), len(x))
        if np.ptp(x[idx]) > 0 and np.ptp(y[idx]) > 0:
            draws.append(spearmanr(x[idx], y[idx]).statistic)
    low, high = np.percentile(draws, [2.5, 97.5]) if draws else (np.nan, np.nan)
    return rho, float(low), float(high)


MIN_OFF_MODE = 3  # runs whose intruder count differs from the most common count, for a ρ worth an interval


def intruders_track_forgetting(df: pd.DataFrame) -> Claim:
    claim = "intruder dimensions track forgetting"
    rule = ("over LoRA runs with both an intruder count (saved weights) and a forgetting probe, at least 5 per task "
            f"and at least {MIN_OFF_MODE} whose count differs from the most common one: Spearman's "
            "ρ(intruders, forgetting) > 0 with its 95% bootstrap interval (over runs) above 0")
    need = ["intruders", "forgetting_value"]
    lora = df[(df["method"] == "lora") & df[need].notna().all(axis=1)] if set(need) <= set(df.columns) else df[:0]
    if lora.empty:
        return Claim(claim, "not enough data", [
            "no LoRA run has both an intruder count and a forgetting probe: run LoRA at several ranks with "
            "forgetting=sts (encoders) or forgetting=wiki (causal LMs) and save_weights=adapter, then analyse; "
            "5 runs per task at least, and with 20 a ρ of about 0.6 has an interval clear of 0"], rule)
    lines, verdicts = [], []
    for task, part in lora.groupby("task"):
        x, y = part["intruders"].to_numpy(float), (100 * part["forgetting_value"]).to_numpy(float)
        off_mode = int((x != pd.Series(x).mode().iloc[0]).sum())  # runs whose count is not the most common one
        if len(part) < 5 or off_mode < MIN_OFF_MODE or np.ptp(y) == 0:
            why = ("" if len(part) < 5 else f", {off_mode} with a count other than the most common"
                   if off_mode < MIN_OFF_MODE else ", forgetting constant")
            lines.append(f"{_t(task)}: {len(part)} run(s){why}: not enough (5 or more runs, {MIN_OFF_MODE} or more of "
                         "them off the most common count, needed: with fewer, most bootstrap draws hold one count "
                         "and the interval is an artefact)")
            continue
        rho, low, high = spearman_interval(x, y)
        verdicts.append(bool(low > 0))
        lines.append(f"{_t(task)}: Spearman ρ(intruders, forgetting) = {rho:+.2f} [95% CI {low:+.2f}, {high:+.2f}] "
                     f"over {len(part)} LoRA runs (intruders {x.min():.0f}–{x.max():.0f}, forgetting "
                     f"{y.min():+.2f}–{y.max():+.2f} points)")
    if not verdicts:
        return Claim(claim, "not enough data", lines, rule)
    verdict = "supported" if all(verdicts) else "partly supported" if any(verdicts) else "not supported"
    return Claim(claim, verdict, lines, rule)


CLAIMS = (lora_matches_full, lora_does_not_forget, merged_lora_no_latency, intruders_grow_as_rank_falls,
          intruders_track_forgetting)


def check_all(df: pd.DataFrame) -> list[Claim]:
    """Every claim on one group of ok runs (output of `analysis.tables.ok_frame`)."""
    return [fn(df) for fn in CLAIMS]
