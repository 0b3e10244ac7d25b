"""GLUE task registry and loader.

Reads the classic `glue_data/` folder layout from `$GLUE_DIR` when it is set, else the Hub dataset
`nyu-mll/glue`. The files are read with `quoting=3` (csv.QUOTE_NONE): GLUE sentences contain
unbalanced quotes and default quoting silently merges rows.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench import BenchError

HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class Task:
    name: str
    folder: str  # folder name in the classic glue_data layout
    text_fields: tuple[str, ...]  # columns in the TSV files
    hub_text_fields: tuple[str, ...]  # columns in the Hub dataset
    label_field: str
    metrics: tuple[str, ...]
    main_metric: str
    num_labels: int  # 1 = regression
    label_names: tuple[str, ...] = ()  # string labels in the TSV, in class-id order
    train_file: str = "train.tsv"
    dev_file: str = "dev.tsv"
    hub_dev_split: str = "validation"
    header: bool = True
    column_names: tuple[str, ...] = ()
    offline_rows: dict[str, int] = field(default_factory=dict)  # rows in ../shared/data/glue
    offline_note: str = ""  # how offline data differs from official GLUE

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("sst2", "SST-2", ("sentence",), ("sentence",), "label", ("accuracy",), "accuracy", 2,
             offline_rows={"train": 67349, "dev": 872}),
        Task("cola", "CoLA", ("sentence",), ("sentence",), "label", ("matthews_correlation",),
             "matthews_correlation", 2, header=False,
             column_names=("source", "label", "orig_label", "sentence"),
             offline_rows={"train": 8551, "dev": 1043}),
        Task("mrpc", "MRPC", ("#1 String", "#2 String"), ("sentence1", "sentence2"), "Quality",
             ("accuracy", "f1"), "accuracy", 2, offline_rows={"train": 3668, "dev": 408}),
        Task("rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
             ("accuracy",), "accuracy", 2, label_names=("entailment", "not_entailment"),
             offline_rows={"train": 2490, "dev": 277}),
        Task("stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score",
             ("pearson", "spearmanr"), "pearson", 1, offline_rows={"train": 5749, "dev": 1500}),
        Task("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label",
             ("accuracy",), "accuracy", 2, label_names=("entailment", "not_entailment"),
             offline_rows={"train": 9999, "dev": 5463},
             offline_note="offline train is a 9,999-row sample of GLUE train; not comparable to published"),
        Task("mnli", "MNLI", ("sentence1", "sentence2"), ("premise", "hypothesis"), "gold_label",
             ("accuracy",), "accuracy", 3, label_names=("entailment", "neutral", "contradiction"),
             dev_file="dev_from_train.tsv", hub_dev_split="validation_matched",
             offline_rows={"train": 8999, "dev": 1000},
             offline_note="offline train and dev are disjoint samples of GLUE MNLI train; "
                          "not comparable to published dev_matched numbers"),
        Task("qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate",
             ("accuracy", "f1"), "accuracy", 2),
    ]
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise BenchError(f"unknown task '{name}'; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def _read_tsv(task: Task, path: Path) -> pd.DataFrame:
    kwargs = dict(sep="\t", quoting=3, encoding="utf-8-sig", keep_default_na=False, dtype=str)
    if task.header:
        return pd.read_csv(path, **kwargs)
    return pd.read_csv(path, header=None, names=list(task.column_names), **kwargs)


def _standardise(task: Task, df: pd.DataFrame, text_fields: tuple[str, ...], label_field: str) -> pd.DataFrame:
    out = pd.DataFrame({"text_a": df[text_fields[0]].astype(str)})
    out["text_b"] = df[text_fields[1]].astype(str) if len(text_fields) > 1 else None
    labels = df[label_field]
    if task.is_regression:
        out["label"] = labels.astype(float)
    elif task.label_names and not labels.astype(str).str.fullmatch(r"-?\d+").all():
        mapping = {name: i for i, name in enumerate(task.label_names)}
        unknown = set(labels) - set(mapping)
        if unknown:
            raise BenchError(f"{task.name}: unexpected labels {sorted(unknown)[:5]} in the data; "
                             f"expected {list(task.label_names)}")
        out["label"] = labels.map(mapping).astype(int)
    else:
        out["label"] = labels.astype(int)
    return out.reset_index(drop=True)


def load_task(task: Task, glue_dir: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Return (train, dev, source) with columns text_a, text_b, label. `source` says where data came from."""
    glue_dir = glue_dir if glue_dir is not None else os.environ.get("GLUE_DIR")
    if glue_dir:
        folder = Path(glue_dir).expanduser() / task.folder
        train_path, dev_path = folder / task.train_file, folder / task.dev_file
        if not (train_path.is_file() and dev_path.is_file()):
            raise BenchError(
                f"task '{task.name}': GLUE_DIR={glue_dir} has no {task.folder}/{task.train_file} and "
                f"{task.folder}/{task.dev_file}; point GLUE_DIR at a classic glue_data folder "
                f"(e.g. GLUE_DIR=../shared/data/glue) or unset it to use the Hub dataset {HUB_DATASET}")
        train = _standardise(task, _read_tsv(task, train_path), task.text_fields, task.label_field)
        dev = _standardise(task, _read_tsv(task, dev_path), task.text_fields, task.label_field)
        return train, dev, f"glue_dir:{folder.resolve()}"
    try:
        import datasets

        ds = datasets.load_dataset(HUB_DATASET, task.name)
        train = _standardise(task, ds["train"].to_pandas(), task.hub_text_fields, "label")
        dev = _standardise(task, ds[task.hub_dev_split].to_pandas(), task.hub_text_fields, "label")
    except Exception as exc:  # noqa: BLE001 - any failure here means "no data", reported in one line
        raise BenchError(
            f"task '{task.name}': no data. Set GLUE_DIR to a classic glue_data folder "
            f"(offline copy: GLUE_DIR=../shared/data/glue) or go online for the Hub dataset "
            f"{HUB_DATASET} ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
        ) from exc
    return train, dev, f"hub:{HUB_DATASET}/{task.name}"
