"""Overhead benchmark: the suite's training loop vs a minimal hand-written PEFT loop vs transformers' Trainer.

    python -m bench.tools.perf.overhead                 # 200 LoRA steps of MiniLM on SST-2, each way
    python -m bench.tools.perf.overhead --ways outside,suite --steps 80 --repeats 2 --profile method.dropout=0 \
        budget.batch_size=32 budget.max_seq_len=64 budget.max_grad_norm=null method.weight_decay=0
    python -m bench.tools.perf.overhead --steps 100 --repeats 2
    python -m bench.tools.perf.overhead --quick         # tiny random-init model, 20 steps: checks the script runs
    python -m bench.tools.perf.overhead --data-only     # tokenisation and loader time vs step time

Same model (fresh copy per way), same LoRA config, same tokenised rows, batch size, sequence cap, learning
rate schedule, gradient clipping, precision and seed. All three draw the same batches in the same order (Trainer
builds its own loader from the same rows and collator, given the suite loader's row order); the padded tokens
of the batches each way trained on are printed to show it (Trainer's loader collates one batch ahead, which
is not counted). steps/s = steps / wall time from the start of the first step to the end of the last, after a
throwaway warm-up of the process; with --repeats the order of the ways rotates between repeats, as timings on
a shared machine drift, and the fastest and the median repeat of each way are reported. On CPU it also
reports steps per second of this process's CPU time, which other processes on a shared machine do not inflate
(with --threads 1 it is the work done). This is a benchmark script that prints figures, not a test.

`bare` trains the suite's own model (its method attached by methods/); `outside` trains the model a plain peft script
builds (transformers' loader, peft's `LoraConfig` with the run's rank, alpha, dropout and target modules, peft's task
head handling), in the same bare loop: `outside` vs `suite` is the whole harness's cost, model building included.
`--profile` prints each way's most expensive operators over a few steps (torch.profiler, self CPU time).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import torch
from omegaconf import DictConfig

from bench.config import compose_config
from bench.data import load_data, train_loader
from bench.data.encode import make_loader
from bench.model import is_causal_lm, load_model, seed_everything
from bench.model.precision import autocast, autocast_dtype
from bench.plan import plan
from bench.recipe import fresh_model, train_model


class CountingCollator:
    """Wraps a collator and counts the padded tokens it produced: each way must see the same data."""

    last: CountingCollator | None = None

    def __init__(self, collate):
        self.collate, self.per_batch = collate, []
        CountingCollator.last = self

    def __call__(self, rows):
        batch = self.collate(rows)
        self.per_batch.append(batch["input_ids"].numel())
        return batch


class Setup:
    """Data, tokenizer and a factory for fresh LoRA models, shared by the three ways."""

    def __init__(self, cfg: DictConfig, steps: int):
        self.cfg, self.steps = cfg, steps
        self.plan = plan(cfg)  # the run's own planning and data step: same rows, settings and order as a run
        self.device, self.precision, self.method, self.lr = (self.plan.device, self.plan.precision,
                                                             self.plan.method, self.plan.lr)
        data = load_data(self.plan.task, cfg)
        self.tokenizer, self.features, self.tokenize_s = data.tokenizer, data.train_features, data.tokenize_s

    def loader(self):
        loader = train_loader(self.features, self.tokenizer, self.cfg)
        loader.collate_fn = CountingCollator(loader.collate_fn)
        return loader

    def sampler(self) -> list[int]:
        """The row order of the suite's loader, for Trainer: the suite's loader over row numbers instead of rows.
        (A RandomSampler seeded alike is not the same order: the DataLoader first draws its base seed from
        the generator.)"""
        loader = make_loader(list(range(len(self.features))), self.tokenizer, int(self.cfg.budget.batch_size),
                             shuffle=True, seed=int(self.cfg.seed))
        loader.collate_fn = list
        return [i for batch in loader for i in batch]


    def model(self):
        return fresh_model(self.plan, self.steps)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_suite(s: Setup, steps: int) -> tuple[float, float]:
    """The run's training step (bench.recipe.train_model), exactly as a run calls it (no evaluation).
    Returns (wall s, CPU s)."""
    model = s.model()
    cpu0 = time.process_time()
    res = train_model(s.plan, model, s.loader(), steps, timing_warmup_steps=min(5, steps // 2))
    return res.wall_s, time.process_time() - cpu0


def outside_model(s: Setup):
    """The model as a plain peft script builds it, seeded as the run is: the same pre-trained weights and LoRA
    shape, without the suite's method code (peft trains the classifier; the suite's head also holds BERT's pooler)."""
    from peft import LoraConfig, TaskType, get_peft_model

    seed_everything(int(s.cfg.seed))
    model, _ = load_model(s.cfg.model, s.plan.task.num_labels)
    m = s.cfg.method
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM if is_causal_lm(s.cfg.model) else TaskType.SEQ_CLS,
                      r=int(s.cfg.rank), lora_alpha=float(m.alpha_over_rank) * int(s.cfg.rank),
                      lora_dropout=float(m.dropout), target_modules=list(m.target_modules))
    return get_peft_model(model, lora).to(s.device)


