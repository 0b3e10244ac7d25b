"""A run's data: the task's rows (bench/data/tasks.py), capped by the budget, tokenised for an encoder
(bench/data/encode.py) or as prompt and answer text for a causal LM (bench/data/text.py), and their loaders."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from bench import BenchError
from bench.data import text as lm
from bench.data.encode import carve_validation, make_loader, subset, tokenize
from bench.data.tasks import Task, load_task
from bench.model import is_causal_lm, load_tokenizer


@dataclass
class Data:
    tokenizer: Any
    train_features: list[dict]
    dev_features: list[dict]
    train_loader: Any
    dev_loader: Any
    info: dict  # for the record: source, rows, note
    tokenize_s: float  # time to tokenise the train rows
    few_shot_loader: Any = None  # generation tasks with lm.shots > 0: the dev prompts with k solved examples first
    validation_loader: Any = None  # budget.validation_rows > 0: rows carved from train, what selection reads


@dataclass
class Rows:
    """The rows a run trains and evaluates on (after the budget's caps), and where they came from."""
    train: pd.DataFrame
    dev: pd.DataFrame
    source: str
    check: dict  # for the record: files with fewer rows than the task expects (`rows_below_expected`)
    validation: pd.DataFrame | None = None  # budget.validation_rows > 0: carved from train before its cap


def read_rows(task: Task, budget: Any) -> Rows:
    """The task's train and dev rows, capped by the budget (a fixed subset, the same for every method and seed), and
    with `budget.validation_rows` > 0 the validation split carved from train first (bench/data/encode.py
    `carve_validation`: fixed, disjoint from train and dev, the same for every method and seed). A data file with
    fewer rows than the task's yaml expects is a warning and a note in the record, not an error (a deliberately cut
    file is a legitimate, differently fingerprinted run)."""
    train_df, dev_df, source = load_task(task)
    check = task.row_check({"train": len(train_df), "dev": len(dev_df)}, source)
    for split, (n, expected) in check.get("rows_below_expected", {}).items():
        print(f"warning: task '{task.name}': the {split} file has {n} rows, {expected} expected ({source})")
    validation = None
    n_val = int(budget.get("validation_rows") or 0)
    if n_val:
        if n_val >= len(train_df) // 2:
            raise BenchError(f"task '{task.name}': budget.validation_rows={n_val} would take half or more of its "
                             f"{len(train_df)} training rows; use fewer (the task's yaml suggests validation_rows: "
                             f"{task.validation_rows})")
        train_df, validation = carve_validation(train_df, dev_df, n_val)
    return Rows(subset(train_df, budget.train_samples), subset(dev_df, budget.eval_samples), source, check,
                validation)


def load_data(task: Task, cfg: DictConfig, tokenizer=None, rows: Rows | None = None) -> Data:
    """The task's train and dev rows (capped by the budget; `rows` when already read), tokenised, and their
    loaders: train shuffled by `cfg.seed`, dev in order."""
    budget = cfg.budget
    rows = rows or read_rows(task, budget)
    train_df, dev_df, source = rows.train, rows.dev, rows.source
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    info = {"source": source, "train_rows": len(train_df), "dev_rows": len(dev_df),
            "validation_rows": 0 if rows.validation is None else len(rows.validation),
            "selection_split": "none" if rows.validation is None else "validation",
            "note": task.offline_note if source.startswith(f"{task.data_env.lower()}:") else "", **rows.check}
    start = time.perf_counter()
    few_shot_loader = None
    if task.is_generation:  # question -> worked solution (bench/data/text.py)
        sv = lm.solving(cfg.task, cfg.lm, tokenizer)
        encoded, train_cut = lm.encode_solutions(train_df, tokenizer, sv, int(budget.max_seq_len))
        train_features = lm.solution_train_features(encoded, sv)
        batch, new_tokens = int(cfg.lm.eval_batch_size), int(cfg.lm.max_new_tokens)

        def for_eval(df: pd.DataFrame) -> tuple[list, Any, int]:
            features, cut = lm.encode_solutions(df, tokenizer, sv, int(budget.max_seq_len))
            return features, lm.solution_loader(features, tokenizer, batch, new_tokens), cut
    elif is_causal_lm(cfg.model):  # the task as text (bench/data/text.py)
        pr = lm.prompting(cfg.task, cfg.lm, tokenizer, task.name)
        encoded, train_cut = lm.encode(train_df, tokenizer, pr, int(budget.max_seq_len))
        train_features = lm.train_features(encoded, tokenizer, pr)

        def for_eval(df: pd.DataFrame) -> tuple[list, Any, int]:
            features, cut = lm.encode(df, tokenizer, pr, int(budget.max_seq_len))
            return features, lm.dev_loader(features, tokenizer, int(cfg.lm.eval_batch_size), str(cfg.lm.eval_mode)), cut
    else:
        train_features, train_cut = tokenize(train_df, tokenizer, budget.max_seq_len), None

        def for_eval(df: pd.DataFrame) -> tuple[list, Any, int | None]:
            features = tokenize(df, tokenizer, budget.max_seq_len)
            return features, make_loader(features, tokenizer, cfg.measure.eval_batch_size, shuffle=False, seed=0), None
    tokenize_s = time.perf_counter() - start
    dev_features, dev_loader, dev_cut = for_eval(dev_df)
    validation_loader = None if rows.validation is None else for_eval(rows.validation)[1]
    if task.is_generation:
        shots = int(cfg.lm.shots)
        if shots:  # the first k training rows, solved, before each dev question
            examples = tuple(zip(train_df["text_a"].head(shots), train_df["label"].head(shots)))
            k_shot = lm.solving(cfg.task, cfg.lm, tokenizer, examples)
            room = int(budget.max_seq_len) + k_shot.shots_tokens(tokenizer)  # the question keeps its zero-shot room
            k_features, few_shot_cut = lm.encode_solutions(dev_df, tokenizer, k_shot, room)
            few_shot_loader = lm.solution_loader(k_features, tokenizer, batch, new_tokens)
        info.update(prompt={"chat_template": sv.chat, "loss_on": sv.loss_on, "eval_mode": "generate",
                            "answer_rule": task.answer_rule, "max_new_tokens": new_tokens, "shots": shots,
                            "example": sv.prompt(tokenizer, str(dev_df.iloc[0]["text_a"]))},
                    prompts_cut={"train": train_cut, "dev": dev_cut, **({"few_shot": few_shot_cut} if shots else {})})
    elif is_causal_lm(cfg.model):
        first = dev_df.iloc[0]
        example = pr.prompt(tokenizer, str(first["text_a"]), None if pd.isna(first["text_b"]) else str(first["text_b"]))
        info.update(prompt={"chat_template": pr.chat, "loss_on": pr.loss_on, "eval_mode": str(cfg.lm.eval_mode),
                            "answers": list(pr.answers),
                            "example": example}, prompts_cut={"train": train_cut, "dev": dev_cut})
    return Data(tokenizer, train_features, dev_features, train_loader(train_features, tokenizer, cfg), dev_loader,
                info, tokenize_s, few_shot_loader, validation_loader)


def train_loader(features: list, tokenizer, cfg: DictConfig):
    """A fresh training loader (micro-batches of the budget, shuffled by `cfg.seed`: the same order each time)."""
    if is_causal_lm(cfg.model):
        return lm.train_loader(features, tokenizer, int(cfg.budget.batch_size), int(cfg.seed))
    return make_loader(features, tokenizer, cfg.budget.batch_size, shuffle=True, seed=int(cfg.seed))

