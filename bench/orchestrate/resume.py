"""Resume policy: which existing record makes a run skip.

A run with an `ok` record is skipped; a run with a failure record (`error`, `nan`, `oom`) is tried again (its
`attempt` counter goes up) unless `skip_failed=true`; a run with no record (killed, interrupted) is run.
`rerun=true` runs it whatever exists.
"""
from __future__ import annotations

from omegaconf import DictConfig

from bench.record import FAILED_STATUSES, OK


def skip_reason(existing: dict | None, cfg: DictConfig) -> str | None:
    """Why a run with this existing record is not run again (None: run it)."""
    if existing is None or cfg.rerun:
        return None
    if existing.get("status") == OK:
        return "an ok record exists; rerun=true to run it again"
    if existing.get("status") in FAILED_STATUSES and cfg.get("skip_failed", False):
        return f"a '{existing['status']}' record exists and skip_failed=true"
    return None
