"""The run's device: which one (`device=auto` picks a free GPU per worker process), its name for the record, and
synchronisation before a clock is read."""
from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

import torch

from bench import BenchError
from bench.model import precision

_gpu_lock_fds: dict[int, int] = {}  # GPU index -> open lock fd, held for the life of this process


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        from bench.model.device import (
            auto_cuda_index,  # several GPUs: one per worker process (see bench/orchestrate/sweep.py)
        )

        index = auto_cuda_index(torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """The precision mode `name` runs as on `device` (bench/model/precision.py); BenchError when it cannot."""
    bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
    return precision.resolve_precision(name, device.type, bf16)


def claim_gpu(n_gpus: int, lock_dir: Path | None = None, names: list[str] | None = None) -> int | None:
    """Claim the first of `n_gpus` GPUs that no other process holds; the claim lasts until the process ends.
    `names` are the GPUs' machine-wide ids (what CUDA_VISIBLE_DEVICES lists; default 0..n-1), so that
    processes with different visible sets still see each other's claims. Returns the (visible) index, or
    None when all are taken."""
    lock_dir = lock_dir or Path(tempfile.gettempdir()) / "peft-bench-gpu-locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    names = names or [str(i) for i in range(n_gpus)]
    for index in range(n_gpus):
        fd = os.open(lock_dir / f"gpu{names[index]}.lock", os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _gpu_lock_fds[index] = fd
        return index
    return None


def auto_cuda_index(n_gpus: int) -> int:
    """The GPU this process uses for `device=auto`: its earlier claim, else a fresh one (see module doc)."""
    if n_gpus <= 1:
        return 0
    if _gpu_lock_fds:
        return next(iter(_gpu_lock_fds))
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    index = claim_gpu(n_gpus, names=visible if len(visible) == n_gpus else None)
    if index is None:
        index = os.getpid() % n_gpus
        print(f"warning: all {n_gpus} GPUs are claimed by other bench processes; sharing cuda:{index}")
    return index



def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU, where every op is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"cpu: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores)"

