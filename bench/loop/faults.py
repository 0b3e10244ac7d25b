"""Test aid, outside the training loop: BENCH_INJECT_FAULT='<substring of run_id>:<error|nan|kill|oom>[,...]'
makes matching runs fail on purpose at step 2, so sweep fault tolerance can be tested (also through the command
line); `killrank<k>` kills only rank k of a distributed run. Not part of the config. `oom` raises an
out-of-memory error only without gradient accumulation, like a real OOM that a smaller micro-batch cures (see
bench/orchestrate/oom.py). The recipe installs the hook; the loop only calls its `StepHook` methods."""
from __future__ import annotations

import os
import signal

import torch

from bench.loop.train import StepHook

FAULT_STEP = 2


class InjectedFault(StepHook):
    def __init__(self, kind: str):
        self.kind = kind

    def on_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        return loss * float("nan") if self.kind == "nan" and step == FAULT_STEP else loss

    def after_step(self, step: int, accum: int) -> None:
        if step != FAULT_STEP:
            return
        if self.kind == "error":
            raise RuntimeError("injected fault (BENCH_INJECT_FAULT)")
        if self.kind == "oom" and accum == 1:
            raise torch.OutOfMemoryError("injected out of memory (BENCH_INJECT_FAULT)")
        if self.kind == "kill" or self.kind == f"killrank{os.environ.get('RANK', '0')}":
            os.kill(os.getpid(), signal.SIGKILL)


def injected_faults(run_id: str) -> list[StepHook]:
    """The fault hooks BENCH_INJECT_FAULT asks for this run (none when unset)."""
    spec = os.environ.get("BENCH_INJECT_FAULT", "")
    for item in filter(None, spec.split(",")):
        pattern, _, kind = item.rpartition(":")
        if pattern and pattern in run_id:
            return [InjectedFault(kind)]
    return []
