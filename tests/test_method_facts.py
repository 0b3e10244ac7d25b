"""Every method's facts live in its yaml (`facts:` in conf/method/<name>.yaml, methods/facts.py) and check against one
schema; they never reach a run's identity; a bad fact is one line naming the file and key; a method that says it
merges can; `python -m methods` finds every method by name; `attach` builds from the effective config it is given."""
from __future__ import annotations

import pytest
from torch import nn

from bench import BenchError
from bench.plan import plan
from methods import REGISTRY, Method, in_display_order
from methods.__main__ import main
from methods.base import register
from methods.facts import MethodFacts, TunerFacts, method_yaml, read_facts
from tests.conftest import REPO
from tests.method_helpers import build

_FACTS = {"label": "X", "summary": "s", "defaults_source": "guess", "lr_source": "guess", "rank_meaning": "r",
          "merges": False, "identity_at_init": True}
_GOOD_YAML = """name: x
facts:
  label: X
  summary: s
  defaults_source: guess
  lr_source: guess
  rank_meaning: r
  merges: false
  identity_at_init: true
"""


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_method_has_yaml_facts_that_validate(name):
    method = REGISTRY[name]
    assert (REPO / "conf" / "method" / f"{name}.yaml").is_file()
    assert isinstance(method.facts, method.facts_schema)
    assert read_facts(name, method.facts_schema) == method.facts  # the yaml is the one place they come from
    assert method.display_label == method.facts.label and method.uses_rank == (method.facts.rank_meaning is not None)


@pytest.mark.parametrize("name", sorted(n for n in REGISTRY if REGISTRY[n].merges))
def test_a_method_that_says_it_merges_implements_merged(name):
    assert type(REGISTRY[name]).merged is not Method.merged, f"{name}: facts.merges is true, and it has no `merged`"


def test_python_methods_declare_no_facts_and_keep_them_out_of_effective_config():
    with pytest.raises(TypeError, match=r"declares facts \['merges'\] in Python; they belong in its yaml"):
        type("Bad", (Method,), {"name": "bad", "merges": True})
    with pytest.raises(TypeError, match="override `derive` instead"):
        type("Bad", (Method,), {"name": "bad", "effective_config": lambda self, cfg, rank: dict(cfg)})


@pytest.mark.parametrize("name", ["lora", "full", "corda", "vera"])
def test_facts_are_never_part_of_a_runs_identity(make_cfg, name):
    a = plan(make_cfg(f"method={name}", "rank=4"))
    b = plan(make_cfg(f"method={name}", "rank=4", "method.facts.label=Other", "method.facts.merges=false"))
    assert "facts" in a.cfg.method and "facts" not in a.effective["method"]
    assert a.config_hash == b.config_hash


def _write(tmp_path, monkeypatch, text: str) -> None:
    (tmp_path / "x.yaml").write_text(text)
    monkeypatch.setattr("methods.facts.METHOD_CONF", tmp_path)


@pytest.mark.parametrize(("facts", "message"), [
    ("lable: X", r"conf/method/x\.yaml: facts\.lable: unknown fact \(known: label, summary, "),
    ("merges: maybe", r"conf/method/x\.yaml: facts\.merges: Input should be a valid boolean \(got 'maybe'\)"),
    ("display_order: '2'", r"conf/method/x\.yaml: facts\.display_order: Input should be a valid integer"),
    ("rank_format: 'r='", r"conf/method/x\.yaml: facts\.rank_format: needs '\{\}' where the rank goes"),
    ("changes_base_weights: false", r"facts\.unchanged_reason: needed when changes_base_weights is false"),
])
def test_a_bad_fact_is_one_line_naming_the_yaml_and_key(tmp_path, monkeypatch, facts, message):
    _write(tmp_path, monkeypatch, _GOOD_YAML)
    assert read_facts("x").label == "X"
    key = facts.split(":")[0]
    good = "".join(line for line in _GOOD_YAML.splitlines(keepends=True) if not line.startswith(f"  {key}:"))
    _write(tmp_path, monkeypatch, f"{good}  {facts}\nlr: 1e-3\n")
    with pytest.raises(BenchError, match=message) as err:
        read_facts("x")
    assert "\n" not in str(err.value)


def test_a_missing_fact_a_missing_block_and_broken_yaml_are_one_line(tmp_path, monkeypatch):
    _write(tmp_path, monkeypatch, "name: x\nfacts:\n  label: X\nlr: 1e-3\n")
    with pytest.raises(BenchError, match=r"conf/method/x\.yaml: facts\.summary: missing .*; facts\.merges: missing"):
        read_facts("x")
    _write(tmp_path, monkeypatch, "name: x\nlr: 1e-3\n")
    with pytest.raises(BenchError, match=r"conf/method/x\.yaml: no `facts:` block"):
        read_facts("x")
    _write(tmp_path, monkeypatch, _GOOD_YAML + "  merges: true\n")
    with pytest.raises(BenchError, match=r"x\.yaml: not valid yaml: .*found duplicate key merges") as err:
        read_facts("x")
    assert "\n" not in str(err.value)


