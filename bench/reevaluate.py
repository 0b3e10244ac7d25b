"""A finished run's task scored again, on models rebuilt from its folder: what experiments on finished runs
(bench.tools.sequential, analysis.compose, analysis.mitigate) evaluate with.

The task and budget are the run's (any task key its record lacks comes from `conf/task`), on the CPU in fp32, and
the rows, tokenisation and metric code are the run's own, so a rebuilt model scores what the run scored.

    dev = dev_set(cfg)                      # cfg: the run's config (bench.model.rebuild.read_run)
    dev.main_metric(model)                  # e.g. SST-2 accuracy on the full dev set
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from bench.config import compose_config
from bench.data import Data, load_data
from bench.loop.evaluate import evaluate, evaluate_solutions
from bench.plan import Plan, plan


def task_conf(name: str) -> DictConfig:
    """`conf/task/<name>.yaml` as composed."""
    return compose_config([f"task={name}"]).task


def on_cpu(cfg: DictConfig, task: DictConfig | None = None, budget: dict[str, Any] | None = None) -> DictConfig:
    """The run's config (resolved) with `task` (default: the run's, completed from conf/task) and the budget
    overrides, on CPU in fp32."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    out.task = task if task is not None else OmegaConf.merge(task_conf(str(cfg.task.name)), cfg.task)
    out.budget = OmegaConf.merge(out.budget, budget or {})
    out.device, out.precision = "cpu", "fp32"
    return out


@dataclass
class DevSet:
    """A task's dev rows as a run loads them, and its metrics on any model."""

    plan: Plan
    data: Data

    @property
    def task(self):
        return self.plan.task

    def metrics(self, model: nn.Module) -> dict[str, float]:
        p = self.plan
        if p.task.is_generation:
            return evaluate_solutions(model, self.data.dev_loader, self.data.tokenizer, p.device, p.precision).metrics
        return evaluate(model, self.data.dev_loader, p.task, p.device, p.precision)[0]

    def main_metric(self, model: nn.Module) -> float:
        return float(self.metrics(model)[self.task.main_metric])


def dev_set(cfg: DictConfig, task: DictConfig | None = None, budget: dict[str, Any] | None = None,
            tokenizer=None) -> DevSet:
    """The dev set of the run configured by `cfg` (or of `task` with the run's model and budget), on CPU."""
    p = plan(on_cpu(cfg, task, budget))
    return DevSet(p, load_data(p.task, p.cfg, tokenizer=tokenizer))


def head_copy(model: nn.Module, head: Sequence[str]) -> dict[str, nn.Module]:
    """A copy of each task-head module of `model` by its path (`head`: conf/model/family's head names, e.g. BERT's
    pooler.dense and classifier); empty for a causal LM, whose LM head answers every task as text."""
    return {path: copy.deepcopy(module) for path, module in model.named_modules()
            if any(path == h or path.endswith(f".{h}") for h in head)}


def set_head(model: nn.Module, modules: dict[str, nn.Module], task) -> None:
    """Put task-head `modules` (path -> module, as head_copy gives) on `model` and set its label count for `task`."""
    for path, module in modules.items():
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, module)
    model.num_labels = model.config.num_labels = task.num_labels
    model.config.problem_type = "regression" if task.is_regression else "single_label_classification"
