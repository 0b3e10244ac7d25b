"""Intruder dimensions and ΔW spectrum for every run of a results folder, cached per run.

    python -m analysis.analyse results/runs [--force] [--k 10] [--epsilon 0.5] [--max-rank 64]

Each analysed run's result goes to `<run dir>/analysis.json` (`ANALYSIS_FILE`, written atomically) under a key of
everything that changes its numbers: the analysis version, k, ε, the spectrum's rtol and max_rank, the record
(config hash and end time) and the saved weights (file names and sizes). A later call uses the file only when its
key is the same. When only ε differs, the counts are re-summarised from the stored per-layer scores (no SVD) and
the file is rewritten under the new key; any other difference recomputes. Stored: per layer the intruder scores
of the top-k vectors (counts for any ε follow without another SVD), the summary at the key's ε and over the ε grid,
and the ΔW spectrum (all singular values per layer) with the rank lab.

Only runs with saved weights are analysed; nothing is loaded for the others, and one line says how many were
skipped. Methods that leave W unchanged (or do not merge into it) get `status: "n/a"` and the reason from the
record alone, with or without weights; a run that cannot be rebuilt gets `status: "error"` (not cached).

analysis.json is typed (`Analysis`, with its `AnalysisKey`): it is validated when written, and a file that does not
follow the schema is computed again rather than read.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm.auto import tqdm

from analysis import intruders, spectrum
from analysis.weights import not_applicable
from bench import BenchError
from bench.model.rebuild import saved_weights
from bench.record import find_records, read_record, write_json_atomic

ANALYSIS_FILE = "analysis.json"
ANALYSIS_VERSION = 2
DEFAULT_MAX_RANK = 64


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AnalysisKey(_Block):
    """Everything that changes an analysis's numbers: a cached analysis.json is used only under the same key."""

    version: int = Field(description="ANALYSIS_VERSION: bumped when the computation changes")
    config_hash: str | None = Field(description="the record's identity")
    ended_at: str | None = Field(description="the record's end time (a rerun of the same config is another run)")
    weights: dict[str, int] = Field(description="the saved weights: {file inside weights/: size in bytes}")
    k: int = Field(description="top-k left singular vectors scored per layer")
    epsilon: float = Field(description="a vector is an intruder when its largest |cosine| with W0's is below this")
    rtol: float = Field(description="numerical rank: singular values above rtol x the largest")
    max_rank: int = Field(description="the rank lab's largest rank")


class Intruders(_Block):
    k: int
    epsilon: float
    total: int = Field(description="intruders over all analysed layers at epsilon")
    layers: int
    layers_with_intruders: int
    per_layer: dict[str, int]
    total_by_epsilon: dict[str, int] = Field(description="the total at each epsilon of the grid")
    scores: dict[str, list[float]] = Field(description="per layer: each top-k vector's largest |cosine| with W0's")


class Analysis(_Block):
    """A run's analysis.json: intruder dimensions and the ΔW spectrum, or why there are none."""

    key: AnalysisKey
    run_id: str
    method: str
    status: Literal["ok", "n/a"] = Field(description="n/a: the method leaves W unchanged (the reason says how)")
    reason: str | None = None
    intruders: Intruders | None = None
    spectrum: dict[str, Any] | None = Field(None, description="analysis/spectrum.py `spectrum`: per layer and mean "
                                                              "ranks of ΔW, the rank lab")
    timing_s: dict[str, float] | None = Field(None, description="rebuild_weights, intruders, spectrum")


def analysis_key(
    run_dir: str | Path,
    record: dict,
    k: int = intruders.DEFAULT_K,
    epsilon: float = intruders.DEFAULT_EPSILON,
    rtol: float = spectrum.DEFAULT_RTOL,
    max_rank: int = DEFAULT_MAX_RANK,
) -> dict:
    """Everything that changes the numbers of a run's analysis: a cache holds them under this key."""
    return {
        "version": ANALYSIS_VERSION,
        "config_hash": record.get("config_hash"),
        "ended_at": record.get("ended_at"),
        "weights": saved_weights(run_dir, record),
        "k": k,
        "epsilon": epsilon,
        "rtol": rtol,
        "max_rank": max_rank,
    }