def run_bare(s: Setup, steps: int, model=None) -> tuple[float, float]:
    """The smallest correct loop: AdamW, linear schedule, clipping (unless budget.max_grad_norm is null), autocast on
    GPU."""
    from transformers import get_linear_schedule_with_warmup

    model = model if model is not None else s.model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=float(s.cfg.method.weight_decay),
                            fused=s.device.type == "cuda")
    sched = get_linear_schedule_with_warmup(opt, int(round(float(s.cfg.method.warmup_ratio) * steps)), steps)
    amp = autocast_dtype(s.precision)
    model.train()
    batches = _forever(s.loader())
    _sync(s.device)
    start, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        batch = {k: v.to(s.device, non_blocking=True) for k, v in next(batches).items()}
        with autocast(s.device, amp):
            loss = model(**batch).loss
        loss.backward()
        if s.cfg.budget.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, float(s.cfg.budget.max_grad_norm))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    _sync(s.device)
    return time.perf_counter() - start, time.process_time() - cpu0


def run_trainer(s: Setup, steps: int) -> tuple[float, float]:
    """transformers' Trainer with the same settings; timed from the first step's start to the last's end."""
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    class Clock(TrainerCallback):
        start: float | None = None
        end: float | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.start is None:
                _sync(s.device)
                self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == steps:
                _sync(s.device)
                self.end, self.cpu_end = time.perf_counter(), time.process_time()

    class SameOrderTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return s.sampler()  # the same batches in the same order as the other two ways

    clock = Clock()
    model = s.model()
    amp = autocast_dtype(s.precision)  # Trainer's bf16/fp16 flags are its autocast
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=int(s.cfg.budget.batch_size), max_steps=steps,
            learning_rate=s.lr, weight_decay=float(s.cfg.method.weight_decay), lr_scheduler_type="linear",
            warmup_steps=int(round(float(s.cfg.method.warmup_ratio) * steps)),
            max_grad_norm=float(s.cfg.budget.max_grad_norm), logging_steps=int(s.cfg.budget.log_every_steps),
            save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
            seed=int(s.cfg.seed), bf16=amp == torch.bfloat16, fp16=amp == torch.float16,
            use_cpu=s.device.type == "cpu", optim="adamw_torch_fused" if s.device.type == "cuda" else "adamw_torch")
        trainer = SameOrderTrainer(model=model, args=args, train_dataset=s.features,
                                   data_collator=CountingCollator(DataCollatorWithPadding(s.tokenizer,
                                                                                          return_tensors="pt")),
                                   callbacks=[clock])
        trainer.remove_callback(PrinterCallback)  # it logs as usual; only the printing of each log is dropped
        trainer.train()
    return clock.end - clock.start, clock.cpu_end - clock.cpu_start


def _forever(loader):
    while True:
        yield from loader


def run_outside(s: Setup, steps: int) -> tuple[float, float]:
    return run_bare(s, steps, outside_model(s))


WAYS = {"suite": run_suite, "bare": run_bare, "outside": run_outside, "trainer": run_trainer}


