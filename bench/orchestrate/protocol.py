"""`+protocol=tuned` (conf/protocol/tuned.yaml): every method gets the same tuning effort, chosen on validation, and
its choice is reported over seeds.

For the method of the job: one run per learning rate of the grid (the method's default lr, or `lr=`, times each of
`protocol.lr_factors`) at `protocol.selection_seed`, each with the validation split carved from train
(`budget.validation_rows`, bench/data/); the lr whose validation main metric is best (ties: the smaller lr; the rule
is bench/record/selection.py's) is then run with every seed of `protocol.seeds`. Each run is an ordinary run in its
own process (bench/orchestrate/isolate.py): the same identity as the same config run by hand, skipped when its ok
record exists, so an interrupted protocol resumes, and the selection seed's run at the chosen lr is the trial's. The
dev set is reported and never chooses. `python -m analysis.tuned` recomputes the same choice from the records alone.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bench import BenchError
from bench.data.tasks import task_from_config
from bench.metrics import higher_is_better
from bench.plan.schema import validate_protocol
from bench.record import read_record
from bench.record.selection import at_edge, choose, grid


def run_config(cfg: DictConfig, lr: float, seed: int, validation_rows: int) -> DictConfig:
    """The config of one run of the protocol: the job's, without `protocol`, at this lr, seed and validation split."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("protocol", None)
    data.update(lr=lr, seed=seed)
    data["budget"]["validation_rows"] = validation_rows
    return OmegaConf.create(data)


def _fmt(score: float | None) -> str:
    return "-" if score is None else f"{score:.4f}"


def _score(outcome: dict[str, Any]) -> float | None:
    record = read_record(Path(outcome["record"]).parent) if outcome.get("record") else None
    if not record or record.get("status") != "ok":
        return None
    return record.get("validation_main_metric_value")


def run_protocol(cfg: DictConfig, run_one: Callable[[DictConfig], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run the protocol for the job's method; the job's outcome for the sweep's progress (sweep.py)."""
    if run_one is None:
        from bench.orchestrate.isolate import run_isolated as run_one
    proto = validate_protocol(OmegaConf.to_container(cfg.protocol, resolve=True))
    method = str(cfg.method.name)
    default_lr = cfg.lr if cfg.get("lr") is not None else cfg.method.get("lr")
    try:
        default_lr = float(default_lr)
    except (TypeError, ValueError):
        raise BenchError(f"protocol: method '{method}' has no default lr (method.lr={default_lr!r}); set lr=") from None
    higher = higher_is_better(task_from_config(cfg.task).main_metric)
    rows = proto["validation_rows"]

    trials = []
    for factor, lr in zip(proto["lr_factors"], grid(default_lr, proto["lr_factors"])):
        outcome = run_one(run_config(cfg, lr, proto["selection_seed"], rows))
        trials.append({"lr": lr, "factor": factor, "status": outcome.get("status"), "run_id": outcome.get("run_id"),
                       "validation": _score(outcome), "skipped": bool(outcome.get("skipped"))})
    shown = ", ".join(f"{t['lr']:g}: {_fmt(t['validation'])}" for t in trials)
    best = choose(trials, higher)
    if best is None:
        error = f"protocol {proto['name']}: no lr trial of '{method}' ended ok ({shown})"
        print(f"[protocol] {error}")
        return {"run_id": f"protocol:{method}", "status": "error", "skipped": False, "error": error}
    edge = " (at the grid's edge: widen protocol.lr_factors)" if at_edge(best["lr"], [t["lr"] for t in trials]) else ""
    print(f"[protocol] {method}: validation {shown}; chosen lr {best['lr']:g}{edge}")
    finals = [run_one(run_config(cfg, best["lr"], seed, rows)) for seed in proto["seeds"]]
    failed = [f for f in finals if f.get("status") != "ok"]
    print(f"[protocol] {method}: lr {best['lr']:g} over seeds {proto['seeds']}: "
          f"{len(finals) - len(failed)} ok, {len(failed)} failed")
    everything = [*trials, *finals]
    return {"run_id": f"protocol:{method}", "status": "error" if failed else "ok",
            "skipped": all(t.get("skipped") for t in everything), "record": None,
            "error": failed[0].get("error") if failed else None}
