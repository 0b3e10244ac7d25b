"""The serving benchmark's records in the report: `serving-*.json` files written by `python -m
bench.tools.perf.serving` (schema `serving/1`) in `perf/` beside the results folder (for `results/runs`:
`results/perf/`, the script's default), one section with each record's tables (bench/tools/perf/serving.py
`tables`, the same the script prints)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from analysis.tables import Table
from bench.tools.perf.serving import NOTE, SCHEMA, tables, title

PATTERN = "serving-*.json"


def serving_dir(results: str | Path) -> Path:
    """Where the report looks for serving records: `perf/` beside the results folder."""
    return Path(results).resolve().parent / "perf"


def load_serving(results: str | Path) -> tuple[list[tuple[Path, dict[str, Any]]], list[str]]:
    """(path, record) of each serving record found, and one line per file that is not one this reader knows."""
    found, problems = [], []
    for path in sorted(serving_dir(results).glob(PATTERN)):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"{path}: unreadable ({exc})")
            continue
        if not isinstance(rec, dict) or rec.get("schema") != SCHEMA:
            schema = rec.get("schema") if isinstance(rec, dict) else None
            problems.append(f"{path}: schema {schema!r}, this report reads {SCHEMA!r}")
            continue
        found.append((path, rec))
    return found, problems


def serving_section(results: str | Path) -> list[str]:
    """The report's lines for the serving records next to `results`; none when there are none."""
    found, problems = load_serving(results)
    if not found and not problems:
        return []
    lines = ["## Serving: many adapters on one base model", "",
             f"From `python -m bench.tools.perf.serving` (records in `{serving_dir(results)}`; what each column "
             "means: docs/measurement.md#the-serving-benchmark).", ""]
    for path, rec in found:
        lines += [f"### {title(rec)}", "", f"Record `{path.name}`, {rec.get('created_at', '?')}.", ""]
        for name, header, rows in tables(rec):
            lines += [f"**{name}**", "", Table(name, header, rows).markdown(), ""]
        lines += [NOTE.format(tol=2 * float(rec["settings"].get("noise_tol", 0.05))), ""]
    if problems:
        lines += ["Serving records not shown:", ""] + [f"- {p}" for p in problems] + [""]
    return lines