def _read(path: Path) -> dict | None:
    """The analysis in `path` when it follows the schema; None otherwise (it is then computed again)."""
    try:
        return Analysis.model_validate_json(path.read_text()).model_dump(mode="json", exclude_unset=True)
    except (OSError, ValidationError):
        return None


def _write(path: Path, analysis: dict) -> None:
    write_json_atomic(path, Analysis.model_validate(analysis).model_dump(mode="json", exclude_unset=True))


def cached_analysis(run_dir: str | Path, key: dict) -> dict | None:
    """The run's analysis.json when it was computed under `key`. When only ε differs, its counts are re-summarised
    at the key's ε from the stored per-layer scores and the file is rewritten under `key`. None otherwise."""
    path = Path(run_dir) / ANALYSIS_FILE
    cached = _read(path)
    if cached is None:
        return None
    stored = cached["key"]
    if stored == key:
        return cached
    if {**stored, "epsilon": key["epsilon"]} != key:
        return None
    if cached.get("status") == "ok":
        cached["intruders"].update(intruders.summarise(cached["intruders"]["scores"], key["epsilon"]))
    cached["key"] = key
    _write(path, cached)
    return cached


def stored_analysis(run_dir: str | Path, record: dict) -> dict | None:
    """The run's analysis.json as it is, when it was computed by this analysis version for this record (same
    config hash and end time), at whatever k and ε it holds (`intruders.k`, `intruders.epsilon`); else None.
    For readers that show what is stored (`analysis.collect`); the report asks `analyse_all` instead."""
    cached = _read(Path(run_dir) / ANALYSIS_FILE)
    if cached is None:
        return None
    key = cached["key"]
    same = (key.get("version"), key.get("config_hash"), key.get("ended_at"))
    return cached if same == (ANALYSIS_VERSION, record.get("config_hash"), record.get("ended_at")) else None


def analyse_run(
    run_dir: str | Path,
    k: int = intruders.DEFAULT_K,
    epsilon: float = intruders.DEFAULT_EPSILON,
    rtol: float = spectrum.DEFAULT_RTOL,
    max_rank: int = DEFAULT_MAX_RANK,
    force: bool = False,
) -> dict:
    """Intruders + spectrum of one run (from the cache when its key is current)."""
    from analysis.weights import weight_pairs
    from bench.model.rebuild import read_run

    run_dir = Path(run_dir)
    record, _ = read_run(run_dir)
    key = analysis_key(run_dir, record, k, epsilon, rtol, max_rank)
    if not force:
        cached = cached_analysis(run_dir, key)
        if cached is not None:
            return cached
    out: dict = {"key": key, "run_id": record["run_id"], "method": record["method"]}
    try:
        wp = weight_pairs(run_dir)
    except BenchError as exc:
        return {**out, "status": "error", "error": str(exc)}
    if not wp.applicable:
        out.update(status="n/a", reason=wp.reason)
    else:
        start = time.perf_counter()
        scores = intruders.layer_scores(wp.pairs, k)
        intr_s = time.perf_counter() - start
        spec = spectrum.spectrum(wp.pairs, rtol, max_rank)
        out.update(
            status="ok",
            intruders={"k": k, **intruders.summarise(scores, epsilon), "scores": scores},
            spectrum=spec,
            timing_s={
                "rebuild_weights": wp.load_s,
                "intruders": intr_s,
                "spectrum": time.perf_counter() - start - intr_s,
            },
        )
    _write(run_dir / ANALYSIS_FILE, out)
    return out


def ok_runs(results: str | Path) -> list[tuple[Path, dict]]:
    """(run folder, record) of every ok run under `results`."""
    out = []
    for path in find_records(results):
        rec = read_record(path)
        if rec is not None and rec.get("status") == "ok":
            out.append((path.parent, rec))
    return out


def _has_weights(run_dir: Path, record: dict) -> bool:
    """The run saved weights, and its record holds the resolved config to rebuild the model they belong to."""
    return "config" in record and bool(saved_weights(run_dir, record))


