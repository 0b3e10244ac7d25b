"""docs/methods.md's method table is the one generated from the registry and the yamls
(bench/tools/method_table.py)."""
from __future__ import annotations

from bench.tools.method_table import doc_table, main, method_table
from methods import REGISTRY


def test_methods_doc_table_is_the_generated_one():
    table = method_table()
    assert doc_table() == table, "docs/methods.md is stale: run python -m bench.tools.method_table --write"
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) == len(REGISTRY)
    # Every row says how its defaults were set; the learning rate is the composed yaml's.
    assert all(not line.rstrip(" |").endswith("—") for line in rows)
    assert any(line.startswith("| `vera` |") and "| 4e-3 (VeRA paper" in line for line in rows)


def test_check_mode_exits_1_on_a_stale_table(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "methods.md"
    stale.write_text("# Methods\n\n" + doc_table().replace("| `vera` |", "| `vera-old` |") + "\n")
    monkeypatch.setattr("bench.tools.method_table.METHODS_DOC", stale)
    assert main(["--check"]) == 1
    assert "run python -m bench.tools.method_table --write" in capsys.readouterr().err
    assert main(["--write"]) == 0 and main(["--check"]) == 0
