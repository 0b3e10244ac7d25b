"""Out-of-memory retry: `oom_retries=N` retries an out-of-memory run up to N times with the micro-batch split by
its smallest factor and gradient accumulation multiplied by it, so the effective batch is unchanged (recorded
under `oom_retry`; the memory and speed figures are then those of the smaller micro-batch)."""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch

from bench.measure.memory import release_memory
from bench.plan import Plan


def oom_message(exc: BaseException) -> str:
    return (str(exc).splitlines() or ["out of memory"])[0]


def smaller_micro_batch(p: Plan) -> Plan | None:
    """The same plan with the micro-batch divided by its smallest factor and gradient accumulation
    multiplied by it (same effective batch); None when the micro-batch is already 1."""
    size = int(p.cfg.budget.batch_size)
    factor = next((f for f in range(2, size + 1) if size % f == 0), None)
    if factor is None:
        return None
    cfg = copy.deepcopy(p.cfg)
    cfg.budget.batch_size = size // factor
    cfg.budget.grad_accum_steps = int(cfg.budget.grad_accum_steps) * factor
    return dataclasses.replace(p, cfg=cfg)


def with_oom_retry(execute: Callable[[Plan], dict], p: Plan, retries: int, record: dict) -> dict:
    """`execute(p)`, and on out-of-memory up to `retries` more tries with a smaller micro-batch."""
    failed: list[dict] = []
    while True:
        message = None
        try:
            out = execute(p)
        except torch.OutOfMemoryError as exc:
            message = oom_message(exc)
        if message is None:
            if failed:
                out["oom_retry"] = {**record["oom_retry"], "batch_size": int(p.cfg.budget.batch_size),
                                    "grad_accum_steps": int(p.cfg.budget.grad_accum_steps)}
            return out
        release_memory(p.device)  # outside the except block: the failed attempt's frames are released by now
        failed.append({"batch_size": int(p.cfg.budget.batch_size),
                       "grad_accum_steps": int(p.cfg.budget.grad_accum_steps), "error": message})
        smaller = smaller_micro_batch(p) if len(failed) <= retries else None
        if retries:
            record["oom_retry"] = {"failed_attempts": failed,
                                   "note": "memory and speed figures are those of the last micro-batch"}
        if smaller is None:
            raise torch.OutOfMemoryError(message)
        print(f"oom {p.run_id}: retrying with micro-batch {smaller.cfg.budget.batch_size} x "
              f"{smaller.cfg.budget.grad_accum_steps} accumulation steps (same effective batch)")
        p = smaller
