"""The typed record: one schema for everything a run writes to `record.json`.

Every block is a pydantic model that refuses keys it does not declare, so the writer cannot add an undocumented field
and a reader cannot meet one. Field names carry their unit (`_bytes`, `_s`, `_ms`, `_per_s`); each description says
what the figure is. docs/record.md is generated from this module (`python -m bench.record.docs --write`), and a
test fails when it is stale.

A record of an older schema version is migrated to this one on reading (bench/record/store.py `migrate`).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 2
OK = "ok"
FAILED_STATUSES = ("error", "nan", "oom")  # a run that finished with a failure; `ok` is the only success
STATUSES = (OK, *FAILED_STATUSES)
Status = Literal["ok", "error", "nan", "oom"]
Metrics = dict[str, float | None]
ModelKind = Literal["classifier", "causal_lm"]  # an encoder with a task head, or a decoder LM answering as text


class _Block(BaseModel):
    """A block of the record: it refuses keys it does not declare. Its fields may be missing (null) in a record
    written before they existed, or in a block the run could not measure."""

    model_config = ConfigDict(extra="forbid")


class MigratedFrom(_Block):
    """Set on a record read from an older schema version: what it was written as."""

    schema_version: int = Field(description="the schema version the file was written with")
    config_hash: str = Field(description="its identity hash under that version's rules")
    run_id: str = Field(description="its run id (the folder name) under that version's rules")


class Provenance(_Block):
    git_commit: str | None = Field(None, description="commit of the checkout that ran it")
    git_dirty: bool | None = Field(None, description="the checkout had uncommitted changes to tracked files")
    versions: dict[str, str | None] = Field(None, description="Python and key package versions")
    hostname: str | None = None
    platform: str | None = None
    device: str | None = Field(None, description="device name (GPU model, or CPU model and core count)")
    pid: int | None = None
    parent_pid: int | None = None
    torch_threads: int | None = Field(None, description="torch's intra-op threads during the run")
    lock_sha256: str | None = Field(None, description="sha256 of requirements.lock")
    lock_mismatches: dict[str, str] | None = Field(
        None, description="installed packages whose version differs from requirements.lock: 'installed (lock x)'")


class Fingerprints(_Block):
    train_rows_sha256: str | None = Field(
        None, description="sha256 of the training rows used (text_a, text_b, label, in order)")
    dev_rows_sha256: str | None = Field(None, description="sha256 of the dev rows used")
    validation_rows_sha256: str | None = Field(None, description="sha256 of the validation rows (carved from train)")
    model_files_sha256: str | None = Field(None, description="sha256 over the model's weight and config files; "
                                                       "null for a random-init model")
    model_files: list[str] | None = Field(None, description="the files hashed into model_files_sha256")
    tokenizer_files_sha256: str | None = Field(None, description="sha256 over the tokenizer's files")
    tokenizer_files: list[str] | None = Field(None, description="the files hashed into tokenizer_files_sha256")


class Predictions(_Block):
    pred: list[int | float] = Field(description="per example: the predicted class id, a regression's score, or a "
                                                "generation task's 1 (final number right) / 0")
    label: list[int | float] = Field(description="per example: the gold class id or score (generation tasks: 1)")


class DataInfo(_Block):
    source: str | None = Field(
        None, description="where the rows came from: `glue_dir:<folder>` or `hub:<dataset>/<task>`")
    train_rows: int | None = Field(None, description="training rows after the budget's cap")
    dev_rows: int | None = Field(None, description="dev rows after the budget's cap")
    validation_rows: int | None = Field(None, description="rows carved from train as the validation split "
                                                          "(budget.validation_rows; 0: none)")
    selection_split: str | None = Field(None, description="what evaluations during training (the curve, keep_best) "
                                                          "read: `validation`, or `none` (dev, selecting nothing)")
    note: str | None = Field(None, description="how the offline data differ from the official task, if they do")
    rows_below_expected: dict[str, list[int]] | None = Field(
        None, description="{split: [rows, expected]} for data files shorter than the task's yaml expects")
    prompt: dict[str, Any] | None = Field(
        None, description="causal LMs: chat_template, loss_on, eval_mode, the answers and an example prompt")
    prompts_cut: dict[str, int] | None = Field(
        None, description="causal LMs: prompts cut in the middle to fit budget.max_seq_len, per split (few_shot: "
                          "the k-shot prompts, which have max_seq_len plus their solved examples' tokens)")


class GpuStart(_Block):
    total_bytes: int | None = None
    free_bytes: int | None = None
    start_allocated_bytes: int | None = Field(
        None, description="CUDA tensors this process held at run start (>0: a leak)")
    start_reserved_bytes: int | None = None
    used_outside_allocator_bytes: int | None = Field(
        None, description="total - free - reserved: other processes, the CUDA context and non-PyTorch allocations")
    flags: list[str] | None = Field(None, description="what makes this run's memory or speed figures doubtful")


class Train(_Block):
    steps: int | None = Field(None, description="optimiser steps")
    samples: int | None = Field(None, description="training examples seen")
    wall_s: float | None = Field(None, description="the whole loop, evaluations included")
    timed_steps: int | None = Field(None, description="steps after the timing warm-up")
    timed_s: float | None = Field(None, description="wall time of the timed steps, evaluation excluded")
    compute_s: float | None = Field(None, description="timed_s minus data_s: forward, backward, optimiser step")
    data_s: float | None = Field(None, description="time the loop waited for the next batch in the timed steps")
    samples_per_s: float | None = Field(None, description="timed training examples per second")
    tokens_per_s: float | None = Field(None, description="timed non-padding training tokens per second")
    step_time_ms: float | None = Field(None, description="compute time per timed step")
    data_time_ms: float | None = Field(None, description="data time per timed step")
    timing_warmup_steps: int | None = Field(None, description="steps left out of the timing")
    best_step: int | None = Field(None, description="keep_best: the step whose evaluation was kept")
    evals: list[dict[str, float | int | None]] = Field(None, description="budget.eval_every_steps: each evaluation's "
                                                                   "step and metrics")
    max_batch_seq_len: int = Field(0, description="longest padded training batch (tokens)")


class TrainFlops(_Block):
    """The timed training steps' FLOPs and the share of the device's peak they used: MFU (model FLOPs: what the
    maths needs) and HFU (hardware FLOPs: also the forward gradient checkpointing recomputes). Counted from the
    model's architecture, PaLM's appendix B (bench/measure/flops.py; docs/measurement.md)."""

    note: str | None = Field(None, description="what the figures include, or why there are none")
    weight_gradients: Literal["all", "trainable"] | None = Field(
        None, description="`all`: full fine-tuning, every weight's gradient (6N + 12·L·H·Q·T per token); "
                          "`trainable`: the frozen weights pass the activation gradient only, the task head and the "
                          "adapters (6 FLOPs per trainable parameter per token) get theirs")
    checkpointed_layers: int | None = Field(
        None, description="layers whose forward gradient checkpointing recomputes in the backward (0: none, so "
                          "hardware FLOPs = model FLOPs)")
    world_size: int | None = Field(None, description="processes (devices) the run trained on; MFU divides by the "
                                                     "peak of all of them")
    attention_seq_len: float | None = Field(
        None, description="the attention term's sequence length (tokens): sum of each timed row's non-padding length "
                          "squared over the timed tokens (the token-weighted mean length)")
    forward_flops_per_token: float | None = Field(
        None, description="FLOPs of one forward pass per non-padding token: 2 per multiply-accumulate of every "
                          "matmul, attention's included; embedding lookups 0")
    model_flops_per_token: float | None = Field(
        None, description="FLOPs of a training step per non-padding token: forward + backward, no recomputation")
    hardware_flops_per_token: float | None = Field(
        None, description="model_flops_per_token plus the checkpointed layers' recomputed forward")
    model_flops_per_s: float | None = Field(None, description="model_flops_per_token x train.tokens_per_s (global "
                                                              "over world_size devices)")
    hardware_flops_per_s: float | None = Field(None, description="hardware_flops_per_token x train.tokens_per_s")
    compute_dtype: str | None = Field(None, description="the dtype the matmuls ran in (bf16, fp16, tf32, fp32), "
                                                        "which picks the peak")
    peak_flops_per_s: float | None = Field(None, description="one device's peak in compute_dtype: dense, no "
                                                             "sparsity")
    peak_source: Literal["datasheet", "measured"] | None = Field(
        None, description="`datasheet`: NVIDIA's figure for the GPU; `measured`: a CPU or a GPU not in the table, "
                          "the best rate of square matmuls timed in this process (a probe, not a hardware limit)")
    peak_name: str | None = Field(None, description="the datasheet entry and dtype, or what the probe timed")
    mfu_ratio: float | None = Field(None, description="model FLOPs utilisation: model_flops_per_s / "
                                                      "(peak_flops_per_s x world_size)")
    hfu_ratio: float | None = Field(None, description="hardware FLOPs utilisation: hardware_flops_per_s / "
                                                      "(peak_flops_per_s x world_size)")


class MemoryPhase(_Block):
    """One phase's memory: CUDA allocator figures (`kind: cuda`) or the process's resident set (`kind: cpu_rss`)."""

    kind: Literal["cuda", "cpu_rss"]
    phase_s: float | None = Field(None, description="the phase's duration")
    baseline_allocated_bytes: int | None = Field(None, description="CUDA: allocated at the phase start")
    baseline_reserved_bytes: int | None = Field(None, description="CUDA: reserved at the phase start")
    peak_allocated_bytes: int | None = Field(None, description="CUDA: peak of live tensors during the phase")
    peak_reserved_bytes: int | None = Field(None, description="CUDA: peak the allocator held from the driver")
    peak_allocated_over_baseline_bytes: int | None = None
    peak_reserved_over_baseline_bytes: int | None = None
    peak_rss_scope: Literal["phase", "process_lifetime"] | None = Field(
        None, description="CPU: `phase` when the kernel's peak mark was reset at the phase start")
    baseline_rss_bytes: int | None = Field(None, description="CPU: resident set at the phase start")
    peak_rss_bytes: int | None = Field(None, description="CPU: the process's peak resident set (VmHWM)")
    peak_rss_over_baseline_bytes: int | None = None


class LatencyStats(_Block):
    p50_ms: float | None = Field(None, description="median time per forward pass of the batch")
    p95_ms: float | None = None
    mean_ms: float | None = None
    min_ms: float | None = None
    std_ms: float | None = None
    timed_iters: int | None = None
    warmup_iters: int | None = None
    warmup_s: float | None = None
    warmup_converged: bool | None = Field(None, description="the warm-up stopped because timings were stable")
    rounds: int | None = Field(None, description="interleaved rounds the timed passes were taken in")
    round_p50_ms: list[float] | None = Field(None, description="each round's median pass time")


class _VariantRatios(_Block):
    """Each variant's time over base's, per interleaved round (bench/measure/latency.py `latency_ratios`)."""

    unmerged_over_base_ratio: float | None = Field(None, description="median over rounds of the round's ratio")
    unmerged_over_base_lowest_round_ratio: float | None = None
    unmerged_over_base_highest_round_ratio: float | None = None
    unmerged_over_base_too_noisy: bool | None = Field(None, description="rounds disagree by > 2 x "
                                                                        "measure.latency_noise_tol")
    merged_over_base_ratio: float | None = None
    merged_over_base_lowest_round_ratio: float | None = None
    merged_over_base_highest_round_ratio: float | None = None
    merged_over_base_too_noisy: bool | None = None


class Latency(_VariantRatios):
    batch_size: int | None = None
    seq_len: int | None = Field(None, description="tokens per row (a causal LM: the prefill's prompt length)")
    order: str | None = Field(None, description="`interleaved`: base, unmerged and merged timed in alternating rounds")
    base: LatencyStats | None = None
    unmerged: LatencyStats | None = None
    merged: LatencyStats | None = None
    unmerged_over_base_p50_ratio: float | None = None
    unmerged_over_base_min_ms_ratio: float | None = Field(None, description="ratio of the fastest passes")
    merged_over_base_p50_ratio: float | None = None
    merged_over_base_min_ms_ratio: float | None = None


class GenerationStats(_Block):
    prefill_ms: float | None = Field(None, description="median time to generate 1 token (one forward over the prompt)")
    prefill_min_ms: float | None = None
    generate_ms: float | None = Field(None, description="median time to generate 1 + new_tokens tokens")
    decode_ms_per_token: float | None = Field(None, description="(generate_ms - prefill_ms) / new_tokens")
    decode_tokens_per_s: float | None = Field(None, description="batch rows x tokens per second while decoding")
    timed_iters: int | None = None
    rounds: int | None = None
    round_p50_ms: list[float] | None = Field(None, description="each round's decode ms per token")


class Generation(_VariantRatios):
    batch_size: int | None = None
    prompt_len: int | None = Field(None, description="prompt tokens (synthetic, no padding)")
    new_tokens: int | None = None
    decoding: str | None = None
    order: str | None = None
    base: GenerationStats | None = None
    unmerged: GenerationStats | None = None
    merged: GenerationStats | None = None


class GenerationEval(_Block):
    """A generation task's evaluation by greedy decoding (bench/loop/evaluate.py `evaluate_solutions`)."""

    examples: int | None = Field(None, description="dev questions answered")
    correct: int | None = Field(None, description="answers whose final number equals the gold one")
    accuracy_ci95: list[float] | None = Field(None, description="Wilson 95% interval of the accuracy [low, high]")
    generated_tokens: int | None = Field(None, description="tokens generated, end-of-sequence tokens included")
    mean_generated_tokens: float | None = None
    unfinished_fraction: float | None = Field(None, description="share of generations cut by lm.max_new_tokens")
    generate_s: float | None = Field(None, description="time spent decoding")
    eval_wall_s: float | None = Field(None, description="the whole evaluation: decoding and the gold-solution loss")
    generated_tokens_per_s: float | None = Field(None, description="generated_tokens / generate_s (all rows of a "
                                                                   "batch decode together)")
    answer_rule: str | None = Field(None, description="how the final number is read (bench/data/answers.py)")
    samples_file: str | None = Field(None, description="every answer, beside the record (JSON lines)")


