"""The typed schema of a run's config (`conf/config.yaml` composed with overrides), checked before anything runs.

One pydantic model per part of the config. Unknown keys are refused (`+foo=1`, `budget.max_step=5`), every value
is checked against what it may be, and values that mean the same run are normalised (`seed=1.0` is seed 1).
`validate_config` returns the normalised plain config or raises BenchError with one line per problem: the key,
the value given and what is allowed. The method, task and model groups are checked by their owners (the method
registry, the task loader, the model loader); here only that they are mappings with a name.
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bench import BenchError
from bench.model.distributed import STRATEGIES
from bench.model.precision import PRECISIONS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Budget(_Strict):
    name: str
    max_steps: int | None = Field(gt=0)
    epochs: float | None = Field(gt=0)
    batch_size: int = Field(gt=0)
    grad_accum_steps: int = Field(gt=0)
    max_seq_len: int = Field(ge=8, description="tokens, [CLS]/[SEP] included")
    train_samples: int | None = Field(gt=0)
    eval_samples: int | None = Field(gt=0)
    max_grad_norm: float | None = Field(gt=0)
    log_every_steps: int = Field(gt=0)
    eval_every_steps: int | None = Field(gt=0)
    keep_best: bool
    lr_schedule: Literal["linear", "cosine"] = "linear"
    validation_rows: int = Field(0, ge=0, description="rows carved from train as the validation split (0: none)")

    @model_validator(mode="after")
    def _length_and_best(self) -> Budget:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of budget.max_steps and budget.epochs (the other null)")
        if self.keep_best and self.eval_every_steps is None:
            raise ValueError("budget.keep_best=true needs budget.eval_every_steps (how often to evaluate)")
        if self.keep_best and not self.validation_rows:
            raise ValueError("budget.keep_best=true selects on the validation split, never on dev: set "
                             "budget.validation_rows (e.g. budget.validation_rows=${task.validation_rows})")
        return self


class Protocol(_Strict):
    """`+protocol=tuned` (conf/protocol/): the same lr trials for every method, selection on validation, seeds."""
    name: str
    lr_factors: list[float] = Field(min_length=1)
    selection_seed: int
    seeds: list[int] = Field(min_length=1)
    validation_rows: int = Field(gt=0)

    @field_validator("lr_factors")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(f <= 0 for f in v) or len(set(v)) != len(v):
            raise ValueError("protocol.lr_factors must be distinct positive factors of the method's default lr")
        return sorted(v)


class Measure(_Strict):
    latency: bool
    latency_batch_size: int = Field(gt=0)
    latency_seq_len: int = Field(gt=0)
    latency_warmup_iters: int = Field(ge=0)
    latency_warmup_tol: float = Field(gt=0)
    latency_max_warmup_s: float = Field(ge=0)
    latency_iters: int = Field(gt=0)
    latency_rounds: int = Field(gt=0)
    latency_noise_tol: float = Field(0.05, gt=0, lt=1)  # newer than some records' configs
    timing_warmup_steps: int = Field(ge=0)
    eval_batch_size: int = Field(gt=0)
    busy_gpu: Literal["flag", "refuse", "ignore"]
    busy_gpu_threshold_bytes: int = Field(ge=0)
    reuse_untrained: bool = True  # newer than some records' configs


class LM(_Strict):
    chat_template: Literal["auto", "true", "false"]
    loss_on: Literal["answer", "all"]
    eval_mode: Literal["loglik", "generate"]
    eval_batch_size: int = Field(gt=0)
    max_new_tokens: int = Field(256, gt=0)
    shots: int = Field(0, ge=0)
    generation: bool
    gen_batch_size: int = Field(gt=0)
    gen_prompt_len: int = Field(gt=0)
    gen_new_tokens: int = Field(gt=0)
    gen_iters: int = Field(gt=0)

    @field_validator("chat_template", mode="before")
    @classmethod
    def _text(cls, v: Any) -> Any:
        return str(v).lower() if isinstance(v, bool) else v


class Distributed(_Strict):
    """conf/distributed/: one run over several processes (bench/distributed.py)."""

    strategy: Literal[STRATEGIES] = "none"  # bench/model/distributed.py
    nproc_per_node: int = Field(2, gt=0)
    nnodes: int = Field(1, gt=0)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = Field(300, gt=0)
    reshard_after_forward: bool = True


class _Group(BaseModel):
    """A config group (method, task, model, forgetting): its owner checks the keys; here it needs a name."""

    model_config = ConfigDict(extra="allow")
    name: str | None = None


class RunConfig(_Strict):
    task: _Group
    model: _Group
    method: _Group
    forgetting: _Group | None = None
    budget: Budget
    measure: Measure
    lm: LM | None = None  # older configs have none
    distributed: Distributed = Distributed()  # older configs have none: one process
    rank: int = Field(gt=0)
    seed: int = Field(ge=0)
    lr: float | None = Field(gt=0)
    device: str
    precision: Literal[PRECISIONS]  # bench/model/precision.py: what each mode holds in which dtype
    cpu_threads: int | None = Field(gt=0)
    results_dir: str = Field(min_length=1)
    save_weights: Literal["adapter", "none"]
    rerun: bool
    skip_failed: bool
    oom_retries: int = Field(ge=0)
    isolate_runs: bool | Literal["auto"] = "auto"
    # keys of sweep presets (conf/sweep/report_cpu.yaml: per-method rank grids; conf/sweep/lora_table2.yaml: a
    # published recipe's per-task learning rates, batch sizes and evaluation intervals)
    sweep_ranks: dict[str, list[int]] | None = None
    rank_i: int | None = Field(default=None, ge=0)
    paper_lr: dict[str, dict[str, float]] | None = None
    paper_batch_size: dict[str, int] | None = None
    paper_eval_every_steps: dict[str, int] | None = None
    # conf/sweep/peft_metamathqa.yaml: peft's per-method learning rates and weight decays
    peft_lr: dict[str, float] | None = None
    peft_weight_decay: dict[str, float] | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError("choose auto, cpu, cuda or cuda:N")
        return v

    @field_validator("task", "model", "method")
    @classmethod
    def _named(cls, v: _Group) -> _Group:
        if not v.name:
            raise ValueError("needs a name (pick one of the files in its conf/ folder)")
        return v


def _where(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith(("function-", "constrained-"))) or "config"


def validate_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config, normalised (seed=1.0 -> 1), or BenchError with one line per problem."""
    return _validated(RunConfig, cfg)


def validate_protocol(protocol: dict[str, Any]) -> dict[str, Any]:
    """`cfg.protocol` normalised, or BenchError with one line per problem (keys named `protocol.<key>`)."""
    return _validated(Protocol, protocol, prefix="protocol.")


def _validated(model: type[BaseModel], cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    try:
        return model.model_validate(cfg).model_dump()
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = prefix + _where(err["loc"])
            given = err.get("input")
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                lines.append(f"{where}={given!r}: unknown key (a typo? the keys are listed in conf/ and "
                             "docs/configuration.md)")
            elif err["type"] == "missing":
                lines.append(f"{where}: missing (it must be set)")
            elif isinstance(given, dict):
                lines.append(f"{where}: {msg}")
            else:
                lines.append(f"{where}={given!r}: {msg}")
        raise BenchError("invalid config:\n  " + "\n  ".join(lines)) from None
