"""Task loading from the offline copies: row counts match their READMEs, labels are what they should be."""
from __future__ import annotations

import pytest

from bench import BenchError
from bench.data.tasks import TASKS, get_task, load_task
from tests.conftest import GLUE_DIR, GSM_SYMBOLIC_DIR, needs_glue, needs_gsm

OFFLINE = [name for name, task in TASKS.items() if task.offline_rows and task.data_env == "GLUE_DIR"]


@needs_glue
@pytest.mark.parametrize("name", OFFLINE)
def test_offline_task_rows_and_labels(name):
    task = get_task(name)
    train, dev, source = load_task(task, GLUE_DIR)
    assert source.startswith("glue_dir:")
    assert (len(train), len(dev)) == (task.offline_rows["train"], task.offline_rows["dev"])
    for df in (train, dev):
        assert df["text_a"].str.len().gt(0).all()
        if task.is_regression:
            assert df["label"].between(0.0, 5.0).all()
        else:
            assert set(df["label"].unique()) == set(range(task.num_labels))
    has_pair = task.text_fields[1:] != ()
    assert train["text_b"].notna().all() if has_pair else train["text_b"].isna().all()


@needs_gsm
def test_the_offline_math_problems_have_their_rows_and_a_final_number_each():
    task = get_task("gsm_symbolic")
    train, dev, source = load_task(task, GSM_SYMBOLIC_DIR)
    assert source.startswith("gsm_symbolic_dir:")
    assert (len(train), len(dev)) == (task.offline_rows["train"], task.offline_rows["dev"])
    for df in (train, dev):
        assert df["text_a"].str.len().gt(0).all() and df["answer"].notna().all()


def test_missing_data_names_both_sources(tmp_path):
    with pytest.raises(BenchError) as err:
        load_task(get_task("rte"), str(tmp_path))
    msg = str(err.value)
    assert "GLUE_DIR" in msg and "nyu-mll/glue" in msg and "\n" not in msg


def test_unknown_task_lists_choices():
    with pytest.raises(BenchError, match="sst2, cola"):
        get_task("imagenet")


def test_a_task_yaml_without_its_facts_is_one_clear_error():
    from bench.data.tasks import task_from_config

    with pytest.raises(BenchError, match=r"conf/task/toy.yaml lacks version, folder, text_fields"):
        task_from_config({"name": "toy", "metrics": ["accuracy"]})


def test_every_task_yaml_builds_its_task_with_display_facts():
    for name, task in TASKS.items():
        assert task.name == name and task.label and task.main_metric == task.metrics[0]