class UntrainedEvals(_Block):
    key: str = Field(description="what decides the untrained model's evaluations, hashed (bench/record/untrained.py)")
    computed_by: str = Field(description="the run_id of the run that computed them")
    reused: bool = Field(description="true: read from `<results_dir>/.untrained/<key>.json`, not computed by this run")


class Forgetting(_Block):
    probe: str | None = Field(None, description="sts, mlm, ppl or wiki (conf/forgetting/)")
    metric: str | None = Field(None, description="what the probe scores (wiki: `next_token_ce_nats_per_token` for a "
                                                 "causal LM, `mlm_loss_nats_per_token` for an encoder)")
    higher_is_better: bool | None = None
    before: float | None = Field(None, description="the probe on the pre-trained model")
    after: float | None = Field(None, description="the probe on the fine-tuned model")
    forgetting: float | None = Field(
        None, description="ability lost: before - after when higher is better, else after - before")
    note: str | None = None
    text_source: str | None = Field(
        None, description="ppl, mlm, wiki: the held-out text (wiki: the file with its sha256, or the Hub dataset, "
                          "split and rows; the cut per document)")
    tokens: int | None = Field(
        None, description="ppl, mlm, wiki: the tokens the loss is pooled over, each counted once (next-token targets "
                          "of a causal LM; masked tokens of an MLM)")


