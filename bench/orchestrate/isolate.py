"""One process per run in a sweep, so that a run killed from outside is a record, not the end of the sweep.

The kernel's out-of-memory killer sends SIGKILL to the largest process, which no Python code can catch. Without
isolation that process is the launcher's worker itself: the basic launcher's sweep ends there, and joblib's pool
breaks (TerminatedWorkerError), killing the other worker's run and never starting the rest. With
`isolate_runs` (default `auto`: in multirun) each job starts its run in a child process
(`python -m bench.orchestrate.isolate <config>`) and waits for it. The child is the large process, so the OOM
killer picks it; the job then writes an `error` record for it ("killed by SIGKILL ...") and returns, and the sweep
goes on.
The next invocation runs it again (failed runs are retried by default), taking over its stale lock.
Cost: one Python start per run (a few seconds), small beside a run; single runs are not isolated.

A distributed run (`distributed=ddp|fsdp` without a launcher around the suite) always runs this way, its child being
torchrun's engine (`python -m torch.distributed.run --standalone --nproc_per_node=N`) starting N ranks of this module:
when a rank dies, torchrun stops the others and exits non-zero, and the job records the run as failed.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bench import BenchError
from bench.model.distributed import planned_world
from bench.orchestrate.lock import RunLock
from bench.record import SCHEMA_VERSION, read_record, write_json_atomic, write_result

OUTCOME_ENV = "BENCH_RUN_OUTCOME"  # set by the parent: where the child says who it is and how it ended


def announce(identity: dict[str, Any]) -> None:
    """In an isolated child: tell the parent the run's identity (run_id, run_dir, config hash, ...) before it runs,
    so the parent can record the run if the child is killed. Does nothing in a plain run; only rank 0 of a
    distributed run calls it (bench/orchestrate/runner.py)."""
    path = os.environ.get(OUTCOME_ENV)
    if path:
        write_json_atomic(Path(path), {"identity": identity})


def _finish(outcome: dict[str, Any]) -> None:
    path = os.environ.get(OUTCOME_ENV)
    if path and os.environ.get("RANK", "0") == "0":
        previous = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
        write_json_atomic(Path(path), {**previous, "outcome": outcome})


def run_isolated(cfg: DictConfig) -> dict[str, Any]:
    """Run `cfg` in a child process; the job's outcome (run_id, status, skipped, record, error)."""
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        cfg_path, outcome_path = Path(tmp) / "config.yaml", Path(tmp) / "outcome.json"
        OmegaConf.save(cfg, cfg_path, resolve=True)
        launch = _launch(cfg)
        proc = subprocess.Popen([*launch, "-m", "bench.orchestrate.isolate", str(cfg_path)],
                                env={**os.environ, OUTCOME_ENV: str(outcome_path)})
        proc.wait()
        said = json.loads(outcome_path.read_text()) if outcome_path.is_file() else {}
    if "outcome" in said:
        return said["outcome"]
    identity = said.get("identity")
    why = (f"killed by {signal.Signals(-proc.returncode).name} (signal {-proc.returncode}): out of memory (the "
           "kernel's OOM killer sends SIGKILL) or stopped from outside" if proc.returncode < 0
           else f"a rank of the distributed run failed (torchrun exit code {proc.returncode}); the output above says "
           "which and why" if len(launch) > 1
           else f"the run's process ended with exit code {proc.returncode} before it finished")
    if identity is None:  # killed before it knew its identity: nothing to record; the next invocation runs it
        return {"status": "error", "error": why, "skipped": False}
    run_dir = Path(identity.pop("run_dir"))
    record = {"schema_version": SCHEMA_VERSION, **identity, "status": "error", "error": why,
              "exit_code": proc.returncode, "ended_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    previous = read_record(run_dir)
    if previous is not None and previous.get("status") != "ok":
        record["attempt"] = int(previous.get("attempt", 1)) + 1
    path = write_result(run_dir, record, previous)
    lock = RunLock(run_dir).path
    if lock.is_file() and lock.read_bytes().endswith(f":{proc.pid}".encode()):
        lock.unlink(missing_ok=True)  # the dead child's lock
    print(f"FAILED {record['run_id']} status=error: {why}\n  record: {path}")
    return {"run_id": record["run_id"], "status": "error", "skipped": False, "record": str(path), "error": why}


def _launch(cfg: DictConfig) -> list[str]:
    """The child's command up to its module: Python, or torchrun's engine starting a distributed run's ranks."""
    world = planned_world(cfg.get("distributed"))
    if not world.distributed or world.launched:
        return [sys.executable]
    if int(cfg.distributed.nnodes) > 1:
        raise BenchError(f"distributed.nnodes={cfg.distributed.nnodes}: the suite starts the ranks of one node; for "
                         "several, start torchrun on each node or use hydra/launcher=slurm (docs/distributed.md)")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={int(cfg.distributed.nproc_per_node)}"]


def main(cfg_path: str) -> None:
    from bench.orchestrate.runner import job_outcome, run

    cfg = OmegaConf.load(cfg_path)
    try:
        record = run(cfg)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        _finish({"status": "error", "error": str(exc), "skipped": False})
        sys.exit(2)
    _finish(job_outcome(cfg, record))


if __name__ == "__main__":
    main(sys.argv[1])
