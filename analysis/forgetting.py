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
- `wiki`: forgetting as peft's method comparison measures it: the mean cross-entropy per token (nats) of held-out
  Wikipedia text (the offline sample in `$WIKI_DIR`, else the first rows of the Hub dataset HuggingFaceFW/finewiki),
  each document one window of at most `max_tokens` tokens, pooled over every scored token. Causal LMs: next-token
  cross-entropy, as `ppl` scores it; encoders whose checkpoint has an MLM head: the masked-LM loss, as `mlm` scores
  it; a clear error for other models (MiniLM).
- `sequential`: the dev metric on task A after then training on task B. It trains, so it is an experiment on a
  finished run rather than an analysis of it: `python -m bench.tools.sequential <run dir of task A> --task-b rte`.

What "the fine-tuned model's encoder" is: the backbone module (`model.base_model` of the transformers
model, under peft's wrapper when there is one) with the method's changes in place: LoRA-family deltas,
adapters and BitFit biases count; prompt and prefix tuning only add inputs, so their encoder is untouched
and their forgetting on `sts`/`mlm` is 0 by construction. `ppl` and `wiki` score a causal LM as it runs, so a
prompt-tuned model is scored with its virtual tokens in front (not scored themselves).

The in-run probes live in bench/measure/probes.py (the run measures them); this module runs them on finished runs
from saved weights. Probes run under `torch.random.fork_rng`, so turning forgetting on does not change the run's
training.

    python -m analysis.forgetting probe <run dir> [--probe sts]    # before/after from saved weights
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from bench import BenchError
from bench.measure.probes import PROBES, make_probe, probe_config

__all__ = ["PROBES", "make_probe", "probe_config", "probe_run", "main"]


def probe_run(run_dir, probe: str = "sts", **overrides: Any) -> dict:
    """Forgetting of a finished run from its saved weights: the probe on the rebuilt base model and on the
    rebuilt fine-tuned model (unmerged, as trained)."""
    from bench.model import load_tokenizer
    from bench.model.rebuild import base_model, read_run, tuned_model

    record, cfg = read_run(run_dir)
    probe_obj = make_probe(
        probe_config(probe, **overrides), cfg.model, load_tokenizer(cfg.model), record["task"]
    )
    device = torch.device("cpu")
    base = base_model(record, cfg)
    before = probe_obj.measure(base, device)
    after = probe_obj.measure(tuned_model(run_dir, base=base, merge=False), device)
    return {"run_id": record["run_id"], **probe_obj.result(before, after)}


def main(argv: list[str] | None = None) -> None:
    import json

    ap = argparse.ArgumentParser(description="Forgetting probes on finished runs")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="before/after of a probe from a run's saved weights")
    p.add_argument("run_dir")
    p.add_argument("--probe", default="sts", choices=[x for x in PROBES if x != "sequential"])
    p.add_argument("--max-pairs", type=int, default=None, help="sts: cap on STS-B dev pairs")
    args = ap.parse_args(argv)
    try:
        overrides = {"max_pairs": args.max_pairs} if args.max_pairs and args.probe == "sts" else {}
        res = probe_run(args.run_dir, args.probe, **overrides)
    except BenchError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
