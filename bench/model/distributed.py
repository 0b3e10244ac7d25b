"""One run over several processes with torch.distributed: who this process is, the process group, the model wrapped
for data parallelism (DDP) or sharded (FSDP2), each rank's share of a batch, and gathering what rank 0 records.

The ranks are started by a launcher, never by this module: `torchrun` (or the suite itself through torchrun's engine,
bench/orchestrate/isolate.py), or Slurm (`srun`, via hydra/launcher=slurm), which sets SLURM_* variables that
submitit turns into torch's. Every rank runs the same run: same plan, same data in the same order, same model
initialisation. Each rank trains on its contiguous share of every global batch (`shard`), with its loss weighted so
that the gradient averaged over ranks is the gradient of the whole batch's mean loss: the global batch, the data
order and the schedule are the one-process run's. Rank 0 alone decides whether the run is done, holds the run's
lock, evaluates the trained model and writes the record and the weights (gathered from the shards under FSDP).
docs/distributed.md says what each strategy shards and how to launch it.
"""
from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bench import BenchError

STRATEGIES = ("none", "ddp", "fsdp")
# Waiting for rank 0 (its evaluation of the untrained or the trained model, its skip decision) may take as long as
# rank 0's work takes; a dead rank 0 still ends the wait at once (its sockets close).
_WAIT_FOR_MAIN = dt.timedelta(days=1)
_control: Any = None  # a gloo group for objects and waits, beside the default group the training uses


class RankLost(RuntimeError):
    """Another rank of the run failed, so this one cannot go on."""


@dataclass(frozen=True)
class World:
    """This process's place in the run: the strategy, how many ranks, which one this is."""

    strategy: str = "none"
    size: int = 1
    rank: int = 0
    local_rank: int = 0
    launcher: str | None = None  # torchrun | slurm | None: the suite will launch the ranks (bench/orchestrate)

    @property
    def distributed(self) -> bool:
        return self.strategy != "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def launched(self) -> bool:
        """True when this process is one of the run's ranks (a launcher started it)."""
        return self.launcher is not None


SINGLE = World()


def _launcher_env(strategy: str) -> tuple[int, int, int, str] | None:
    """(rank, world size, local rank, launcher) from the environment a launcher set, else None."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:  # torchrun, or anything that sets torch's variables (as below)
        slurm = env.get("SLURM_NTASKS") == env["WORLD_SIZE"] and env.get("SLURM_PROCID") == env["RANK"]
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), \
            "slurm" if slurm else "torchrun"
    if strategy != "none" and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        try:
            from submitit.helpers import TorchDistributedEnvironment
        except ImportError:
            raise BenchError("a distributed run under Slurm reads its ranks through submitit: pip install "
                             "'peft-bench[launchers]'") from None
        env.setdefault("SUBMITIT_EXECUTOR", "slurm")  # set by submitit's jobs; a plain `srun` does not
        # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR (the job's first node), MASTER_PORT (from the job id)
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), "slurm"
    return None


def planned_world(conf: Any) -> World:
    """The run's world from `cfg.distributed` and the launcher's environment; BenchError when they disagree."""
    strategy = str(conf.get("strategy", "none")) if conf is not None else "none"
    if strategy not in STRATEGIES:
        raise BenchError(f"distributed.strategy={strategy!r}: choose one of {', '.join(STRATEGIES)}")
    launched = _launcher_env(strategy)
    if strategy == "none":
        if launched is not None and launched[1] > 1:
            raise BenchError(f"launched as {launched[1]} processes ({launched[3]}) but distributed=none: add "
                             "distributed=ddp or distributed=fsdp, or start one process")
        return SINGLE
    if launched is not None:
        rank, size, local_rank, launcher = launched
        return World(strategy, size, rank, local_rank, launcher)
    return World(strategy, int(conf.nproc_per_node) * int(conf.nnodes))


def init(world: World, conf: Any, device: torch.device) -> None:
    """Join the run's process group (once per process; it lives until the process ends)."""
    global _control
    if not world.launched or dist.is_initialized():
        return
    backend = str(conf.backend)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=dt.timedelta(seconds=float(conf.timeout_s)))
    _control = dist.new_group(backend="gloo", timeout=_WAIT_FOR_MAIN)


