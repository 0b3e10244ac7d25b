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

Probes run under `torch.random.fork_rng`, so turning forgetting on does not change the run's training.

    python -m analysis.forgetting probe <run dir> [--probe sts]    # before/after from saved weights
    python -m analysis.forgetting sequential <run dir of A> --task-b rte
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from typing import Any, ClassVar

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from scipy.stats import spearmanr
from torch import nn

from bench import BenchError

PROBES = ("sts", "mlm", "ppl", "sequential")


def backbone(model: nn.Module) -> nn.Module:
    """The encoder/decoder stack of a (possibly peft-wrapped) transformers model, with its changes."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return getattr(model, "base_model", model)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _probe_sentences(max_rows: int | None) -> tuple[list[str], list[str], np.ndarray]:
    from bench.data import subset
    from bench.tasks import get_task, load_task

    _, dev, _ = load_task(get_task("stsb"))
    dev = subset(dev, max_rows)
    return dev["text_a"].tolist(), dev["text_b"].tolist(), dev["label"].to_numpy(dtype=float)


class Probe:
    name: ClassVar[str]
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool]

    def __init__(self, cfg: Any, model_cfg: Any, tokenizer, task: str | None = None):
        self.cfg, self.model_cfg, self.tokenizer, self.task = cfg, model_cfg, tokenizer, task

    def measure(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None) -> float:
        raise NotImplementedError

    def result(self, before: float, after: float) -> dict:
        lost = before - after if self.higher_is_better else after - before
        out = {
            "probe": self.name,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "before": before,
            "after": after,
            "forgetting": lost,
        }
        if self.name == "sts" and self.task == "stsb":
            out["note"] = "the run's task is STS-B: this probe measures learning, not forgetting"
        return out


class StsProbe(Probe):
    name = "sts"
    metric = "stsb_spearman_zero_shot"
    higher_is_better = True

    def __init__(self, cfg: Any, model_cfg: Any, tokenizer, task: str | None = None):
        super().__init__(cfg, model_cfg, tokenizer, task)
        self.text_a, self.text_b, self.gold = _probe_sentences(cfg.get("max_pairs"))

    def embed(
        self, encoder: nn.Module, texts: list[str], device: torch.device, amp_dtype: torch.dtype | None
    ) -> torch.Tensor:
        order = np.argsort([len(t) for t in texts])  # similar lengths per batch: less padding
        out = torch.empty(len(texts), encoder.config.hidden_size)
        bs = int(self.cfg.batch_size)
        for i in range(0, len(texts), bs):
            idx = order[i : i + bs]
            enc = self.tokenizer(
                [texts[j] for j in idx],
                padding=True,
                truncation=True,
                max_length=int(self.cfg.max_seq_len),
                return_tensors="pt",
            ).to(device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                hidden = encoder(
                    input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
                ).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out[torch.as_tensor(idx)] = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu()
        return out

    def measure(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None) -> float:
        encoder = backbone(model)
        with _eval_mode(model):
            a = self.embed(encoder, self.text_a, device, amp_dtype)
            b = self.embed(encoder, self.text_b, device, amp_dtype)
        cos = torch.nn.functional.cosine_similarity(a, b).numpy()
        return float(spearmanr(cos, self.gold).statistic)


class _HeadProbe(Probe):
    """Probes that put the checkpoint's own pre-trained LM head on top of the (fine-tuned) backbone."""

    auto_class: ClassVar[str]
    head_kind: ClassVar[str]

    def __init__(self, cfg: Any, model_cfg: Any, tokenizer, task: str | None = None):
        super().__init__(cfg, model_cfg, tokenizer, task)
        import transformers

        from bench.models import resolve_source

        if model_cfg.get("random_init"):
            raise BenchError(
                f"forgetting={self.name}: model '{model_cfg.name}' is a random-init test model with "
                f"no pre-trained {self.head_kind} head; use forgetting=sts"
            )
        path, _ = resolve_source(model_cfg)
        try:
            self.lm, info = getattr(transformers, self.auto_class).from_pretrained(
                path, output_loading_info=True
            )
        except (OSError, ValueError) as exc:
            raise BenchError(
                f"forgetting={self.name}: model '{model_cfg.name}' cannot load as "
                f"{self.auto_class}: {str(exc).splitlines()[0][:160]}"
            ) from exc
        prefix = self.lm.base_model_prefix
        missing_head = [k for k in info["missing_keys"] if not k.startswith(prefix + ".")]
        if missing_head:
            raise BenchError(
                f"forgetting={self.name}: model '{model_cfg.name}' has no pre-trained "
                f"{self.head_kind} head (missing {missing_head[0]}); use forgetting=sts"
            )
        self.lm.eval()
        sentences, _, _ = _probe_sentences(cfg.get("max_sentences"))
        self.batches = [
            tokenizer(
                sentences[i : i + int(cfg.batch_size)],
                padding=True,
                truncation=True,
                max_length=int(cfg.max_seq_len),
                return_tensors="pt",
            )
            for i in range(0, len(sentences), int(cfg.batch_size))
        ]

    @contextlib.contextmanager
    def _with_backbone(self, model: nn.Module, device: torch.device):
        prefix = self.lm.base_model_prefix
        own = getattr(self.lm, prefix)
        setattr(self.lm, prefix, backbone(model))
        self.lm.to(device)
        try:
            yield self.lm
        finally:
            setattr(self.lm, prefix, own)


