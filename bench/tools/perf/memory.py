"""Memory estimator vs the tensor memory the suite's training loop really holds, on any device (CPU included).

    python -m bench.tools.perf.memory             # minilm and bert-base-random, full and lora r=8, 32 x 128, fp32
    python -m bench.tools.perf.memory --models minilm,bert-large-random --methods lora --batch-size 8 --seq-len 256
    python -m bench.tools.perf.memory --quick              # tiny-bert, a check that the script runs

For each model and method it builds the model through the suite (conf/model + methods registry), runs
`bench.loop.train.train` (the one loop every run uses: AdamW, clipping, scheduler) for a few optimiser steps on a
synthetic batch of exactly batch x seq tokens (no padding: the token count is known), and tracks every tensor
storage alive with a TorchDispatchMode (`TensorBytes` below). Its peak is what `torch.cuda.max_memory_allocated`
reports on a GPU, without the caching allocator's 512-byte rounding; it is not peak RSS (no allocator caches,
no Python or library memory). It then prints the estimate of `analysis.memory` for the same setting, the
ratio, and both split by kind (weights, gradients, optimiser states, activations + temporaries) at the peak.

On CPU the suite trains in fp32 by default, so this checks the fp32 arithmetic (weights, gradients, AdamW moments,
activation coefficients). `precision=bf16` runs on CPU too (CPU autocast): that checks the bf16 weights, the fp32 or
bf16 trainable weights, their gradients and moments, but not the activations, which follow CPU autocast's op lists
rather than CUDA's; the CUDA path: `python -m bench.tools.perf.gpu`. A benchmark script that prints figures, not a
test.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
import weakref

import torch
from omegaconf import DictConfig
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bench.config import compose_config
from bench.loop.train import train
from bench.measure.latency import latency_batch
from bench.model.device import resolve_device
from bench.plan import plan
from bench.recipe import fresh_model, train_settings
from bench.tools.memory_estimate import GIB, Setting, arch_from_model_conf, estimate

KINDS = ("weights", "gradients", "optimizer", "activations+temp")


class TensorBytes(TorchDispatchMode):
    """Bytes of every live tensor storage on the device, by kind, and the breakdown at the peak.

    Storages alive when it starts (the model's parameters and buffers) are `weights`; every storage an op creates
    inside it is counted from its creation until its Python storage object is freed (a weak reference, as torch's
    own MemTracker does; that one refuses models with frozen parameters). Storages created inside an optimiser
    step are `optimizer` (AdamW's moments; its few temporaries are freed at once), a parameter's gradient is
    moved to `gradients` when autograd has accumulated it; everything else is `activations+temp`."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.live: dict[int, tuple[int, str, weakref.ref]] = {}
        self.bytes = dict.fromkeys(KINDS, 0)
        self.peak_bytes, self.at_peak = 0, dict(self.bytes)
        self.kind = "activations+temp"
        for t in [*model.parameters(), *model.buffers()]:
            self._add(t, "weights")
        self._hooks = [p.register_post_accumulate_grad_hook(lambda p: self._move(p.grad, "gradients"))
                       for p in model.parameters() if p.requires_grad]
        self._hooks += [register_optimizer_step_pre_hook(lambda *_: setattr(self, "kind", "optimizer")),
                        register_optimizer_step_post_hook(lambda *_: setattr(self, "kind", "activations+temp"))]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()

    def _add(self, t: torch.Tensor, kind: str) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live or st.nbytes() == 0:
            return
        self.live[key] = (st.nbytes(), kind, weakref.ref(st, lambda _, key=key: self._free(key)))
        self.bytes[kind] += st.nbytes()
        total = sum(self.bytes.values())
        if total > self.peak_bytes:
            self.peak_bytes, self.at_peak = total, dict(self.bytes)

    def _free(self, key: int) -> None:
        n, kind, _ = self.live.pop(key)
        self.bytes[kind] -= n

    def _move(self, t: torch.Tensor | None, kind: str) -> None:
        entry = self.live.get(t.untyped_storage()._cdata) if t is not None else None
        if entry and entry[1] != kind:
            self.bytes[entry[1]] -= entry[0]
            self.bytes[kind] += entry[0]
            self.live[t.untyped_storage()._cdata] = (entry[0], kind, entry[2])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t, self.kind)
        return out


def measure(cfg: DictConfig, steps: int) -> dict:
    """Peak live tensor bytes over `steps` optimiser steps of the suite's loop, and the breakdown then."""
    p = plan(cfg)
    device, precision = p.device, p.precision
    batch_size, seq = int(cfg.budget.batch_size), int(cfg.budget.max_seq_len)
    model = fresh_model(p, steps)
    batch = latency_batch(model.config.vocab_size, batch_size, seq, device)
    if getattr(model.config, "is_decoder", False) or "ForCausalLM" in type(model).__name__ \
            or any("ForCausalLM" in type(m).__name__ for m in model.modules()):
        batch["labels"] = batch["input_ids"].clone()  # a causal LM: next-token loss on every position
    else:
        batch["labels"] = torch.arange(batch_size, device=device) % 2
    tracker = TensorBytes(model)
    start = time.perf_counter()
    try:
        with tracker:
            train(model, p.method, [batch], dataclasses.replace(train_settings(p, steps), warmup_ratio=0.0))
    finally:
        tracker.close()
    return {"peak_bytes": tracker.peak_bytes, "by_kind": tracker.at_peak, "precision": precision,
            "wall_s": time.perf_counter() - start, "attn": getattr(model.config, "_attn_implementation", "?")}


def estimate_for(cfg: DictConfig, precision: str, fused_attention: bool, device_type: str) -> dict:
    from omegaconf import OmegaConf

    arch = arch_from_model_conf(OmegaConf.to_container(cfg.model, resolve=True))
    targets = tuple(cfg.method.get("target_modules") or cfg.model.lora_targets)
    st = Setting(method=str(cfg.method.name), rank=int(cfg.rank), targets=targets,
                 batch=int(cfg.budget.batch_size), seq=int(cfg.budget.max_seq_len),
                 precision=precision, fused_attention=fused_attention,
                 optimizer_impl="fused" if device_type == "cuda" else "single_tensor")  # as bench.train does
    est = estimate(arch, st)
    # Split the estimated peak the way the measurement is split at its peak, summing to the peak: in the optimiser
    # step (all gradients, the step's temporaries with the optimiser states) or in the backward pass (all
    # activations and no gradient yet, unless the gradients outweigh the activations).
    fixed = est["weights_bytes"] + est["master_weights_bytes"] + est["optimizer_bytes"]
    weights = est["weights_bytes"] + est["master_weights_bytes"]
    in_step = est["gradients_bytes"] + est["optimizer_step_working_bytes"]
    if fixed + in_step >= est["peak_bytes"]:
        parts = (est["gradients_bytes"], est["optimizer_bytes"] + est["optimizer_step_working_bytes"], 0.0)
    else:
        acts = est["activations_bytes"] + est["autocast_weight_copies_bytes"]
        grads = est["gradients_bytes"] if est["gradients_bytes"] > acts else 0.0
        parts = (grads, est["optimizer_bytes"], est["peak_bytes"] - fixed - grads)
    est["by_kind"] = dict(zip(KINDS, (weights, *parts)))
    return est


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,bert-base-random", help="conf/model names, comma-separated")
    ap.add_argument("--methods", default="full,lora", help="full, lora (the estimator's unquantised methods)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="optimiser steps (the peak comes once AdamW has "
                                                         "its moments, from step 2)")
    ap.add_argument("--attention", choices=("fused", "materialised"),
                    help="what the estimate assumes (default: materialised on CPU, fused on CUDA). Measured here: "
                         "training through SDPA on CPU kept s x s tensors per head like eager attention "
                         "(estimate/measured 0.65-0.86 assuming fused, 1.05-1.12 assuming materialised)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--quick", action="store_true", help="tiny-bert, 8 x 32 tokens: a check that it runs")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. device=cuda precision=fp32")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.batch_size, args.seq_len, args.steps = "tiny-bert", 8, 32, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("BENCH_PROGRESS", "0")

    rows = []
    for model_name in args.models.split(","):
        for method in args.methods.split(","):
            cfg = compose_config([f"model={model_name}", f"method={method}", f"rank={args.rank}",
                               f"budget.batch_size={args.batch_size}", f"budget.max_seq_len={args.seq_len}",
                               "budget.grad_accum_steps=1", *args.overrides])
            meas = measure(cfg, args.steps)
            device_type = resolve_device(str(cfg.device)).type
            fused = args.attention == "fused" if args.attention else device_type == "cuda"
            est = estimate_for(cfg, meas["precision"], fused, device_type)
            rows.append((model_name, method, est, meas))
            assumed = "fused" if fused else "materialised"
            print(f"{model_name} {method}: measured peak {meas['peak_bytes'] / GIB:.3f} GiB, estimate "
                  f"{est['peak_bytes'] / GIB:.3f} GiB, estimate/measured {est['peak_bytes'] / meas['peak_bytes']:.3f}"
                  f" ({meas['precision']}, attention {meas['attn']}, estimate assumes {assumed} attention, "
                  f"{meas['wall_s']:.0f} s)", flush=True)

    print(f"\nbatch {args.batch_size} x {args.seq_len} tokens, {args.steps} optimiser steps, LoRA r={args.rank} on "
          f"the model's lora_targets, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          "measured = peak of live tensor bytes (TensorBytes), estimate = analysis.memory")
    print("| model | method | params | measured peak GiB | estimate GiB | estimate / measured | "
          "measured at peak: weights / grads / optimizer / activations+temp MiB | "
          "estimate: weights / grads / optimizer / activations+temp MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for model_name, method, est, meas in rows:
        def parts(d):
            return " / ".join(f"{d[k] / 2**20:.0f}" for k in KINDS)
        print(f"| {model_name} | {method} | {int(est['total_params']):,} | {meas['peak_bytes'] / GIB:.3f} | "
              f"{est['peak_bytes'] / GIB:.3f} | {est['peak_bytes'] / meas['peak_bytes']:.3f} | "
              f"{parts(meas['by_kind'])} | {parts(est['by_kind'])} |")


if __name__ == "__main__":
    main()
