"""The record is the one contract between a run and analysis: typed, versioned, read through one reader that
migrates older versions, keyed by an identity from an allow-list, documented by a generated page."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bench.config import compose_config
from bench.plan import identify, plan
from bench.record import (
    SCHEMA_VERSION,
    SchemaError,
    config_hash,
    identity,
    load_records,
    migrate,
    read_record,
    upgrade,
    validate,
    write_record,
)
from bench.record import docs as record_docs
from tests.conftest import CONF, REPO

BASELINES = REPO / "results" / "baselines"
RAW = {str(p): json.loads(p.read_text()) for p in sorted(BASELINES.glob("*/*/record.json"))}


def test_every_committed_baseline_reads_through_the_one_reader():
    records, problems = load_records(BASELINES)
    assert problems == []
    assert len(records) == len(RAW) > 0
    assert {r["schema_version"] for r in records} == {SCHEMA_VERSION}


@pytest.mark.parametrize("version", sorted({r["schema_version"] for r in RAW.values()} - {SCHEMA_VERSION}))
def test_each_older_schema_version_in_the_baselines_migrates(version):
    olds = {p: r for p, r in RAW.items() if r["schema_version"] == version}
    for path, raw in olds.items():
        rec = migrate(raw)
        assert rec["schema_version"] == SCHEMA_VERSION
        assert rec["migrated_from"] == {"schema_version": version, "config_hash": raw["config_hash"],
                                        "run_id": raw["run_id"]}
        assert rec["effective_config"]["task"]["version"] == 1
        if raw["status"] == "ok":
            assert rec["model_kind"] in ("classifier", "causal_lm")
            assert rec["higher_is_better"]["eval_loss"] is False
            assert rec["higher_is_better"][raw["main_metric"]] is True
        assert validate(raw).config_hash == rec["config_hash"], path


def test_a_record_of_an_unknown_or_newer_version_is_a_problem_not_a_crash(tmp_path):
    raw = next(iter(RAW.values()))
    for i, version in enumerate((0, SCHEMA_VERSION + 1)):
        (tmp_path / f"r{i}").mkdir()
        (tmp_path / f"r{i}" / "record.json").write_text(json.dumps({**raw, "schema_version": version}))
    (tmp_path / "r2").mkdir()
    (tmp_path / "r2" / "record.json").write_text(json.dumps({**migrate(raw), "surprise_s": 1.0}))
    records, problems = load_records(tmp_path)
    assert records == [] and len(problems) == 3
    assert "newer peft-bench" in problems[1] and "surprise_s" in problems[2]
    with pytest.raises(SchemaError):
        validate({**raw, "schema_version": SCHEMA_VERSION + 1})


def test_the_writer_refuses_a_field_the_schema_does_not_declare(tmp_path):
    rec = migrate(next(iter(RAW.values())))
    with pytest.raises(SchemaError, match="undeclared_ms"):  # the suite runs with PEFT_BENCH_STRICT_RECORDS=1
        write_record(tmp_path, {**rec, "undeclared_ms": 3.0})
    write_record(tmp_path, rec)
    assert read_record(tmp_path) == rec


def _overrides(rec: dict) -> list[str]:
    """The overrides a committed baseline was run with (its README's command)."""
    preset = {"cpu-smoke": "smoke", "all-methods-minilm": "all_methods", "gsm-cpu": "gsm_cpu",
              "tuned-minilm": "tuned_minilm"}[Path(rec["record_path"]).parts[-3]]
    rank = [f"rank={rec['rank']}"] if rec["rank"] is not None else []
    device = ["device=cpu"] if preset == "smoke" else []
    # a protocol's run: its trial lr and the validation split the protocol sets (bench/orchestrate/protocol.py)
    trial = [f"lr={rec['lr']}", "budget.validation_rows=1000", "~protocol"] if preset == "tuned_minilm" else []
    return [f"+sweep={preset}", f"method={rec['method']}", f"seed={rec['seed']}", *rank, *device, *trial]


def test_todays_configs_have_the_identity_of_the_migrated_baselines():
    """A run of a baseline's config today is the baseline's run: same identity after migration, so compare
    matches them and resume skips them (no silent orphaning)."""
    records, _ = load_records(BASELINES)
    for rec in records:
        p = identify(plan(compose_config(_overrides(rec))), rec["fingerprints"])
        planned, recorded = identity.identity(p.effective), identity.identity(rec["effective_config"])
        differ = {f"{part}.{k}": (recorded[part].get(k), planned[part].get(k)) for part in planned
                  if isinstance(planned[part], dict) for k in planned[part].keys() | recorded[part].keys()
                  if planned[part].get(k) != recorded[part].get(k)}
        assert (p.run_id, p.config_hash) == (rec["run_id"], rec["config_hash"]), (rec["run_id"], differ)


def test_the_identity_leaves_out_what_does_not_change_results():
    p = plan(compose_config(["model=tiny-bert", "budget=smoke"]))
    effective = p.effective
    edited = {**effective, "task": {**effective["task"], "offline_note": "edited", "label": "x"},
              "model": {**effective["model"], "hub_id": "elsewhere/model"},
              "measure": {**effective["measure"], "busy_gpu": "refuse"}}
    assert config_hash(edited) == config_hash(effective)
    bumped = {**effective, "task": {**effective["task"], "version": 2}}
    assert config_hash(bumped) != config_hash(effective)
    assert config_hash({**effective, "seed": effective["seed"] + 1}) != config_hash(effective)


def test_every_task_and_model_key_in_conf_is_classified():
    """Every key any task, model or model-family yaml sets is classified as identity or not."""
    for group, folders in (("task", ["task"]), ("model", ["model", "model/family"])):
        for folder in folders:
            for path in sorted((CONF / folder).glob("*.yaml")):
                keys = set(OmegaConf.to_container(OmegaConf.load(path))) - {"defaults"}
                assert identity.unclassified(group, keys) == [], path


def test_an_unclassified_task_key_stops_planning_with_one_line():
    cfg = compose_config(["model=tiny-bert", "budget=smoke", "+task.new_knob=3"])
    with pytest.raises(Exception) as err:
        plan(cfg)
    assert "new_knob" in str(err.value) and "bench/record/identity.py" in str(err.value)
    assert "\n" not in str(err.value)


def test_docs_record_md_is_the_generated_one():
    assert record_docs.main(["--check"]) == 0, "run: python -m bench.record.docs --write"


def test_upgrade_renames_old_run_folders_so_resume_finds_them(tmp_path, capsys):
    """A results folder of schema-1 runs, upgraded: each folder carries its current run id and a current record."""
    import shutil

    for path in sorted(BASELINES.glob("cpu-smoke/*/record.json")):
        shutil.copytree(path.parent, tmp_path / path.parent.name)
    assert upgrade.main([str(tmp_path)]) == 0  # a dry run changes nothing
    assert "(nothing changed" in capsys.readouterr().out
    before = sorted(p.name for p in tmp_path.iterdir())
    assert upgrade.main([str(tmp_path), "--apply"]) == 0
    records, problems = load_records(tmp_path)
    assert problems == [] and len(records) == len(before)
    for rec in records:
        assert Path(rec["record_path"]).parent.name == rec["run_id"] != rec["migrated_from"]["run_id"]
        assert json.loads(Path(rec["record_path"]).read_text())["schema_version"] == SCHEMA_VERSION
    assert upgrade.main([str(tmp_path)]) == 0
    assert "every record" in capsys.readouterr().out