def run_dirs(results: str | Path) -> list[Path]:
    """Folders of ok runs that saved weights."""
    return [run_dir for run_dir, rec in ok_runs(results) if _has_weights(run_dir, rec)]


def analyse_all(
    results: str | Path,
    force: bool = False,
    *,
    k: int = intruders.DEFAULT_K,
    epsilon: float = intruders.DEFAULT_EPSILON,
    rtol: float = spectrum.DEFAULT_RTOL,
    max_rank: int = DEFAULT_MAX_RANK,
    compute: bool = True,
) -> dict[str, dict]:
    """{run dir: analysis} for the ok runs under `results`: computed (or taken from a current cache) for runs with
    saved weights; "n/a" from the record alone for runs whose method leaves W unchanged; other runs without weights
    are left out and nothing is loaded for them. `compute=False`: current caches only (no model is loaded). Prints
    one summary line of what was skipped to stderr."""
    settings = {"k": k, "epsilon": epsilon, "rtol": rtol, "max_rank": max_rank}
    runs = ok_runs(results)
    todo = [(run_dir, rec) for run_dir, rec in runs if _has_weights(run_dir, rec)]
    with_weights = {run_dir for run_dir, _ in todo}
    out: dict[str, dict] = {}
    not_applicable_n = errors = not_cached = 0
    bar = tqdm(todo, desc="intruders/spectrum", unit="run",
               disable=not todo or not compute or os.environ.get("BENCH_PROGRESS", "1") == "0")
    for run_dir, rec in bar:
        if compute:
            res = analyse_run(run_dir, force=force, **settings)
        else:
            res = cached_analysis(run_dir, analysis_key(run_dir, rec, **settings))
            if res is None:
                not_cached += 1
                continue
        out[str(run_dir)] = res
        if res["status"] == "error":  # one broken run (e.g. a corrupt weights file) is skipped, never fatal
            errors += 1
            print(f"warning: skipped {run_dir.name}: {res['error']}", file=sys.stderr)
    for run_dir, rec in runs:
        if run_dir in with_weights:
            continue
        try:
            reason = not_applicable(rec)
        except (BenchError, KeyError):  # a method this checkout does not have: not analysed
            reason = None
        if reason:
            not_applicable_n += 1
            out[str(run_dir)] = {"key": analysis_key(run_dir, rec, **settings), "run_id": rec.get("run_id"),
                                 "method": rec.get("method"), "status": "n/a", "reason": reason}
    line = f"weights analysis: {len(todo)} of {len(runs)} ok runs have saved weights"
    skipped = len(runs) - len(todo)
    if skipped:
        line += f"; the {skipped} without are skipped"
        if not_applicable_n:
            line += f" (n/a anyway for {not_applicable_n}: their method leaves W unchanged or does not merge)"
    if not compute and todo:
        line += f"; not computed (--no-weights): {len(todo) - not_cached} with a current cache shown"
    if errors:
        line += f"; {errors} could not be analysed (warnings above)"
    print(line, file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--force", action="store_true", help="recompute even when analysis.json is current")
    ap.add_argument("--k", type=int, default=intruders.DEFAULT_K)
    ap.add_argument("--epsilon", type=float, default=intruders.DEFAULT_EPSILON)
    ap.add_argument("--max-rank", type=int, default=DEFAULT_MAX_RANK)
    args = ap.parse_args(argv)
    if not Path(args.results).exists():
        ap.error(f"{args.results}: no such folder")  # exit 2: a usage error
    start = time.perf_counter()
    results = analyse_all(
        args.results, force=args.force, k=args.k, epsilon=args.epsilon, max_rank=args.max_rank
    )
    for run_dir, res in results.items():
        name = Path(run_dir).name
        if res["status"] == "ok":
            sp, intr = res["spectrum"], res["intruders"]
            print(
                f"{name}: intruders {intr['total']} (top-{intr['k']}, eps {intr['epsilon']:g}), mean effective "
                f"rank of dW {sp['mean_effective_rank'] or 0:.1f}, "
                f"90% energy rank {sp['mean_energy90_rank'] or 0:.1f}"
            )
        else:
            print(f"{name}: {res['status']} ({res.get('reason') or res.get('error')})")
    print(f"{len(results)} runs in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
