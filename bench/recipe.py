"""One run, as a recipe a reader follows top to bottom: setup -> train -> evaluate -> measure -> save.

`Recipe(plan, rows).run()` does the work of one attempt and returns the record's measured part; everything
around it (planning, skipping what is done, locking, out-of-memory retries, the record itself) is the runner's
(bench/orchestrate/runner.py). The recipe's building blocks are functions below it, also used on their own by the
sequential-forgetting experiment and the benchmark scripts (bench/tools/perf/): `build_model`, `attach`,
`train_model`, `fresh_model`.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench import BenchError
from bench.data import Data, Rows, load_data, train_loader
from bench.loop.evaluate import evaluate, evaluate_rank_variants, evaluate_solutions
from bench.loop.faults import injected_faults
from bench.loop.train import TrainResult, TrainSettings, total_steps, train
from bench.measure.flops import train_utilisation
from bench.measure.latency import generation_interleaved, latency_batch, latency_interleaved, latency_ratios
from bench.measure.memory import MemoryMeter, check_gpu_start, peak_memory_summary
from bench.metrics import directions
from bench.model import attach_context, distributed, is_causal_lm, load_model, seed_everything
from bench.model.precision import autocast_dtype, hold_trainable, param_bytes_by_dtype
from bench.plan import Plan
from bench.record import CURVE_FILE, SAMPLES_FILE, WEIGHTS_DIR, untrained, write_jsonl
from methods import Method
from methods.base import count_params, head_modules, tensor_bytes


class Recipe:
    """One attempt at a planned run. Each step adds its figures to `out` (the record's measured part)."""

    def __init__(self, p: Plan, rows: Rows) -> None:
        self.p, self.rows = p, rows
        self.causal = is_causal_lm(p.cfg.model)
        self.out: dict[str, Any] = {}
        self.samples: list[dict[str, Any]] = []  # generation tasks: each evaluated answer (SAMPLES_FILE)

    def run(self) -> dict[str, Any]:
        self.setup()
        self.train()
        if not self.p.world.main:  # a distributed run's other ranks: their part ends with training
            return self.out
        self.evaluate()
        self.measure()
        self.save()
        return self.out

    def setup(self) -> None:
        """Data, the pre-trained model and what it scores before training (forgetting probe, a causal LM's
        zero-shot metrics), then the method attached."""
        p, cfg, out = self.p, self.p.cfg, self.out
        gpu_start = check_gpu_start(p.device, str(cfg.measure.busy_gpu), int(cfg.measure.busy_gpu_threshold_bytes))
        if gpu_start is not None:
            out["gpu_start"] = gpu_start
        seed_everything(int(cfg.seed))
        self.data = load_data(p.task, cfg, rows=self.rows)
        out["data"] = self.data.info
        self.probe = None
        if cfg.get("forgetting"):  # the same probe before attaching and after training (bench/measure/probes.py)
            from bench.measure.probes import make_probe

            self.probe = make_probe(cfg.forgetting, cfg.model, self.data.tokenizer, p.task.name)
        out["model_kind"] = "causal_lm" if self.causal else "classifier"
        model, out["model_source"] = build_model(p)
        check_positions(model.config, p, [*self.data.train_features, *self.data.dev_features])
        self.amp = autocast_dtype(p.precision)
        self.forgetting_before = None
        if p.world.main:  # a distributed run: rank 0 evaluates and records, the others wait for it before training
            with torch.random.fork_rng(devices=[p.device] if p.device.type == "cuda" else []):
                self.untrained_evals(model)  # the random state as it was: training is the same either way
        if cfg.model.get("random_init"):
            out["model_note"] = "random-init test model: metrics are meaningless"
        out["full_model_bytes"] = tensor_bytes(model)
        self.meter = MemoryMeter(p.device)
        self.steps = total_steps(len(self.data.train_loader), cfg.budget)
        self.model, counts = attach(p, model, self.steps, self.data)
        out.update(counts)
        distributed.wait_for_main(p.world)
        self.trained = distributed.wrap(self.model, p.world, p.device, cfg.get("distributed"))  # what trains

    def untrained_evals(self, model: nn.Module) -> None:
        """What the pre-trained model scores: the forgetting probe's value before training and a causal LM's zero-shot
        (and k-shot, lm.shots) metrics, what fine-tuning adds over prompting. Read when an earlier run of the same
        results folder computed the same (bench/record/untrained.py), else computed and stored."""
        p, out = self.p, self.out
        reuse = bool(p.cfg.measure.reuse_untrained)  # conf/config.yaml
        key = untrained.untrained_key(p.effective, p.method.load_kwargs(p.effective["method"], p.cfg.model, p.device))
        saved = untrained.read(p.cfg.results_dir, key) if reuse else None
        if saved is not None:
            out.update(saved["fields"])
            self.forgetting_before = saved["forgetting_before"]
            self.samples += saved["samples"]
            out["untrained_evals"] = {"key": key, "computed_by": saved["computed_by"], "reused": True}
            return
        self.forgetting_before = self.probe.measure(model, p.device, self.amp) if self.probe is not None else None
        if self.causal:
            out["zero_shot_metrics"], _ = self._evaluate(model, stage="zero_shot")
            out["zero_shot_main_metric_value"] = out["zero_shot_metrics"][p.task.main_metric]
        if self.data.few_shot_loader is not None:
            out["few_shot_metrics"], _ = self._evaluate(model, stage="few_shot", loader=self.data.few_shot_loader)
        if reuse and (self.causal or self.probe is not None):
            fields = {k: out[k] for k in untrained.FIELDS if k in out}
            untrained.write(p.cfg.results_dir, key, p.run_id, fields, self.forgetting_before,
                            [s for s in self.samples if s["stage"] in untrained.STAGES])
            out["untrained_evals"] = {"key": key, "computed_by": p.run_id, "reused": False}

    def train(self) -> None:
        """The shared loop; throughput excludes the timing warm-up steps and any evaluation."""
        warmup = timing_warmup(self.p, self.steps)
        with self.meter.phase("train"):
            # evaluations during training (curve, keep_best) read the validation split when there is one, never dev
            tr = train_model(self.p, self.trained, self.data.train_loader, self.steps, warmup,
                             evaluate_fn=lambda: self._evaluate(self.model, stage=None,
                                                                loader=self.data.validation_loader)[0])
        self.curve = tr.curve
        self.out["train"] = train_summary(tr, warmup)
        self.out["train_samples_per_s"] = self.out["train"]["samples_per_s"]
        self.out["train_tokens_per_s"] = self.out["train"]["tokens_per_s"]
        # FLOPs and MFU / HFU of the timed steps; a distributed run's tokens/s is global, so its peak is world_size's
        p = self.p
        if p.world.main:
            self.out["train_flops"] = train_utilisation(
                self.model, tr, self.out["train"], causal_lm=self.causal,
                trains_all_weights=p.method.trains_all_weights,
                trainable_params_excl_head=self.out["trainable_params_excl_head"], dtypes=p.dtypes, device=p.device,
                world_size=p.world.size)
        if p.world.distributed:
            self.gather_ranks()

    def gather_ranks(self) -> None:
        """A distributed run: every rank's peak training memory to the record, and (FSDP) the trained model whole on
        rank 0, gathered from the shards into a fresh copy of the model that evaluation and saving then use."""
        p, world = self.p, self.p.world
        peaks = distributed.gather(world, peak_memory_summary(self.meter.phases, "train"))
        self.out["distributed"] = {
            "strategy": world.strategy, "world_size": world.size, "launcher": world.launcher,
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
            "rank_peak_memory_bytes": [peak["peak_memory_bytes"] for peak in peaks],
            "max_rank_peak_memory_bytes": max((peak["peak_memory_bytes"] or 0) for peak in peaks),
            "peak_memory_kind": peaks[0]["peak_memory_kind"]}
        if world.strategy == "fsdp":
            state = distributed.full_state_dict(self.model)
            self.model = self.trained = None
            if world.main:
                self.model = fresh_model(p, self.steps)
                self.model.load_state_dict(state)

    def evaluate(self) -> None:
        """Dev metrics of the trained model (and of each rank it also stands for), forgetting, and the merged
        model's metrics beside the unmerged one's."""
        p, out = self.p, self.out
        with self.meter.phase("eval"):
            out["metrics"], logits = self._evaluate(self.model, stage="final")
        out["higher_is_better"] = directions(out["metrics"])
        out["main_metric"] = p.task.main_metric
        out["main_metric_value"] = out["metrics"][p.task.main_metric]
        if self.data.validation_loader is not None:  # what selection across runs reads (e.g. an lr search)
            out["validation_metrics"], _ = self._evaluate(self.model, stage=None, loader=self.data.validation_loader)
            out["validation_main_metric_value"] = out["validation_metrics"][p.task.main_metric]
        rank_metrics = evaluate_rank_variants(p.method, self.model, lambda: self._evaluate(self.model, stage=None)[0])
        if rank_metrics:  # a method whose one trained model is also a model of other ranks (DyLoRA)
            out["rank_metrics"] = rank_metrics
        if self.probe is not None:
            out["forgetting"] = self.probe.result(self.forgetting_before,
                                                  self.probe.measure(self.model, p.device, self.amp))
        self.merged = None
        if p.method.merges:
            self.merged = p.method.merged(self.model)
            # a generation task compares the merged model by its teacher-forced gold-solution losses, not by decoding
            out["merged_metrics"], merged_logits = self._evaluate(self.merged, stage=None, generate=False)
            out["merged_max_abs_logit_diff"] = float(np.abs(merged_logits - logits).max())

    def measure(self) -> None:
        """Latency (and a causal LM's generation speed) of base, unmerged and merged, timed side by side at the end
        (base: a fresh copy of the base model), so the machine's drift over the run does not masquerade as a
        method's overhead; then the memory of every phase."""
        p, cfg, out = self.p, self.p.cfg, self.out
        if cfg.measure.latency:
            variants = {"base": build_model(p)[0], "unmerged": self.model}
            if self.merged is not None:
                variants["merged"] = self.merged
            tokenizer = self.data.tokenizer
            out["latency"] = time_latency(p, variants, tokenizer.vocab_size, self.meter)
            if self.causal and cfg.lm.generation:
                with self.meter.phase("generation"):
                    out["generation"] = time_generation(p, variants, tokenizer.vocab_size, int(tokenizer.pad_token_id))
            del variants
        self.merged = None
        out["memory"] = self.meter.phases
        out.update(peak_memory_summary(self.meter.phases, "train"))
        out["method_info"] = p.method.info(self.model)

    def save(self) -> None:
        """The weights (unless save_weights=none), the loss curve and a generation task's answers, into the run
        folder."""
        self.out.update(save(self.p, self.p.method, self.model, self.curve))
        if self.samples:
            write_jsonl(self.p.run_dir / SAMPLES_FILE, self.samples)

    def _evaluate(self, model: nn.Module, stage: str | None, loader=None, generate: bool = True
                  ) -> tuple[dict[str, float], np.ndarray]:
        """(metrics, the scores merged and unmerged models are compared on) on the dev set (or `loader`). A generation
        task decodes every answer (unless `generate=False`); its evaluation at a named `stage` (zero_shot, few_shot,
        final) also records `<stage>_generation_eval` (`generation_eval` for the final one) and its answers."""
        p, loader = self.p, loader or self.data.dev_loader
        if not p.task.is_generation:
            metrics, logits, predictions = evaluate(model, loader, p.task, p.device, p.precision)
        else:
            res = evaluate_solutions(model, loader, self.data.tokenizer, p.device, p.precision, generate=generate)
            if stage is not None:
                key = "generation_eval" if stage == "final" else f"{stage}_generation_eval"
                self.out[key] = {**res.stats, "samples_file": SAMPLES_FILE}
                self.samples += [{"stage": stage, **s} for s in res.samples]
            metrics, logits = res.metrics, res.scores
            predictions = {"pred": [int(s["correct"]) for s in res.samples], "label": [1] * len(res.samples)}
        if stage == "final":  # each dev example's outcome: intervals and paired comparisons resample them
            self.out["dev_predictions"] = predictions
        return metrics, logits


def fresh_model(p: Plan, steps: int) -> nn.Module:
    """Seeded as a run is, the base model with the method attached: what each way of a benchmark starts from."""
    seed_everything(int(p.cfg.seed))
    return attach(p, build_model(p)[0], steps)[0]


def build_model(p: Plan) -> tuple[nn.Module, str]:
    """(the pre-trained model on the run's device, its source), loaded in the run's weight dtype (precision) and as
    the method asks (e.g. 4-bit)."""
    load_kwargs = p.method.load_kwargs(p.effective["method"], p.cfg.model, p.device)
    model, source = load_model(p.cfg.model, p.task.num_labels, p.dtypes.weights, **load_kwargs)
    return model.to(p.device), source


def check_positions(config: Any, p: Plan, features: list[dict]) -> None:
    """Prompt/prefix tuning lengthen every sequence by their virtual tokens; fail before training, with the fix,
    when the longest example would then run past the model's position embeddings."""
    extra = p.method.virtual_tokens(p.rank)
    positions = getattr(config, "max_position_embeddings", None)
    if not extra or not positions:
        return
    if config.model_type in ("roberta", "xlm-roberta", "camembert"):
        positions -= int(config.pad_token_id) + 1  # RoBERTa's positions start after the padding index
    longest = max(len(f["input_ids"]) if "input_ids" in f else len(f["prompt_ids"]) + max(map(len, f["answer_ids"]))
                  for f in features)  # a causal LM's dev feature: its prompt and answers (bench/data/text.py)
    if longest + extra > positions:
        raise BenchError(f"method '{p.method.name}' adds {extra} virtual tokens, and the longest tokenised example "
                         f"has {longest}: {longest + extra} > the model's {positions} positions; set "
                         f"budget.max_seq_len={positions - extra} (for every method you compare) or a smaller rank")


def attach(p: Plan, model: nn.Module, steps: int, data: Data | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(the model with the method attached, on the run's device, its trainable parameters in the run's trainable
    dtype; its parameter counts, the task head's module names and the dtypes, for the record). BenchError when the
    method trains nothing outside the task head. With `data`, a method that initialises from data (EVA, CorDA,
    LoRA-GA) reads the run's first training batches from a fresh loader in the same order, so the training loader's
    order is not touched."""
    calibration = None
    if data is not None:
        def calibration():
            return train_loader(data.train_features, data.tokenizer, p.cfg)
    ctx = attach_context(p.cfg.model, p.rank, p.task.num_labels, steps, calibration)
    model = p.method.attach(model, p.effective["method"], ctx)  # the method config the run's hash names
    model = hold_trainable(model, p.dtypes.trainable).to(p.device)
    head = head_modules(p.cfg.model)
    counts: dict[str, Any] = {**count_params(model, head), "head_modules": list(head), **p.dtypes.names(),
                              "param_bytes_by_dtype": param_bytes_by_dtype(model)}
    if counts["trainable_params_excl_head"] == 0 and not p.method.trains_all_weights:
        raise BenchError(f"method '{p.method.name}' attached no trainable parameters outside the task head; "
                         f"check method.target_modules ({p.cfg.method.get('target_modules')}) against the model")
    return model, counts


def train_settings(p: Plan, steps: int, timing_warmup_steps: int = 0) -> TrainSettings:
    return TrainSettings(steps=steps, lr=p.lr, weight_decay=float(p.cfg.method.weight_decay),
                         warmup_ratio=float(p.cfg.method.warmup_ratio), budget=p.cfg.budget, device=p.device,
                         precision=p.precision, head=head_modules(p.cfg.model), timing_warmup_steps=timing_warmup_steps,
                         main_metric=p.task.main_metric, world=p.world)


def train_model(p: Plan, model: nn.Module, loader, steps: int, timing_warmup_steps: int = 0,
                evaluate_fn=None) -> TrainResult:
    """The shared loop with the run's settings (and the test-only fault hooks of bench/loop/faults.py)."""
    return train(model, p.method, loader, train_settings(p, steps, timing_warmup_steps), evaluate_fn=evaluate_fn,
                 hooks=injected_faults(p.run_id))


def timing_warmup(p: Plan, steps: int) -> int:
    """Steps left out of throughput figures: short runs (smoke budgets) keep at least half their steps timed."""
    return min(int(p.cfg.measure.timing_warmup_steps), steps // 2)


def train_summary(tr: TrainResult, warmup: int) -> dict:
    """The record's `train` block."""
    return {
        "steps": tr.steps, "samples": tr.samples, "wall_s": tr.wall_s, "timed_steps": tr.timed_steps,
        "timed_s": tr.timed_s, "compute_s": tr.compute_s, "data_s": tr.data_s,
        "samples_per_s": tr.timed_samples / tr.timed_s if tr.timed_s else None,
        "tokens_per_s": tr.timed_tokens / tr.timed_s if tr.timed_s else None,
        "step_time_ms": 1000 * tr.compute_s / tr.timed_steps if tr.timed_steps else None,
        "data_time_ms": 1000 * tr.data_s / tr.timed_steps if tr.timed_steps else None,
        "timing_warmup_steps": warmup, "best_step": tr.best_step, "evals": tr.evals,
        "max_batch_seq_len": tr.max_batch_seq_len,
    }


def time_latency(p: Plan, variants: dict[str, nn.Module], vocab_size: int, meter: MemoryMeter) -> dict:
    """Latency of the models in `variants` (base, unmerged, merged), timed side by side (docs/measurement.md)."""
    measure = p.cfg.measure
    # A causal LM's forward pass over a prompt is its prefill: timed at the generation knobs' shape (lm.gen_*).
    rows, length = ((p.cfg.lm.gen_batch_size, p.cfg.lm.gen_prompt_len) if is_causal_lm(p.cfg.model)
                    else (measure.latency_batch_size, measure.latency_seq_len))
    batch = latency_batch(vocab_size, int(rows), int(length), p.device)
    latency = {"batch_size": int(rows), "seq_len": int(length), "order": "interleaved"}
    latency.update(latency_interleaved(
        variants, batch, warmup_iters=int(measure.latency_warmup_iters), iters=int(measure.latency_iters),
        device=p.device, autocast_dtype=autocast_dtype(p.precision), rounds=int(measure.latency_rounds),
        warmup_tol=float(measure.latency_warmup_tol), max_warmup_s=float(measure.latency_max_warmup_s),
        meter=meter))
    latency.update(latency_ratios({k: v for k, v in latency.items() if k in variants},
                                  noise_tol=float(measure.latency_noise_tol)))
    return latency


def time_generation(p: Plan, variants: dict[str, nn.Module], vocab_size: int, pad_id: int) -> dict:
    """Generation latency of a causal LM's variants (base, unmerged, merged) with the KV cache: prefill ms and decode
    tokens/s, timed side by side (bench/measure/latency.py `generation_interleaved`), with each variant's decode time
    per token relative to base per round (`<name>_over_base_ratio`, `..._too_noisy`, as for forward latency)."""
    knobs = p.cfg.lm
    batch = latency_batch(vocab_size, int(knobs.gen_batch_size), int(knobs.gen_prompt_len), p.device)
    out: dict[str, Any] = {"batch_size": int(knobs.gen_batch_size), "prompt_len": int(knobs.gen_prompt_len),
                           "new_tokens": int(knobs.gen_new_tokens), "decoding": "greedy, KV cache",
                           "order": "interleaved"}
    out.update(generation_interleaved(
        variants, batch, new_tokens=int(knobs.gen_new_tokens), pad_id=pad_id,
        warmup_iters=max(1, int(p.cfg.measure.latency_warmup_iters) // 2), iters=int(knobs.gen_iters),
        device=p.device, autocast_dtype=autocast_dtype(p.precision), rounds=int(p.cfg.measure.latency_rounds)))
    out.update(latency_ratios({k: v for k, v in out.items() if k in variants},
                              noise_tol=float(p.cfg.measure.latency_noise_tol)))
    return out


def save(p: Plan, method: Method, model: nn.Module, curve: list[dict]) -> dict:
    """The weights (unless save_weights=none) and the loss curve into the run folder; what the record says."""
    out: dict[str, Any] = {}
    if p.cfg.save_weights != "none":
        weights_dir = p.run_dir / WEIGHTS_DIR
        method.save(model, weights_dir)
        out["weights_dir"] = WEIGHTS_DIR
        out["adapter_bytes"] = sum(f.stat().st_size for f in weights_dir.glob("*.safetensors"))
    write_curve(p.run_dir, curve)
    out["curve_file"] = CURVE_FILE
    return out


def write_curve(run_dir: Path, curve: list[dict]) -> None:
    with open(run_dir / CURVE_FILE, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", "loss", "lr", "elapsed_s"])
        writer.writeheader()
        writer.writerows(curve)
