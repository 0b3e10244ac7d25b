"""GLUE tasks and their loader. Every fact about a task (files, columns, labels, metrics, paper recipe,
display label and order) is in `conf/task/<name>.yaml`; `task_from_config` builds the Task from it (the
composed `cfg.task` of a run, or the file itself).

Reads the classic `glue_data/` folder layout from `$GLUE_DIR` when it is set, else the Hub dataset
`nyu-mll/glue`. The files are read with `quoting=3` (csv.QUOTE_NONE): GLUE sentences contain
unbalanced quotes and default quoting silently merges rows.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from bench import BenchError
from bench.config import REPO_ROOT
from bench.data.answers import final_number
from bench.data.files import read_jsonl, read_tsv

HUB_DATASET = "nyu-mll/glue"
CLASSIFICATION, GENERATION = "classification", "generation"  # a task's kind: a label per example, or a worked solution
TASK_CONF = REPO_ROOT / "conf" / "task"


@dataclass(frozen=True)
class Task:
    name: str
    version: int  # part of every run's identity: bumped when a change to the task changes results
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
    validation_rows: int = 0  # the validation split's size (rows carved from train) for budgets that select
    # {counts: dev rows per class id, sources: the data sources (glue_dir, hub) whose dev set these are}
    dev_labels: dict[str, Any] = field(default_factory=dict)
    label: str = ""  # display name in tables and plots
    display_order: int = 100  # column position in tables
    list_order: int = 100  # position in listings (docs/configuration.md's task table, error messages)
    # Generation tasks (question -> worked solution -> final number): `kind: generation`, their offline folder's
    # environment variable, their Hub sources per split, and the answer rule (bench/data/answers.py).
    kind: str = CLASSIFICATION
    data_env: str = "GLUE_DIR"
    hub: dict[str, Any] = field(default_factory=dict)
    answer_rule: str = ""

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def is_generation(self) -> bool:
        return self.kind == GENERATION

    def row_check(self, rows: dict[str, int], source: str) -> dict:
        """`rows_below_expected` {split: [rows, expected]} for offline files shorter than `offline_rows` says."""
        if not source.startswith(f"{self.data_env.lower()}:"):
            return {}
        short = {split: [n, self.offline_rows[split]] for split, n in rows.items()
                 if split in self.offline_rows and n < self.offline_rows[split]}
        return {"rows_below_expected": short} if short else {}


_FIELDS = {f.name: f for f in dataclasses.fields(Task)}
REQUIRED = [name for name, f in _FIELDS.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def task_from_config(cfg: Any) -> Task:
    """The Task of a `conf/task/<name>.yaml` (a DictConfig or dict); keys the Task does not know (the paper
    recipe's `paper_*`) are left to the config. BenchError naming the missing keys."""
    data = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise BenchError(f"task '{data.get('name', '?')}': conf/task/{data.get('name', '<name>')}.yaml lacks "
                         f"{', '.join(missing)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in _FIELDS}
    return Task(**kwargs)


def _load_tasks() -> dict[str, Task]:
    tasks = [task_from_config(OmegaConf.load(path)) for path in TASK_CONF.glob("*.yaml")]
    return {t.name: t for t in sorted(tasks, key=lambda t: (t.list_order, t.name))}


TASKS: dict[str, Task] = _load_tasks()  # every conf/task yaml, in list order


def record_num_labels(record: dict) -> int:
    """The task's label count of a run record (from its effective config)."""
    return int(record["effective_config"]["task"]["num_labels"])


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise BenchError(f"unknown task '{name}'; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def _read_tsv(task: Task, path: Path) -> pd.DataFrame:
    return read_tsv(path, header=task.header, column_names=task.column_names,
                    required=(*task.text_fields, task.label_field))


def _bad_label(labels: pd.Series, ok: pd.Series, where: str, first_line: int, allowed: str) -> None:
    if not ok.all():
        i = int((~ok).to_numpy().nonzero()[0][0])
        raise BenchError(f"{where}: line {i + first_line}: label {labels.iloc[i]!r} is not {allowed} "
                         f"({int((~ok).sum())} such row(s)); is it another task's file?")


def _standardise(task: Task, df: pd.DataFrame, text_fields: tuple[str, ...], label_field: str,
                 where: str = "", first_line: int = 1) -> pd.DataFrame:
    """Columns text_a, text_b, label. A label that is not one the task allows is one line naming `where` (the
    file) and the line (`first_line` is the file line of row 0)."""
    where = where or f"task '{task.name}'"
    out = pd.DataFrame({"text_a": df[text_fields[0]].astype(str)})
    out["text_b"] = df[text_fields[1]].astype(str) if len(text_fields) > 1 else None
    labels = df[label_field]
    if task.is_regression:
        values = pd.to_numeric(labels, errors="coerce")
        _bad_label(labels, values.notna(), where, first_line, "a number")
        out["label"] = values.astype(float)
    elif task.label_names and not labels.astype(str).str.fullmatch(r"-?\d+").all():
        mapping = {name: i for i, name in enumerate(task.label_names)}
        _bad_label(labels, labels.isin(list(mapping)), where, first_line, f"one of {list(task.label_names)}")
        out["label"] = labels.map(mapping).astype(int)
    else:
        ids = pd.to_numeric(labels, errors="coerce")
        allowed = f"a class id 0..{task.num_labels - 1}"
        _bad_label(labels, ids.isin(range(task.num_labels)), where, first_line, allowed)
        out["label"] = ids.astype(int)
    return out.reset_index(drop=True)


def load_task(task: Task, glue_dir: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Return (train, dev, source) with columns text_a, text_b, label (generation tasks: the question, None, the
    worked solution, and `answer`, the final number). `source` says where data came from."""
    if task.is_generation:
        return load_generation_task(task)
    glue_dir = glue_dir if glue_dir is not None else os.environ.get("GLUE_DIR")
    if glue_dir:
        folder = Path(glue_dir).expanduser() / task.folder
        train_path, dev_path = folder / task.train_file, folder / task.dev_file
        if not (train_path.is_file() and dev_path.is_file()):
            raise BenchError(
                f"task '{task.name}': GLUE_DIR={glue_dir} has no {task.folder}/{task.train_file} and "
                f"{task.folder}/{task.dev_file}; point GLUE_DIR at a classic glue_data folder "
                f"(e.g. GLUE_DIR=../shared/data/glue) or unset it to use the Hub dataset {HUB_DATASET}")
        first = 2 if task.header else 1
        train, dev = (_standardise(task, _read_tsv(task, path), task.text_fields, task.label_field, str(path), first)
                      for path in (train_path, dev_path))
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


def load_generation_task(task: Task, data_dir: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """A generation task's (train, dev, source): JSON-lines files in the folder `$<data_env>` names when it is set,
    else the Hub datasets of `task.hub`; one clear line when neither works. Each row's worked solution must end in a
    final number (bench/data/answers.py); a row whose does not is one line naming the file and line."""
    data_dir = data_dir if data_dir is not None else os.environ.get(task.data_env)
    if data_dir:
        folder = Path(data_dir).expanduser() / task.folder
        paths = folder / task.train_file, folder / task.dev_file
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise BenchError(f"task '{task.name}': {task.data_env}={data_dir} has no {', '.join(missing)}; point "
                             f"{task.data_env} at the task's folder (offline: ../shared/data/{task.name})")
        train, dev = (_solutions(task, read_jsonl(p, required=(task.text_fields[0], task.label_field)), str(p))
                      for p in paths)
        return train, dev, f"{task.data_env.lower()}:{folder.resolve()}"
    if not task.hub:
        raise BenchError(f"task '{task.name}': no data. Set {task.data_env} to its folder (offline copy: "
                         f"{task.data_env}=../shared/data/{task.name})")
    splits = []
    for split in ("train", "dev"):
        src = task.hub[split]
        where = f"hub:{src['dataset']}/{src.get('config') or 'default'}/{src['split']}"
        try:
            import datasets

            df = datasets.load_dataset(src["dataset"], src.get("config"), split=src["split"]).to_pandas()
        except Exception as exc:  # noqa: BLE001 - any failure here means "no data", reported in one line
            raise BenchError(
                f"task '{task.name}': no data. Go online for the Hub dataset {src['dataset']} or set "
                f"{task.data_env} to an offline copy ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from exc
        df = df.rename(columns={src["question"]: task.text_fields[0], src["solution"]: task.label_field})
        if src.get("max_chars"):  # peft's MetaMathQA filter: query + " " + response at most this many characters
            long = (df[task.text_fields[0]].str.len() + 1 + df[task.label_field].str.len()) > int(src["max_chars"])
            df = df[~long]
        df["_line"] = df.index + 1  # the row's position in the Hub split (1-based)
        splits.append(_solutions(task, df.reset_index(drop=True), where))
    sources = {f"{task.hub[s]['dataset']}" for s in ("train", "dev")}
    return splits[0], splits[1], f"hub:{'+'.join(sorted(sources))}"


def _solutions(task: Task, df: pd.DataFrame, where: str) -> pd.DataFrame:
    """Columns text_a (the question), text_b (None), label (the worked solution) and answer (its final number)."""
    solutions = df[task.label_field].astype(str)
    values = [final_number(s) for s in solutions]
    bad = next((i for i, v in enumerate(values) if v is None), None)
    if bad is not None:
        line = int(df["_line"].iloc[bad]) if "_line" in df else bad + 1
        raise BenchError(f"{where}: line {line}: the worked solution does not end in a final number "
                         f"(`#### <number>` or `The answer is: <number>`): {solutions.iloc[bad][-60:]!r}")
    return pd.DataFrame({"text_a": df[task.text_fields[0]].astype(str).to_numpy(), "text_b": None,
                         "label": solutions.to_numpy(), "answer": [str(v) for v in values]})
