"""Rewrite a results folder's records in the current schema, renaming each run folder to its current run id.

    python -m bench.record.upgrade results/runs             # say what would change
    python -m bench.record.upgrade results/runs --apply     # do it

Every reader migrates older records on reading, so tables, reports and comparisons need no upgrade. A results
folder that sweeps write into does: the runner finds a finished run by its folder name, which ends in the identity's
hash, and a record's hash changes when the identity's rules do (schema 1 -> 2). Without the upgrade, a sweep runs
those configs again beside the old folders. Each record is rewritten atomically (its old id and hash stay in
`migrated_from`); a folder whose new name is taken is left as it is and reported.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.record.schema import SCHEMA_VERSION
from bench.record.store import find_records, read_checked, write_json_atomic


def upgrade(root: Path, apply: bool) -> list[str]:
    """One line per record that is, or would be, upgraded or that cannot be."""
    lines = []
    for path in find_records(root):
        raw, rec, problem = read_checked(path)
        if rec is None:
            lines.append(f"skip {path}: {problem}")
            continue
        if raw["schema_version"] == SCHEMA_VERSION:
            continue
        old_dir = path.parent
        new_dir = old_dir.parent / rec["run_id"]
        if new_dir != old_dir and new_dir.exists():
            lines.append(f"skip {old_dir.name}: {new_dir.name} exists already")
            continue
        lines.append(f"{old_dir.name} -> {new_dir.name} (schema {raw.get('schema_version')} -> {SCHEMA_VERSION})")
        if apply:
            write_json_atomic(path, rec)
            if new_dir != old_dir:
                old_dir.rename(new_dir)
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--apply", action="store_true", help="rewrite and rename (default: only say what would change)")
    args = ap.parse_args(argv)
    if not args.results.is_dir():
        print(f"error: {args.results}: no such folder", file=sys.stderr)
        return 2
    lines = upgrade(args.results, args.apply)
    print("\n".join(lines) if lines else f"every record under {args.results} is schema {SCHEMA_VERSION}")
    if lines and not args.apply:
        print("(nothing changed: --apply to do it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
