"""Sequential forgetting: how much of task A a fine-tuned run keeps after the same method then trains on task B.

    python -m bench.tools.sequential <run dir of task A> --task-b rte [--max-steps N] [--train-samples N]

Needs two trainings, so it is an experiment on a finished run, not an in-run probe (`forgetting=sequential` says
so and points here). It rebuilds the run's fine-tuned model from its folder (bench/model/rebuild.py), evaluates task
A (before), trains the same method on task B with the suite's loop (bench/recipe.py) and a new head, puts task A's
head back and evaluates task A again (after); `forgetting` = before - after. Prints the result as JSON.
"""
from __future__ import annotations

import argparse
import copy
import json

from torch import nn

from bench import BenchError
from bench.loop.train import total_steps
from bench.model import seed_everything
from bench.model.rebuild import read_run, tuned_model
from bench.recipe import attach, train_model
from bench.reevaluate import dev_set, head_copy, set_head, task_conf
from methods import get_method
from methods.base import head_modules


def sequential(run_dir, task_b: str, max_steps: int | None = None, train_samples: int | None = None) -> dict:
    """Dev metric of the run's task A before and after training the same method on task B.

    The run's fine-tuned model (merged where the method merges; `full` as is) is evaluated on A; its head is
    set aside, a fresh head for B is put on, the method is attached again and trained on B with the suite's
    loop and the run's budget (optionally fewer steps/samples); then A's head goes back and A is evaluated
    again. Methods that do not merge (adapters, prompt tuning) are not supported: their trained modules
    would have to be stacked, which is a different experiment."""

    record, cfg = read_run(run_dir)
    method = get_method(record["method"])
    if not (method.merges or method.edits_in_place):
        raise BenchError(f"sequential forgetting supports methods that merge (and full); not '{method.name}'")
    budget = {k: v for k, v in (("max_steps", max_steps), ("train_samples", train_samples)) if v is not None}
    # Task A as the run had it, with any key its record lacks taken from conf/task; task B from conf/task; on CPU.
    dev_a = dev_set(cfg, budget=budget)
    dev_b = dev_set(cfg, task_conf(task_b), budget, tokenizer=dev_a.data.tokenizer)
    p_a, p_b, data_b = dev_a.plan, dev_b.plan, dev_b.data
    head = head_modules(cfg.model)  # empty for a causal LM: its LM head answers both tasks as text, untouched here

    model = tuned_model(run_dir, merge=True)
    before = dev_a.main_metric(model)
    # Task A's whole head (BERT: pooler + classifier) is set aside and put back; B starts from A's head with a
    # fresh output layer.
    head_a = head_copy(model, head)
    seed_everything(int(record["seed"]))
    if head:  # the head's output layer (conf/model/family: the last of `head`) gets B's labels
        set_head(model, {head[-1]: _fresh_head(model.get_submodule(head[-1]), p_b.task.num_labels)}, p_b.task)
    n_steps = total_steps(len(data_b.train_loader), p_b.cfg.budget)
    model, _ = attach(p_b, model, n_steps, data_b)
    train_model(p_b, model, data_b.train_loader, n_steps)
    metric_b = dev_b.main_metric(model)
    if method.merges and not method.edits_in_place:
        model = method.merged(model)
    if head:
        set_head(model, head_a, p_a.task)
    after = dev_a.main_metric(model)
    task_a = p_a.task
    return {
        "run_id": record["run_id"],
        "probe": "sequential",
        "metric": f"{task_a.name}_{task_a.main_metric}",
        "higher_is_better": True,
        "task_a": task_a.name,
        "task_b": task_b,
        "steps_b": n_steps,
        f"task_b_{p_b.task.main_metric}": metric_b,
        "before": before,
        "after": after,
        "forgetting": before - after,
    }


def _fresh_head(old: nn.Module, num_labels: int) -> nn.Module:
    """A new task head of the same structure as `old` with `num_labels` outputs (BERT: one Linear;
    RoBERTa: dense + out_proj), freshly initialised."""
    new = copy.deepcopy(old)
    linears = [(n, m) for n, m in new.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise BenchError("the task head has no linear layer to resize")
    name, last = linears[-1]
    repl = nn.Linear(last.in_features, num_labels, bias=last.bias is not None)
    if name:
        parent = new.get_submodule(name.rpartition(".")[0]) if "." in name else new
        setattr(parent, name.rpartition(".")[2], repl)
    else:
        new = repl
    for m in new.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return new



def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a finished run of task A (with saved weights)")
    ap.add_argument("--task-b", required=True)
    ap.add_argument("--max-steps", type=int, default=None, help="override the run's budget for task B")
    ap.add_argument("--train-samples", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        res = sequential(args.run_dir, args.task_b, args.max_steps, args.train_samples)
    except BenchError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