def profile(s: Setup, way: str, steps: int = 5, top: int = 12) -> str:
    """The way's operators that took the most self CPU time over `steps` steps (after the process's warm-up)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        WAYS[way](s, steps)
    return f"\nprofile of {way}, {steps} steps:\n" + prof.key_averages().table(sort_by="self_cpu_time_total",
                                                                                 row_limit=top)


def _table(title: str, times: dict[str, float], steps: int) -> str:
    reference = "bare" if "bare" in times else "outside"
    lines = [f"\n{title}:", f"| way | steps/s | s/step | vs {reference} | vs trainer |", "|---|---|---|---|---|"]
    for name, t in times.items():
        vs_bare = f"{times[reference] / t:.3f}" if reference in times else ""
        vs_trainer = f"{times['trainer'] / t:.3f}" if "trainer" in times else ""
        lines.append(f"| {name} | {steps / t:.3f} | {t / steps:.4f} | {vs_bare} | {vs_trainer} |")
    return "\n".join(lines)


def data_check(s: Setup, steps: int, step_s: float | None) -> dict[str, Any]:
    """Time to tokenise the training rows and to draw `steps` batches from the loader (collation and padding),
    against the time of one optimiser step."""
    batches = _forever(s.loader())
    start = time.perf_counter()
    n_tokens = 0
    for _ in range(steps):
        n_tokens += int(next(batches)["attention_mask"].sum())
    loader_s = time.perf_counter() - start
    out = {"rows": len(s.features), "tokenize_s": s.tokenize_s, "tokenize_rows_per_s": len(s.features) / s.tokenize_s,
           "loader_batches": steps, "loader_s": loader_s, "loader_ms_per_batch": 1000 * loader_s / steps}
    if step_s:
        out["step_ms"] = 1000 * step_s
        out["loader_over_step_ratio"] = (loader_s / steps) / step_s
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="training steps per way (default 200)")
    ap.add_argument("--repeats", type=int, default=1, help="repeat each way (order rotated), report the fastest "
                                                          "and, from 3 repeats, the median (default 1)")
    ap.add_argument("--quick", action="store_true", help="tiny random-init model, 20 steps: a check that it runs")
    ap.add_argument("--ways", default="bare,suite,trainer")
    ap.add_argument("--data-only", action="store_true", help="only the tokenisation / data-loading check")
    ap.add_argument("--profile", action="store_true", help="also print each way's top operators over 5 steps")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); on a machine shared "
                                               "with other busy processes, 1 thread gives steadier timings")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=tiny-bert budget.batch_size=16")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("BENCH_PROGRESS", "0")
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = 20 if args.quick else args.steps
    overrides = ["method=lora", "task=sst2", f"budget.max_steps={steps}",
                 f"budget.train_samples={max(steps * 32, 2000)}", *(["model=tiny-bert"] if args.quick else []),
                 *args.overrides]
    cfg = compose_config(overrides)
    s = Setup(cfg, steps)
    print(f"model {cfg.model.name}, LoRA r={cfg.rank}, batch {cfg.budget.batch_size}, max_seq_len "
          f"{cfg.budget.max_seq_len}, {steps} steps per way, device {s.device} ({s.precision}), "
          f"torch threads {torch.get_num_threads()}")

    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    if not args.data_only:
        run_bare(s, min(5, steps))  # throwaway: first-use costs of the process land here, not in a timed way
        ways = args.ways.split(",")
        for r in range(args.repeats):
            for name in ways[r % len(ways):] + ways[:r % len(ways)]:
                t, c = WAYS[name](s, steps)
                print(f"  repeat {r + 1}: {name:8s} {steps / t:7.3f} steps/s wall ({t:.1f} s), "
                      f"{steps / c:7.3f} steps/s of CPU time ({c:.1f} s), "
                      f"{sum(CountingCollator.last.per_batch[:steps])} padded tokens in the {steps} batches",
                      flush=True)
                wall.setdefault(name, []).append(t)
                cpu.setdefault(name, []).append(c)
        n = args.repeats
        print(_table(f"wall clock, fastest of {n} repeat(s)", {k: min(v) for k, v in wall.items()}, steps))
        if n > 2:
            print(_table(f"wall clock, median of {n} repeats", {k: statistics.median(v) for k, v in wall.items()},
                         steps))
        if s.device.type == "cpu":
            print(_table(f"CPU time of this process, fastest of {n} (robust to other processes on a shared "
                         "machine; meaningful with --threads 1)", {k: min(v) for k, v in cpu.items()}, steps))
        for name in ways if args.profile else ():
            print(profile(s, name))
        spread = {k: max(v) / min(v) - 1 for k, v in wall.items()}
        print("(ratios are speed ratios: > 1 means faster than the reference; spread of each way's own repeats, "
              "slowest/fastest - 1: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in spread.items()) + ")")
    best = {k: min(v) for k, v in wall.items()}
    step_s = (best.get("suite") or best.get("bare") or 0) / steps or None
    d = data_check(s, steps, step_s)
    print(f"\ndata: tokenised {d['rows']} rows in {d['tokenize_s']:.2f} s ({d['tokenize_rows_per_s']:.0f} rows/s); "
          f"loader {d['loader_ms_per_batch']:.2f} ms per batch (collate + pad)"
          + (f" vs {d['step_ms']:.1f} ms per training step: ratio {d['loader_over_step_ratio']:.4f}"
             if step_s else ""))


if __name__ == "__main__":
    main()