def from_main(world: World, obj: Any) -> Any:
    """Rank 0's `obj` on every rank (the others pass None); waits as long as rank 0 takes."""
    if not world.launched:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def wait_for_main(world: World) -> None:
    """Every rank waits here until all have come, however long rank 0's own work (e.g. an evaluation) takes."""
    if world.launched:
        dist.barrier(group=_control)


def gather(world: World, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not world.launched:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj, group=_control)
    return out


def mean(world: World, value: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a tensor (training collective: it times out after distributed.timeout_s)."""
    if not world.launched:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world.size


def any_rank(world: World, flag: bool) -> bool:
    if not world.launched:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return bool(t.item())


def blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks: its largest ModuleList by parameter count (FSDP's shard units)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise BenchError(f"{type(model).__name__} has no list of blocks to shard; use distributed=ddp")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def wrap(model: nn.Module, world: World, device: torch.device, conf: Any) -> nn.Module:
    """The model as training calls it: DDP's wrapper, or (FSDP2) the same model with each block and the root
    sharded in place. Evaluation and the method's hooks use `unwrap(...)`."""
    if not world.launched:
        return model
    if world.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world.size,))
    reshard = bool(conf.reshard_after_forward)
    for block in blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP's wrapper (FSDP2 wraps nothing: the model itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model, whole, in host memory on rank 0 (FSDP: gathered from all ranks; every rank must
    call it); an empty dict on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))


_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "timed out", "Timed out",
              "NCCL communicator was aborted")


def lost_rank(exc: BaseException) -> str | None:
    """The record's one line for a collective that failed because another rank died or stalled; None otherwise."""
    text = str(exc).strip()
    if not any(marker in text for marker in _PEER_LOST):
        return None
    return ("another rank of the distributed run died or stalled (torch.distributed: "
            f"{text.splitlines()[0][:160]}); the launcher's output says which rank and why")


def _loss_units(batch: dict[str, torch.Tensor]) -> int:
    """What the model's mean loss averages over: label tokens (a causal LM's labels, shifted by one, -100 ignored)
    or rows (a classifier's labels)."""
    labels = batch.get("labels")
    if labels is not None and labels.shape == batch["input_ids"].shape:
        return int((labels[:, 1:] != -100).sum())
    return int(batch["input_ids"].shape[0])


def shard(batch: dict[str, torch.Tensor], world: World) -> tuple[dict[str, torch.Tensor], float]:
    """This rank's contiguous share of a global batch, with trailing padding columns no row of it uses dropped, and
    the weight of its loss: size x (its loss units / the batch's), so that the mean over ranks of the weighted losses
    (what DDP's and FSDP's gradient averaging computes) is the global batch's mean loss."""
    if not world.launched:
        return batch, 1.0
    n = batch["input_ids"].shape[0]
    if n < world.size:
        raise BenchError(f"a batch of {n} rows cannot be split over {world.size} ranks: use a budget.batch_size (and "
                         f"train_samples) of at least {world.size} rows per batch")
    lo, hi = world.rank * n // world.size, (world.rank + 1) * n // world.size
    width = batch["input_ids"].shape[1]
    local = {k: v[lo:hi] for k, v in batch.items()}
    mask = local.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        used = int(mask.any(0).nonzero().max()) + 1 if mask.any() else width
        if used < width:  # right padding that only other ranks' rows needed
            local = {k: v[:, :used] if v.dim() == 2 and v.shape[1] == width else v for k, v in local.items()}
    total = _loss_units(batch)
    weight = world.size * _loss_units(local) / total if total else 1.0
    return local, weight
