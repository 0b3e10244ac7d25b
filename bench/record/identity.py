"""A run's identity: the hash of the part of its effective config that changes its results, from an allow-list.

The effective config (built by bench/plan/) says everything a run was set up with. Its identity is the part that
changes the numbers the run produces: every key of a task or model yaml is classified here, as identity or not with
the reason, and planning stops with one line when a yaml holds a key this module does not classify (a test checks
every yaml in conf/). So editing a task's note, a model's Hub id (its files' content is fingerprinted instead) or a
display label never re-keys a run, and a new knob cannot silently stay out of the identity.

`config_hash` is the sha256 of the canonical JSON of `identity(effective)`; `config_group` the same without the seed
(the runs of one config over seeds); `run_id` the folder name a person can read, ending in the hash.
"""
from __future__ import annotations

import re
from typing import Any

from bench import BenchError
from bench.hashing import json_sha256

# The effective config's top-level parts, all of them identity when present (weight_dtype: only when the frozen
# weights are not fp32; lm: causal LMs only; forgetting: only when a probe is on; distributed: only for a run over
# several processes, its strategy and world size). Inside task, model and measure only the classified keys below count.
TOP = ("task", "model", "method", "rank", "budget", "seed", "device_type", "precision", "weight_dtype", "measure",
       "lm", "forgetting", "fingerprints", "distributed")

TASK = {
    "name": "the task",
    "version": "bumped when a task's definition changes in a way that changes results",
    "num_labels": "the head's outputs; 1 = regression",
    "label_names": "the labels' order is the class ids'",
    "metrics": "what is computed",
    "main_metric": "what keep_best selects by",
    "prompt": "causal LMs: the task as text (encoder runs leave it out of the effective config)",
    "kind": "classification or generation (question -> worked solution -> final number)",
    "answer_rule": "how a generation's final number is read (bench/data/answers.py)",
}
TASK_NOT = {
    "label": "display name",
    "list_order": "display order",
    "display_order": "display order",
    "folder": "where the rows are read: their content is fingerprinted (fingerprints.*_rows_sha256)",
    "train_file": "where the rows are read (fingerprinted)",
    "dev_file": "where the rows are read (fingerprinted)",
    "header": "how the rows are read (fingerprinted)",
    "column_names": "how the rows are read (fingerprinted)",
    "text_fields": "which columns are the text (the rows' content is fingerprinted)",
    "hub_text_fields": "the same for the Hub dataset (fingerprinted)",
    "hub_dev_split": "the Hub dataset's dev split (fingerprinted)",
    "label_field": "which column is the label (fingerprinted)",
    "offline_rows": "rows the offline files are expected to have (a warning, and data.rows_below_expected)",
    "offline_note": "how the offline data differ from GLUE (a note)",
    "validation_rows": "the validation split's suggested size; what a run carves is budget.validation_rows (identity)",
    "dev_labels": "the dev set's label counts, for reports' chance levels",
    "paper_epochs": "read into budget=paper's epochs, which are in the budget",
    "paper_eval_every_steps": "read into budget=paper's eval interval, which is in the budget",
    "data_env": "where the rows are read: the offline folder's environment variable (fingerprinted)",
    "hub": "where the rows are read: the Hub datasets per split (fingerprinted)",
}
MODEL = {
    "name": "the model",
    "family": "architecture (random-init models are built from it)",
    "kind": "classifier or causal_lm",
    "random_init": "random weights from the seed instead of a checkpoint",
    "config": "a random-init model's architecture",
    "head": "what trains as the task head",
    "first_token_reader": "the head module that reads the first position (prompt tuning)",
    "layers": "the layer stack methods attach to",
    "lora_targets": "modules methods attach to",
    "all_linear": "modules methods attach to",
    "ia3_targets": "modules methods attach to",
    "ia3_feedforward": "modules methods attach to",
    "attention_output": "where adapters sit",
    "ffn_output": "where adapters sit",
    "norms": "norm modules (LN tuning)",
    "biases": "whether the family has bias terms (BitFit)",
}
MODEL_NOT = {
    "hub_id": "where the weights are loaded from: their content is fingerprinted (fingerprints.model_files_sha256)",
    "package": "where the weights are loaded from (fingerprinted)",
    "package_subdir": "where the weights are loaded from (fingerprinted)",
    "gguf_file": "where the weights are loaded from (fingerprinted)",
    "tokenizer_from": "where the tokenizer is loaded from (fingerprinted: fingerprints.tokenizer_files_sha256)",
}
# Budget keys newer than some records, with the value a record without the key ran with (tables group runs by budget:
# a record from before `lr_schedule` existed trained on the linear schedule, and carved no validation split).
BUDGET_ADDED = {"lr_schedule": "linear", "validation_rows": 0}
# Those of them left out of the identity while they hold that value: a new knob at its old behaviour does not re-key
# finished runs (`lr_schedule` came before this rule, and is in every identity since).
BUDGET_NEUTRAL = {k: BUDGET_ADDED[k] for k in ("validation_rows",)}
MEASURE_NOT = {
    "busy_gpu": "what to do when the GPU is busy at run start (recorded as gpu_start)",
    "busy_gpu_threshold_bytes": "when the GPU counts as busy (recorded as gpu_start)",
    "reuse_untrained": "whether the untrained model's evaluations are read from an earlier run with the same key "
                       "(the same computation: recorded as untrained_evals)",
}
_GROUPS = {"task": (TASK, TASK_NOT), "model": (MODEL, MODEL_NOT)}


