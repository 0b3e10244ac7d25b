"""Planning a run: validate the composed config and work out the effective config and the run's identity
(the hash of the effective config), before anything is loaded."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from bench import BenchError
from bench.record import config_hash
from bench.tasks import DISPLAY_KEYS, Task, task_from_config
from methods import Method, get_method


@dataclass
class Plan:
    cfg: DictConfig  # the composed config; cfg.method is the method's one config
    task: Task
    method: Method
    device: torch.device
    precision: str
    rank: int | None
    lr: float
    effective: dict
    config_hash: str
    run_id: str
    run_dir: Path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        from bench.sweep import auto_cuda_index  # several GPUs: one per worker process (see bench/sweep.py)

        index = auto_cuda_index(torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name not in ("fp32", "bf16", "fp16"):
        raise BenchError(f"precision={name}: choose auto, fp32, bf16 or fp16")
    if device.type == "cpu" and name != "fp32":
        raise BenchError(f"precision={name} is for CUDA; CPU runs use fp32 (precision=auto or fp32)")
    return name


def plan(cfg: DictConfig) -> Plan:
    """Validate the config and work out the run's effective config and identity. Raises BenchError."""
    method = get_method(cfg.method.name)
    task = task_from_config(cfg.task)
    device = resolve_device(str(cfg.device))
    precision = resolve_precision(str(cfg.precision), device)
    method.validate(device)
    if method.uses_rank and (not isinstance(cfg.rank, int) or cfg.rank < 1):
        raise BenchError(f"rank={cfg.rank}: method '{method.name}' needs a positive integer rank")
    rank = int(cfg.rank) if method.uses_rank else None
    lr = float(cfg.lr if cfg.lr is not None else cfg.method.lr)
    if not lr > 0:
        raise BenchError(f"lr={lr}: the learning rate must be positive")
    eff_method = method.effective_config(OmegaConf.to_container(cfg.method, resolve=True), rank)
    eff_method["lr"] = lr
    effective = {
        "task": {k: v for k, v in OmegaConf.to_container(cfg.task, resolve=True).items() if k not in DISPLAY_KEYS},
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "method": eff_method,
        "rank": rank,
        "budget": OmegaConf.to_container(cfg.budget, resolve=True),
        "seed": int(cfg.seed),
        "device_type": device.type,
        "precision": precision,
        "measure": OmegaConf.to_container(cfg.measure, resolve=True),
    }
    if cfg.get("forgetting"):  # only when set, so runs without it keep their identity
        effective["forgetting"] = OmegaConf.to_container(cfg.forgetting, resolve=True)
    h = config_hash(effective)
    rank_part = f"-r{rank}" if rank is not None else ""
    run_id = f"{task.name}-{cfg.model.name}-{method.name}{rank_part}-s{cfg.seed}-{h[:8]}"
    run_dir = Path(str(cfg.results_dir)) / run_id
    return Plan(cfg, task, method, device, precision, rank, lr, effective, h, run_id, run_dir)
