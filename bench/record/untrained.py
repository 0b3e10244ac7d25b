"""The untrained model's evaluations, computed once and reused by every run that would compute the same thing.

Before training, a run scores the pre-trained model: the forgetting probe's "before" value and, for a causal LM, its
zero-shot metrics and k-shot metrics (lm.shots). For the runs of one sweep these are the same computation whatever
the method: a sweep of five methods on a generation task would decode the same questions ten times. So the first run
stores them in `<results_dir>/.untrained/<key>.json` and later runs with the same key read them
(`measure.reuse_untrained: false` computes them in every run).

The key is the sha256 of everything that decides them: the run's identity (bench/record/identity.py) without the
method, its rank and its learning rate; how the method loads the base model (a 4-bit base is another model); the
installed package versions; and the content of the code that computes them (bench/). The record says which run
computed them (`untrained_evals`). The evaluations leave the random state as they found it (bench/recipe.py), so a
run trains the same whether they were computed or read.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from bench.config import REPO_ROOT
from bench.hashing import json_sha256
from bench.record.identity import identity
from bench.record.provenance import versions
from bench.record.store import write_json_atomic

UNTRAINED_DIR = ".untrained"
# The record fields an untrained evaluation sets (bench/recipe.py); the forgetting probe's value is stored beside them.
FIELDS = ("zero_shot_metrics", "zero_shot_main_metric_value", "zero_shot_generation_eval", "few_shot_metrics",
          "few_shot_generation_eval")
STAGES = ("zero_shot", "few_shot")  # the samples.jsonl stages they write


def _code_sha256() -> str:
    h = hashlib.sha256()
    for path in sorted((REPO_ROOT / "bench").rglob("*.py")):
        h.update(path.relative_to(REPO_ROOT).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def untrained_key(effective: dict[str, Any], load_kwargs: dict[str, Any]) -> str:
    """The key of a run's untrained evaluations (this module's docstring says what it covers)."""
    ident = {k: v for k, v in identity(effective).items() if k not in ("method", "rank")}
    return json_sha256({"identity": ident, "load_kwargs": repr(sorted(load_kwargs.items())),
                        "versions": versions(), "code": _code_sha256()})


def path(results_dir: Path, key: str) -> Path:
    return Path(results_dir) / UNTRAINED_DIR / f"{key}.json"


def read(results_dir: Path, key: str) -> dict[str, Any] | None:
    """The stored evaluations under `key`, or None when there are none (or the file is not one this module wrote)."""
    try:
        saved = json.loads(path(results_dir, key).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(saved, dict) and saved.get("key") == key and isinstance(saved.get("fields"), dict)
    return saved if ok else None


def write(results_dir: Path, key: str, run_id: str, fields: dict[str, Any], forgetting_before: float | None,
          samples: list[dict[str, Any]]) -> None:
    """Store one run's untrained evaluations (atomically: a reader sees the whole file or none). Figures JSON cannot
    hold (NaN) are not stored: the next run computes its own."""
    try:
        write_json_atomic(path(results_dir, key), {"key": key, "computed_by": run_id, "fields": fields,
                                                   "forgetting_before": forgetting_before, "samples": samples})
    except ValueError:
        pass


__all__ = ["FIELDS", "STAGES", "UNTRAINED_DIR", "path", "read", "untrained_key", "write"]