class OomRetry(_Block):
    failed_attempts: list[dict[str, Any]] | None = Field(
        None, description="micro-batch, accumulation and error of each attempt that ran out of memory")
    note: str | None = None
    batch_size: int | None = Field(None, description="the micro-batch of the attempt that finished")
    grad_accum_steps: int | None = None


class DistributedRun(_Block):
    """A run over several processes (distributed=ddp|fsdp): rank 0 writes the record; every rank's memory is here."""

    strategy: Literal["ddp", "fsdp"] = Field(description="ddp: each rank a whole replica; fsdp: FSDP2, parameters, "
                                                         "gradients and optimiser states sharded over the ranks")
    world_size: int = Field(description="ranks (processes) the run trained on; train.samples_per_s is all of theirs")
    launcher: str | None = Field(None, description="who started the ranks: torchrun (the suite itself through "
                                                   "torchrun's engine, or a user) or slurm")
    backend: str | None = Field(None, description="torch.distributed backend: nccl (CUDA) or gloo (CPU)")
    rank_peak_memory_bytes: list[int | None] = Field(
        description="each rank's peak during training, in rank order, of the kind peak_memory_kind says")
    max_rank_peak_memory_bytes: int | None = Field(None, description="the largest of rank_peak_memory_bytes: what a "
                                                                     "device must hold")
    peak_memory_kind: str | None = Field(None, description="cuda_allocated, cpu_rss_phase or cpu_rss_process_lifetime")


