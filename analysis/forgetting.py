"""Forgetting: how much of what the base model could do is lost by fine-tuning.

A probe is measured on the pre-trained model (before) and on the fine-tuned model (after), on the same data.
`forgetting` is the loss of ability, positive when the model got worse on the probe:
before − after for scores where higher is better (Spearman, accuracy), after − before for losses.

Probes (`forgetting=<probe>` in a run; settings in `conf/forgetting/<probe>.yaml`):
- `sts`: zero-shot STS-B: Spearman correlation between the gold similarity and the cosine of mean-pooled
  (attention-mask weighted) final hidden states of the model's encoder, on the STS-B dev set. The skill
  sentence-embedding models such as all-MiniLM-L6-v2 were trained for. For a run whose task is STS-B
  itself this measures learning, not forgetting (the record says so).
- `mlm`: masked-LM loss (nats/token) on held-out text (STS-B dev sentences; 15% of the non-special
  tokens replaced by the mask token, fixed positions), for models whose checkpoint has an MLM head: the
  pre-trained MLM head on top of the fine-tuned encoder. A clear error for models without one (MiniLM).
- `ppl`: causal-LM perplexity on the same held-out text, for causal LMs with a pre-trained LM head; a clear
  error otherwise.
- `sequential`: the dev metric on task A after then training on task B. Needs two trainings, so it is not
  an in-run probe: `python -m analysis.forgetting sequential <run dir of task A> --task-b rte` rebuilds the
  run's fine-tuned model, evaluates task A (before), trains the same method on task B with the suite's
  training loop and a new head, puts task A's head back and evaluates task A again (after).

What "the fine-tuned model's encoder" is: the backbone module (`model.base_model` of the transformers
model, under peft's wrapper when there is one) with the method's changes in place: LoRA-family deltas,
adapters and BitFit biases count; prompt and prefix tuning only add inputs, so their encoder is untouched
and their forgetting on `sts`/`mlm`/`ppl` is 0 by construction.

The in-run probes live in bench/probes.py (the run measures them); this module runs them on finished runs
from saved weights and holds the `sequential` experiment. Probes run under `torch.random.fork_rng`, so
turning forgetting on does not change the run's training.

    python -m analysis.forgetting probe <run dir> [--probe sts]    # before/after from saved weights
    python -m analysis.forgetting sequential <run dir of A> --task-b rte
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from bench import BenchError
from bench.probes import PROBES, make_probe, probe_config

__all__ = ["PROBES", "make_probe", "probe_config", "probe_run", "sequential", "main"]


def probe_run(run_dir, probe: str = "sts", **overrides: Any) -> dict:
    """Forgetting of a finished run from its saved weights: the probe on the rebuilt base model and on the
    rebuilt fine-tuned model (unmerged, as trained)."""
    from analysis.weights import base_model, read_run, tuned_model
    from bench.models import load_tokenizer

    record, cfg = read_run(run_dir)
    probe_obj = make_probe(
        probe_config(probe, **overrides), cfg.model, load_tokenizer(cfg.model), record["task"]
    )
    device = torch.device("cpu")
    base = base_model(record, cfg)
    before = probe_obj.measure(base, device)
    after = probe_obj.measure(tuned_model(run_dir, base=base, merge=False), device)
    return {"run_id": record["run_id"], **probe_obj.result(before, after)}


def sequential(run_dir, task_b: str, max_steps: int | None = None, train_samples: int | None = None) -> dict:
    """Dev metric of the run's task A before and after training the same method on task B.

    The run's fine-tuned model (merged where the method merges; `full` as is) is evaluated on A; its head is
    set aside, a fresh head for B is put on, the method is attached again and trained on B with the suite's
    loop and the run's budget (optionally fewer steps/samples); then A's head goes back and A is evaluated
    again. Methods that do not merge (adapters, prompt tuning) are not supported: their trained modules
    would have to be stacked, which is a different experiment."""
    from analysis.weights import PLAIN_AFTER_LOAD, read_run, tuned_model
    from bench import metrics as glue_metrics
    from bench.data import make_loader, subset, tokenize
    from bench.models import attach_context, load_tokenizer
    from bench.runner import seed_everything
    from bench.tasks import get_task, load_task
    from bench.train import predict, to_predictions, total_steps, train
    from methods import get_method

    record, cfg = read_run(run_dir)
    method = get_method(record["method"])
    if not (method.merges or method.name in PLAIN_AFTER_LOAD):
        raise BenchError(f"sequential forgetting supports methods that merge (and full); not '{method.name}'")
    task_a, task_b_obj = get_task(record["task"]), get_task(task_b)
    device, head = torch.device("cpu"), str(cfg.model.head)
    budget = OmegaConf.to_container(cfg.budget, resolve=True)
    budget.update(
        {k: v for k, v in (("max_steps", max_steps), ("train_samples", train_samples)) if v is not None}
    )
    budget = OmegaConf.create(budget)
    tokenizer = load_tokenizer(cfg.model)

    def loaders(task, train_rows: bool):
        tr, dev, _ = load_task(task)
        dev_loader = make_loader(
            tokenize(subset(dev, budget.eval_samples), tokenizer, budget.max_seq_len),
            tokenizer,
            int(cfg.measure.eval_batch_size),
            shuffle=False,
            seed=0,
        )
        if not train_rows:
            return None, dev_loader
        return make_loader(
            tokenize(subset(tr, budget.train_samples), tokenizer, budget.max_seq_len),
            tokenizer,
            budget.batch_size,
            shuffle=True,
            seed=int(record["seed"]),
        ), dev_loader

    def evaluate(model, task, loader) -> float:
        logits, labels, _ = predict(model, loader, device, "fp32")
        return glue_metrics.compute([task.main_metric], to_predictions(logits, task.is_regression), labels)[
            task.main_metric
        ]

    def set_head(model, module, task):
        setattr(model, head, module)
        model.num_labels = model.config.num_labels = task.num_labels
        model.config.problem_type = "regression" if task.is_regression else "single_label_classification"

    _, dev_a = loaders(task_a, False)
    train_b, dev_b = loaders(task_b_obj, True)
    model = tuned_model(run_dir, merge=True)
    before = evaluate(model, task_a, dev_a)
    head_a = copy.deepcopy(getattr(model, head))
    seed_everything(int(record["seed"]))
    set_head(model, _fresh_head(getattr(model, head), task_b_obj.num_labels), task_b_obj)
    steps = total_steps(len(train_b), budget)
    ctx = attach_context(cfg.model, record.get("rank"), task_b_obj.num_labels, steps)
    model = method.attach(model, cfg.method, ctx)
    train(
        model,
        method,
        train_b,
        lr=float(record["lr"]),
        weight_decay=float(cfg.method.weight_decay),
        warmup_ratio=float(cfg.method.warmup_ratio),
        budget=budget,
        steps=steps,
        device=device,
        precision="fp32",
        head=head,
        run_id=f"{record['run_id']}-then-{task_b}",
        timing_warmup_steps=0,
    )
    metric_b = evaluate(model, task_b_obj, dev_b)
    if method.merges and method.name not in PLAIN_AFTER_LOAD:
        model = method.merged(model)
    set_head(model, head_a, task_a)
    after = evaluate(model, task_a, dev_a)
    return {
        "run_id": record["run_id"],
        "probe": "sequential",
        "metric": f"{task_a.name}_{task_a.main_metric}",
        "higher_is_better": True,
        "task_a": task_a.name,
        "task_b": task_b,
        "steps_b": steps,
        f"task_b_{task_b_obj.main_metric}": metric_b,
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
    import json

    ap = argparse.ArgumentParser(description="Forgetting probes on finished runs")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="before/after of a probe from a run's saved weights")
    p.add_argument("run_dir")
    p.add_argument("--probe", default="sts", choices=[x for x in PROBES if x != "sequential"])
    p.add_argument("--max-pairs", type=int, default=None, help="sts: cap on STS-B dev pairs")
    s = sub.add_parser("sequential", help="task A's dev metric before/after training on task B")
    s.add_argument("run_dir", help="a finished run of task A")
    s.add_argument("--task-b", required=True)
    s.add_argument("--max-steps", type=int, default=None, help="override the run's budget for task B")
    s.add_argument("--train-samples", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "probe":
            overrides = {"max_pairs": args.max_pairs} if args.max_pairs and args.probe == "sts" else {}
            res = probe_run(args.run_dir, args.probe, **overrides)
        else:
            res = sequential(args.run_dir, args.task_b, args.max_steps, args.train_samples)
    except BenchError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
