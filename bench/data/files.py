"""Reading a task's data files with checks (TSV, JSON lines): a broken file is one line naming the file, the line
and what is wrong.

GLUE's TSVs are read with `quoting=3` (csv.QUOTE_NONE): their sentences hold unbalanced quotes, and default
quoting silently merges rows. So one line of the file is one row, and a row's line number is its index plus
one (plus one more for the header).
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from bench import BenchError


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def read_tsv(path: Path, *, header: bool, column_names: Sequence[str] = (), required: Sequence[str] = ()
             ) -> pd.DataFrame:
    """The file as a DataFrame of strings. BenchError (file, line, what) when it is not UTF-8 text, is empty, has
    a header and no rows, lacks a required column, or has a line with another number of fields than the header
    (or `column_names`)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BenchError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BenchError(f"{path}: line {_line_of(data, exc.start)}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                         "is it the right file? Replace it with the original TSV") from None
    if not text.strip():
        raise BenchError(f"{path}: the file is empty; replace it with the original TSV")
    lines = text.split("\n")
    n_fields = len(lines[0].rstrip("\r").split("\t")) if header else len(column_names)
    for number, line in enumerate(lines, start=1):
        fields = line.rstrip("\r").count("\t") + 1
        if line.strip() and fields != n_fields:
            what = ("too few: the row is cut short, by an interrupted copy?" if fields < n_fields else
                    "too many: a tab inside a sentence, or two rows run together?")
            raise BenchError(f"{path}: line {number}: {fields} tab-separated fields, expected {n_fields} ({what})")
    kwargs = dict(sep="\t", quoting=3, keep_default_na=False, dtype=str)
    if header:
        df = pd.read_csv(io.StringIO(text), **kwargs)
    else:
        df = pd.read_csv(io.StringIO(text), header=None, names=list(column_names), **kwargs)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise BenchError(f"{path}: line 1: no column {missing[0]!r} (columns: {', '.join(map(str, df.columns))}); "
                         "is the header cut or is it another task's file?")
    if df.empty:
        raise BenchError(f"{path}: a header and no rows; replace it with the original TSV")
    return df


def read_jsonl(path: Path, *, required: Sequence[str]) -> pd.DataFrame:
    """A JSON-lines file (one object per line) as a DataFrame. BenchError (file, line, what) when it cannot be read,
    is empty, has a line that is not a JSON object, or a row that lacks a required field or holds an empty one."""
    import json

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BenchError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from exc
    except UnicodeDecodeError:
        raise BenchError(f"{path}: not UTF-8 text; is it the right file? Replace it with the original") from None
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchError(f"{path}: line {number}: not a JSON object ({exc.msg}); is the file cut short?") from None
        if not isinstance(row, dict):
            raise BenchError(f"{path}: line {number}: not a JSON object")
        missing = [k for k in required if not str(row.get(k) or "").strip()]
        if missing:
            raise BenchError(f"{path}: line {number}: no {missing[0]!r} (fields: {', '.join(row) or 'none'})")
        rows.append({**row, "_line": number})
    if not rows:
        raise BenchError(f"{path}: the file is empty; replace it with the original")
    return pd.DataFrame(rows)