def test_a_tuner_states_where_rank_goes():
    with pytest.raises(ValueError, match="rank_meaning and rank_fills go together"):
        TunerFacts.model_validate(_FACTS)
    assert TunerFacts.model_validate({**_FACTS, "rank_fills": {"r": 1}}).rank_fills == {"r": 1.0}
    with pytest.raises(ValueError, match="rank_fills"):
        MethodFacts.model_validate({**_FACTS, "rank_fills": {"r": 1}})  # only a yaml-only tuner maps rank itself


def test_a_yaml_that_starts_from_another_inherits_its_facts_and_defaults():
    corda, lora = method_yaml("corda"), method_yaml("lora")
    assert corda["lr"] == lora["lr"] and corda["facts"]["merges"] is True and corda["facts"]["label"] == "CorDA"
    assert REGISTRY["lora_fixed_alpha"].label == "LoRA" and REGISTRY["lora_fixed_alpha"].summary.startswith("as lora")


def test_a_registered_class_reads_its_facts_from_its_yaml(monkeypatch):
    monkeypatch.setattr("methods.base.REGISTRY", {})
    with pytest.raises(BenchError, match=r"conf/method/no_such_method\.yaml: no such file"):
        register(type("NoYaml", (Method,), {"name": "no_such_method"}))


# python -m methods


def test_show_says_where_a_yaml_only_method_is_defined_its_facts_defaults_and_sources(capsys):
    assert main(["show", "vera"]) == 0
    out = capsys.readouterr().out
    assert "methods/peft_generic.py:" in out and "GenericPeftMethod" in out and "peft_config: VeraConfig" in out
    assert "conf/method/vera.yaml" in out
    assert "  label: VeRA" in out and "  merges: true" in out and "  rank_meaning: null" in out
    assert "  lr: 4e-3" in out and "  warmup_ratio: 0.06" in out and "  weight_decay: 0.0" in out
    assert "    r: 256" in out and "    target_modules: ${model.lora_targets}" in out  # the yaml as written
    assert "defaults_source: paper" in out and "lr_source: VeRA paper, RoBERTa-base SST-2" in out
    assert "VeRA (Kopiczko et al. 2024" in out  # the header's sources


def test_show_names_a_python_method_s_module_and_class_and_inherited_defaults(capsys):
    assert main(["show", "lora"]) == 0
    out = capsys.readouterr().out
    assert "methods/lora.py:" in out and " Lora\n" in out and "conf/method/lora.yaml" in out
    assert "  alpha_over_rank: 2" in out and "`rank` means: r" in out
    assert main(["show", "pissa"]) == 0
    out = capsys.readouterr().out
    assert "LoraInit, built from the yaml (lora_init: pissa)" in out
    assert "  alpha_over_rank: 1\n" in out and "  dropout: 0.1    (from conf/method/lora.yaml)" in out


def test_list_names_every_method_once_in_display_order(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == in_display_order()


def test_an_unknown_method_is_one_line_and_exit_2(capsys):
    assert main(["show", "x"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: unknown method 'x'; choose one of: adalora, ")
    assert captured.err.count("\n") == 1


# attach builds from the effective config it is given


def test_attach_builds_from_the_effective_config_not_the_composed_one(make_cfg):
    cfg, method, base, ctx, eff = build(make_cfg, "lora", rank=4)
    assert eff == plan(cfg).effective["method"] and eff["r"] == 4
    model = method.attach(base, {**eff, "r": 3, "lora_alpha": 6.0}, ctx)  # ctx.rank is still 4
    a = [p for n, p in model.named_parameters() if ".lora_A." in n]
    assert a and all(p.shape[0] == 3 for p in a)
    assert model.peft_config["default"].lora_alpha == 6.0


def test_the_runner_attaches_with_the_hashed_method_config(make_cfg, monkeypatch):
    from bench import recipe

    p = plan(make_cfg("method=houlsby", "rank=4"))
    seen = []

    def attach(model: nn.Module, eff: dict, ctx) -> nn.Module:
        seen.append(eff)
        return type(p.method).attach(p.method, model, eff, ctx)

    monkeypatch.setattr(p.method, "attach", attach)
    recipe.attach(p, recipe.build_model(p)[0], 4)
    assert seen == [p.effective["method"]] and isinstance(seen[0], dict) and seen[0]["bottleneck"] == 4

