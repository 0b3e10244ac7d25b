"""Hashes the suite's identities are made of: canonical JSON of a config, and file contents (cached per process by
path, size and mtime, so a sweep hashes each file once)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

_file_cache: dict[tuple[str, int, int], str] = {}


def json_sha256(obj: object) -> str:
    """sha256 (16 hex digits) of the canonical JSON of `obj`: sorted keys, no spaces."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _file_cache:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _file_cache[key] = h.hexdigest()
    return _file_cache[key]

