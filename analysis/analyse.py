"""Intruder dimensions and ΔW spectrum for every run of a results folder, cached per run.

    python -m analysis.analyse results/runs [--force] [--k 10] [--max-rank 64]

Each run's result goes to `<run dir>/analysis.json` (written atomically) with the settings and the run's
config hash it was computed for; a later call reuses it when they match, so re-running a report is fast.
Stored: per layer the intruder scores of the top-k vectors (counts for any ε follow without another SVD),
the summary at ε = 0.5 and over the ε grid, and the ΔW spectrum (all singular values per layer) with the
rank lab. Methods that leave W unchanged get `status: "n/a"` and the reason; a run that cannot be
rebuilt gets `status: "error"` (not cached).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from analysis import intruders, spectrum
from bench import BenchError
from bench.record import find_records, read_record, write_json_atomic

ANALYSIS_FILE = "analysis.json"
ANALYSIS_VERSION = 1


def _key(record: dict, k: int, rtol: float, max_rank: int) -> dict:
    return {
        "version": ANALYSIS_VERSION,
        "config_hash": record.get("config_hash"),
        "ended_at": record.get("ended_at"),
        "k": k,
        "rtol": rtol,
        "max_rank": max_rank,
    }


def analyse_run(
    run_dir: str | Path,
    k: int = intruders.DEFAULT_K,
    epsilon: float = intruders.DEFAULT_EPSILON,
    rtol: float = spectrum.DEFAULT_RTOL,
    max_rank: int = 64,
    force: bool = False,
) -> dict:
    """Intruders + spectrum of one run (from the cache when it is current)."""
    from analysis.weights import read_run, weight_pairs

    run_dir = Path(run_dir)
    record, _ = read_run(run_dir)
    key = _key(record, k, rtol, max_rank)
    cache = run_dir / ANALYSIS_FILE
    if not force and cache.is_file():
        try:
            cached = json.loads(cache.read_text())
        except (OSError, json.JSONDecodeError):
            cached = {}
        if cached.get("key") == key:
            if cached.get("status") == "ok" and cached["intruders"]["epsilon"] != epsilon:
                cached["intruders"].update(intruders.summarise(cached["intruders"]["scores"], epsilon))
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
    write_json_atomic(cache, out)
    return out


def run_dirs(results: str | Path) -> list[Path]:
    """Folders of ok runs that saved weights."""
    dirs = []
    for path in find_records(results):
        rec = read_record(path)
        if rec is None:
            continue
        if rec.get("status") == "ok" and rec.get("weights_dir") and "config" in rec:
            dirs.append(path.parent)
    return dirs


def analyse_all(results: str | Path, force: bool = False, **kwargs) -> dict[str, dict]:
    """{run dir: analysis} for every ok run with weights under `results`."""
    out = {}
    for run_dir in tqdm(run_dirs(results), desc="intruders/spectrum", unit="run"):
        out[str(run_dir)] = res = analyse_run(run_dir, force=force, **kwargs)
        if res["status"] == "error":  # one broken run (e.g. a corrupt weights file) is skipped, never fatal
            print(f"warning: skipped {run_dir.name}: {res['error']}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--force", action="store_true", help="recompute even when analysis.json is current")
    ap.add_argument("--k", type=int, default=intruders.DEFAULT_K)
    ap.add_argument("--epsilon", type=float, default=intruders.DEFAULT_EPSILON)
    ap.add_argument("--max-rank", type=int, default=64)
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
            sp = res["spectrum"]
            print(
                f"{name}: intruders {res['intruders']['total']} (eps {args.epsilon}), mean effective rank of "
                f"dW {sp['mean_effective_rank'] or 0:.1f}, "
                f"90% energy rank {sp['mean_energy90_rank'] or 0:.1f}"
            )
        else:
            print(f"{name}: {res['status']} ({res.get('reason') or res.get('error')})")
    print(f"{len(results)} runs in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