def unclassified(group: str, keys: Any) -> list[str]:
    """The keys of a task or model config that this module does not classify."""
    known, known_not = _GROUPS[group]
    return sorted(k for k in keys if k not in known and k not in known_not)


def identity(effective: dict[str, Any]) -> dict[str, Any]:
    """The part of an effective config that is hashed. BenchError (one line) for a task or model key that is not
    classified here."""
    out: dict[str, Any] = {}
    for part in TOP:
        if part not in effective:
            continue
        value = effective[part]
        if part in _GROUPS and isinstance(value, dict):
            unknown = unclassified(part, value)
            if unknown:
                raise BenchError(f"{part} '{value.get('name')}': key(s) {unknown} are not classified as identity or "
                                 f"not in bench/record/identity.py; add each to {part.upper()} or {part.upper()}_NOT")
            value = {k: v for k, v in value.items() if k in _GROUPS[part][0]}
        elif part == "budget" and isinstance(value, dict):
            value = {k: v for k, v in value.items() if not (k in BUDGET_NEUTRAL and v == BUDGET_NEUTRAL[k])}
        elif part == "measure" and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in MEASURE_NOT}
        elif part == "fingerprints" and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k.endswith("_sha256")}
        out[part] = value
    return out


def config_hash(effective: dict[str, Any]) -> str:
    """sha256 (16 hex digits) of the run's identity."""
    return json_sha256(identity(effective))


def config_group(effective: dict[str, Any]) -> str:
    """The identity's hash without the seed: the runs of one config over seeds share it (regression tracking
    compares seed groups)."""
    return config_hash({k: v for k, v in effective.items() if k != "seed"})


def tuning_group(effective: dict[str, Any]) -> str:
    """The identity's hash without the seed and the learning rate: the runs of one config over the lr grid and seeds
    of a tuning protocol (bench/orchestrate/protocol.py) share it."""
    method = {k: v for k, v in (effective.get("method") or {}).items() if k != "lr"}
    return config_group({**effective, "method": method})


def _safe(part: str) -> str:
    """A run-folder name part: no path separators or leading dots, so no config value places files outside
    results_dir (`model.name=../../x` becomes `.._.._x`)."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", part).lstrip(".") or "_"


def run_id(task: str, model: str, method: str, rank: int | None, seed: int, hash_: str) -> str:
    """`<task>-<model>-<method>[-r<rank>]-s<seed>-<hash8>`: the run's folder name."""
    rank_part = f"-r{rank}" if rank is not None else ""
    return _safe(f"{task}-{model}-{method}{rank_part}-s{seed}-{hash_[:8]}")