class Record(_Block):
    """A run's record. Identity and outcome are always there; the measured blocks are there for ok runs."""

    schema_version: int = Field(SCHEMA_VERSION, description="the version of this schema the record follows")
    # identity
    run_id: str = Field(description="the run's folder name: `task-model-method[-r<rank>]-s<seed>-<hash8>`")
    config_hash: str = Field(description="sha256 of the identity: the part of the effective config that changes "
                                         "results (bench/record/identity.py)")
    config_group: str = Field(description="the same hash without the seed: one config over seeds")
    task: str = Field(description="the task's name (conf/task/)")
    model: str = Field(description="the model's name (conf/model/)")
    method: str = Field(description="the method's name (conf/method/, `python -m methods show <name>`)")
    rank: int | None = Field(description="the rank knob; null for methods that ignore it")
    seed: int = Field(description="model init and data order")
    lr: float = Field(description="peak learning rate")
    budget: str = Field(description="the budget's name (conf/budget/)")
    effective_config: dict[str, Any] = Field(description="everything the run was set up with, normalised")
    migrated_from: MigratedFrom | None = Field(None, description="set when read from an older schema version")
    # outcome
    status: Status = Field(description="ok, or the failure: error, nan (non-finite loss), oom (out of memory)")
    error: str | None = Field(None, description="one line: why the run failed")
    traceback_file: str | None = Field(None, description="an unexpected exception's traceback, beside the record")
    exit_code: int | None = Field(None, description="a run whose process died: its exit code (negative: signal)")
    attempt: int = Field(1, description="attempts at this config so far (failed runs are retried)")
    previous_status: str | None = Field(None, description="the status of the attempt before this one")
    oom_retry: OomRetry | None = None
    started_at: str | None = Field(None, description="ISO 8601, UTC")
    ended_at: str | None = Field(None, description="ISO 8601, UTC")
    run_wall_s: float | None = Field(None, description="the attempt's wall time")
    provenance: Provenance | None = None
    config: dict[str, Any] | None = Field(None, description="the composed Hydra config, resolved")
    fingerprints: Fingerprints | None = None
    # measured
    gpu_start: GpuStart | None = Field(None, description="CUDA: the GPU's memory at run start")
    data: DataInfo | None = None
    model_kind: ModelKind | None = Field(
        None, description="classifier (encoder + task head) or causal_lm (answers scored as text)")
    model_source: str | None = Field(None, description="where the weights came from")
    model_note: str | None = Field(None, description="set for random-init test models: metrics are meaningless")
    full_model_bytes: int | None = Field(None, description="bytes of every parameter and buffer of the base model")
    trainable_params: int | None = Field(None, description="trainable parameters, task head included")
    trainable_params_excl_head: int | None = Field(None, description="what papers report")
    total_params: int | None = None
    head_modules: list[str] | None = Field(None, description="the task head's modules (trainable for every method)")
    weight_dtype: str | None = Field(
        None, description="the dtype the pre-trained weights were loaded in and the frozen ones stay in: fp32 or bf16 "
                          "(precision; qlora: its linear layers are 4-bit NF4 whatever this says); null in records "
                          "written before it existed, whose weights were fp32")
    trainable_dtype: str | None = Field(
        None, description="the dtype every trainable parameter is held in, and so its gradient and AdamW's moments: "
                          "fp32, or bf16 for full fine-tuning under precision=bf16 (no fp32 master copy)")
    autocast_dtype: str | None = Field(None, description="torch.autocast's dtype in every forward pass (bf16, fp16); "
                                                         "null: autocast off")
    param_bytes_by_dtype: dict[str, dict[str, int]] | None = Field(
        None, description="bytes of the parameters as held after the method is attached, `frozen` and `trainable` "
                          "apart, by dtype (fp32, bf16, fp16; uint8: bitsandbytes' packed 4-bit weights)")
    zero_shot_metrics: Metrics | None = Field(None, description="causal LMs: the pre-trained model's metrics")
    zero_shot_main_metric_value: float | None = None
    zero_shot_generation_eval: GenerationEval | None = None
    few_shot_metrics: Metrics | None = Field(None, description="generation tasks, lm.shots > 0: the pre-trained "
                                                               "model prompted with k solved training examples")
    few_shot_generation_eval: GenerationEval | None = None
    untrained_evals: UntrainedEvals | None = Field(
        None, description="where the zero-shot, k-shot and forgetting-before figures come from: computed by this run "
                          "or by an earlier run with the same key (measure.reuse_untrained)")
    train: Train | None = None
    train_flops: TrainFlops | None = Field(None, description="the timed training steps' FLOPs, MFU and HFU")
    distributed: DistributedRun | None = Field(None, description="set for a run over several processes")
    train_samples_per_s: float | None = Field(None, description="= train.samples_per_s")
    train_tokens_per_s: float | None = Field(None, description="= train.tokens_per_s")
    metrics: Metrics | None = Field(None, description="dev metrics under their GLUE names, and eval_loss (nats)")
    higher_is_better: dict[str, bool] | None = Field(None, description="each metric's direction")
    dev_predictions: Predictions | None = Field(
        None, description="each dev example's outcome under the final model, in dev order (what bootstrap intervals "
                          "and paired comparisons resample)")
    validation_metrics: Metrics | None = Field(None, description="budget.validation_rows > 0: the trained model's "
                                                                 "metrics on the validation split")
    validation_main_metric_value: float | None = Field(None, description="what selection across runs compares")
    main_metric: str | None = None
    main_metric_value: float | None = None
    rank_metrics: dict[str, Metrics] | None = Field(None, description="DyLoRA: the trained model's metrics at "
                                                                      "each evaluated rank")
    forgetting: Forgetting | None = None
    generation_eval: GenerationEval | None = Field(None, description="generation tasks: the final evaluation")
    merged_metrics: Metrics | None = Field(None, description="merging methods: the merged model's metrics (a "
                                                             "generation task's: its gold-solution loss)")
    merged_max_abs_logit_diff: float | None = Field(None, description="largest |logit| difference, merged vs "
                                                                      "unmerged, over the dev set")
    latency: Latency | None = None
    generation: Generation | None = Field(None, description="causal LMs: KV-cache generation speed")
    memory: dict[str, MemoryPhase] | None = Field(None, description="per phase: train, eval, latency_<variant>, "
                                                                    "generation")
    peak_memory_bytes: int | None = Field(None, description="the training phase's peak: CUDA allocated, or CPU RSS")
    peak_memory_kind: str | None = Field(None, description="what peak_memory_bytes is: cuda_allocated, "
                                                           "cpu_rss_phase or cpu_rss_process_lifetime")
    method_info: dict[str, Any] | None = Field(None, description="method-specific facts (AdaLoRA's rank pattern)")
    weights_dir: str | None = Field(None, description="the saved weights' folder, beside the record")
    adapter_bytes: int | None = Field(None, description="size of the safetensors files needed to rebuild the model")
    curve_file: str | None = Field(None, description="the loss curve (CSV: step, loss, lr, elapsed_s)")
