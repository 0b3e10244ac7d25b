"""Planning a run: validate the composed config (bench/plan/schema.py) and work out the effective config and the run's
identity (the hash of the effective config), before anything is loaded; then `identify` adds the content
fingerprints of the data and model files (bench/plan/fingerprint.py) to that identity."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from bench import BenchError
from bench.data.tasks import Task, task_from_config
from bench.model import is_causal_lm
from bench.model.device import resolve_device, resolve_precision
from bench.model.distributed import SINGLE, World, planned_world
from bench.model.precision import Dtypes, dtype_name, precision_dtypes
from bench.plan.schema import validate_config
from bench.record.identity import config_hash, run_id
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
    world: World = SINGLE  # one process, or this process's place in a distributed run (bench/model/distributed.py)

    @property
    def dtypes(self) -> Dtypes:
        """Which dtype holds the frozen weights, which the trainable ones, and autocast's (bench/model/precision.py)."""
        return precision_dtypes(self.precision, self.method.trains_all_weights)


def plan(cfg: DictConfig) -> Plan:
    """Validate the config and work out the run's effective config and identity. Raises BenchError."""
    valid = validate_config(OmegaConf.to_container(cfg, resolve=True))  # one line per problem, or normalised
    method = get_method(cfg.method.name)
    task = task_from_config(cfg.task)
    world = planned_world(cfg.get("distributed"))
    device = _rank_device(valid["device"], world)
    precision = resolve_precision(valid["precision"], device)
    method.validate(device)
    method.validate_model(cfg.model)
    rank = valid["rank"] if method.uses_rank else None
    lr = valid["lr"] if valid["lr"] is not None else _method_lr(cfg.method.get("lr"))
    eff_method = method.effective_config(OmegaConf.to_container(cfg.method, resolve=True), rank)
    eff_method["lr"] = lr
    causal = is_causal_lm(cfg.model)
    if task.is_generation and not causal:
        raise BenchError(f"task '{task.name}' is a generation task (question -> worked solution -> final number): it "
                         "needs a causal LM, e.g. model=smollm2 (or model=tiny-llama for a test)")
    if causal and cfg.task.num_labels == 1:
        raise BenchError(f"task '{task.name}' is regression: a causal LM scores answers as text, so it needs a "
                         "classification task (e.g. task=sst2)")
    # The task's prompt and the lm block only shape causal-LM runs: left out of an encoder run's effective config.
    # Which task and model keys change results (the identity) is bench/record/identity.py's to say.
    task_keys = {k: v for k, v in OmegaConf.to_container(cfg.task, resolve=True).items() if causal or k != "prompt"}
    effective = {
        "task": task_keys,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "method": eff_method,
        "rank": rank,
        "budget": valid["budget"],
        "seed": valid["seed"],
        "device_type": device.type,
        "precision": precision,
        "measure": valid["measure"],
    }
    weights = precision_dtypes(precision).weights
    if weights != torch.float32:  # only then, so runs with fp32 weights keep their identity; and `precision: bf16`
        effective["weight_dtype"] = dtype_name(weights)  # once named autocast over fp32 weights (bf16-mixed now)
    if causal:
        effective["lm"] = valid["lm"]
    if cfg.get("forgetting"):  # only when set, so runs without it keep their identity
        effective["forgetting"] = OmegaConf.to_container(cfg.forgetting, resolve=True)
    if world.distributed:  # only then, so one-process runs keep their identity
        effective["distributed"] = _distributed_identity(world, valid)
    return _identified(Plan(cfg, task, method, device, precision, rank, lr, effective, "", "", Path(), world))


def _rank_device(name: str, world: World) -> torch.device:
    """A distributed rank on a GPU node takes the GPU of its local rank (of those it sees: Slurm may show each task
    only its own); otherwise the run's device."""
    if world.launched and name in ("auto", "cuda") and torch.cuda.is_available():
        index = world.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return resolve_device(name)


def _distributed_identity(world: World, valid: dict) -> dict:
    """What of a distributed run changes its results (the reduction order, what is sharded), checked first."""
    if valid["budget"]["batch_size"] % world.size:
        raise BenchError(f"budget.batch_size={valid['budget']['batch_size']} is the global batch and must split "
                         f"evenly over the {world.size} ranks")
    if valid["oom_retries"]:
        raise BenchError("oom_retries is for one-process runs: set oom_retries=0 with distributed=" + world.strategy)
    out = {"strategy": world.strategy, "world_size": world.size}
    if world.strategy == "fsdp":
        out["reshard_after_forward"] = valid["distributed"]["reshard_after_forward"]
    return out


def _method_lr(value) -> float:
    try:
        lr = float(value)
    except (TypeError, ValueError):
        lr = float("nan")
    if not lr > 0:
        raise BenchError(f"method.lr={value!r}: the method's learning rate must be a positive number (or set lr=)")
    return lr


def identify(p: Plan, fingerprints: dict) -> Plan:
    """The plan with the content fingerprints (the `*_sha256` values) of its data and model files in its identity:
    edited data or another checkpoint under the same name is another run (bench/plan/fingerprint.py)."""
    hashes = {k: v for k, v in fingerprints.items() if k.endswith("_sha256")}
    return _identified(dataclasses.replace(p, effective={**p.effective, "fingerprints": hashes}))


def _identified(p: Plan) -> Plan:
    h = config_hash(p.effective)
    name = run_id(p.task.name, str(p.cfg.model.name), p.method.name, p.rank, p.effective["seed"], h)
    return dataclasses.replace(p, config_hash=h, run_id=name, run_dir=Path(str(p.cfg.results_dir)) / name)
