"""`python -m bench [overrides]`: one run, or a sweep with --multirun. See README.md."""
from __future__ import annotations

import os
import re
import sys
import traceback

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from bench import BenchError
from bench.config import CONF


def _is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def _is_rank(cfg: DictConfig) -> bool:
    """This process is one rank of a distributed run (started by torchrun or Slurm): it is the run, not its parent."""
    from bench.model.distributed import planned_world

    try:
        return planned_world(cfg.get("distributed")).launched
    except BenchError:  # the run says what is wrong with the config, in one line
        return False


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def app(cfg: DictConfig) -> dict:
    """Returns (in multirun) the job's outcome for the sweep progress callback (bench/orchestrate/sweep.py):
    run_id, status, skipped, record path. In multirun each run is its own process (bench/orchestrate/isolate.py)."""
    from bench.orchestrate.runner import job_outcome, run  # imported here so `--help` and config errors stay fast

    multirun = _is_multirun()
    if cfg.get("protocol"):  # +protocol=tuned: the job is the method's lr trials and seeds (orchestrate/protocol.py)
        from bench.orchestrate.protocol import run_protocol

        try:
            outcome = run_protocol(cfg)
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            if multirun:
                return {"status": "error", "error": str(exc), "skipped": False}
            sys.exit(2)
        if outcome["status"] != "ok" and not multirun:
            sys.exit(1)
        return outcome
    isolate = cfg.get("isolate_runs", "auto")
    if (isolate is True or (isolate == "auto" and multirun)) and not _is_rank(cfg):
        from bench.orchestrate.isolate import run_isolated

        return run_isolated(cfg)
    try:
        record = run(cfg)
    except BenchError as exc:  # a config, data or folder problem found before the run could start
        print(f"error: {exc}", file=sys.stderr)
        if multirun:
            return {"status": "error", "error": str(exc), "skipped": False}
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - in a sweep nothing may end the other jobs
        if not multirun:
            raise
        traceback.print_exc()
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}", "skipped": False}
    if record["status"] != "ok" and not multirun and not record.get("skipped"):
        sys.exit(1)
    return job_outcome(cfg, record)




def check_group_choices(argv: list[str]) -> str | None:
    """One-line message for an override that names a config that does not exist (`method=nosuch`),
    before Hydra prints its multi-line error. Sweep expressions (`range(...)`, globs) are left to Hydra."""
    for arg in argv:
        match = re.fullmatch(r"(method|task|model|budget|distributed)=([\w.,-]+)", arg)
        if not match:
            continue
        group, values = match.groups()
        choices = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        for value in values.split(","):
            if value not in choices:
                return f"unknown {group} '{value}'; choose one of: {', '.join(choices)} (files in conf/{group}/)"
    return None


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    problem = check_group_choices(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    app()


if __name__ == "__main__":
    main()
