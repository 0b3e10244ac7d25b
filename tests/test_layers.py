"""The layer contract (pyproject.toml, [tool.importlinter]): methods <- bench <- analysis, checked by
import-linter so that a backwards import fails the suite, not only CI's `lint-imports` line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_import_layers_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    out = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