class MlmProbe(_HeadProbe):
    name = "mlm"
    metric = "mlm_loss_nats_per_token"
    higher_is_better = False
    auto_class = "AutoModelForMaskedLM"
    head_kind = "masked-LM"

    def measure(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None) -> float:
        tok = self.tokenizer
        gen = torch.Generator().manual_seed(0)
        total, n = 0.0, 0
        with _eval_mode(model), self._with_backbone(model, device) as lm:
            for enc in self.batches:
                ids = enc["input_ids"].clone()
                special = torch.tensor(
                    [
                        tok.get_special_tokens_mask(row, already_has_special_tokens=True)
                        for row in ids.tolist()
                    ],
                    dtype=torch.bool,
                )
                pick = (
                    (torch.rand(ids.shape, generator=gen) < float(self.cfg.mask_fraction))
                    & ~special
                    & enc["attention_mask"].bool()
                )
                labels = torch.where(pick, ids, torch.full_like(ids, -100))
                ids[pick] = tok.mask_token_id
                with torch.autocast(
                    device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
                ):
                    out = lm(
                        input_ids=ids.to(device),
                        attention_mask=enc["attention_mask"].to(device),
                        labels=labels.to(device),
                    )
                k = int(pick.sum())
                total += float(out.loss) * k
                n += k
        return total / max(n, 1)


class PplProbe(_HeadProbe):
    name = "ppl"
    metric = "perplexity"
    higher_is_better = False
    auto_class = "AutoModelForCausalLM"
    head_kind = "causal-LM"

    def __init__(self, cfg: Any, model_cfg: Any, tokenizer, task: str | None = None):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        super().__init__(cfg, model_cfg, tokenizer, task)
        if not getattr(self.lm.config, "is_decoder", False) and self.lm.config.model_type in (
            "bert",
            "roberta",
        ):
            raise BenchError(
                f"forgetting=ppl: model '{model_cfg.name}' is an encoder, not a causal LM; "
                f"use forgetting=sts or mlm"
            )

    def measure(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None) -> float:
        total, n = 0.0, 0
        with _eval_mode(model), self._with_backbone(model, device) as lm:
            for enc in self.batches:
                labels = enc["input_ids"].masked_fill(~enc["attention_mask"].bool(), -100)
                with torch.autocast(
                    device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
                ):
                    out = lm(**{k: v.to(device) for k, v in enc.items()}, labels=labels.to(device))
                k = int((labels[:, 1:] != -100).sum())
                total += float(out.loss) * k
                n += k
        return float(np.exp(total / max(n, 1)))


PROBE_CLASSES: dict[str, type[Probe]] = {"sts": StsProbe, "mlm": MlmProbe, "ppl": PplProbe}


def make_probe(cfg: Any, model_cfg: Any, tokenizer, task: str | None = None) -> Probe:
    """The probe that `conf/forgetting/<name>.yaml` asks for (BenchError when unknown or unusable)."""
    name = str(cfg.probe)
    if name == "sequential":
        raise BenchError(
            "forgetting=sequential needs two trainings and is not an in-run probe; run "
            "`python -m analysis.forgetting sequential <run dir of task A> --task-b <task>`"
        )
    if name not in PROBE_CLASSES:
        raise BenchError(f"unknown forgetting probe '{name}'; choose one of: {', '.join(PROBES)}")
    with torch.random.fork_rng(devices=[]):  # loading a head model must not move the run's random state
        return PROBE_CLASSES[name](cfg, model_cfg, tokenizer, task)


def probe_config(name: str, **overrides: Any) -> DictConfig:
    """`conf/forgetting/<name>.yaml` composed through Hydra, with overrides (e.g. max_pairs=64)."""
    from bench.config import compose_config

    return compose_config([f"forgetting={name}", *(f"forgetting.{k}={v}" for k, v in overrides.items())]).forgetting


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
    from bench.models import load_tokenizer
    from bench.runner import seed_everything
    from bench.tasks import get_task, load_task
    from bench.train import predict, to_predictions, total_steps, train
    from methods import AttachContext, get_method

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
    ctx = AttachContext(
        rank=record.get("rank"), model_cfg=cfg.model, num_labels=task_b_obj.num_labels, total_steps=steps
    )
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
