"""A method's facts and defaults, read from its yaml: `conf/method/<name>.yaml` is the one home of both, as a task
yaml is in lm-evaluation-harness.

The yaml holds the method's defaults (the loop's `lr`, `warmup_ratio`, `weight_decay` and the method's own knobs,
each with its source in the header comment) and, under `facts:`, what the suite says about the method: tables,
plots, weight analysis, the tests and `python -m methods show <name>` read them from the registry
(`method.merges`, `method.display_label`, ...). Facts are descriptions, not settings: `Method.effective_config`
leaves them out, so they are never part of a run's identity (the config hash), and editing one re-runs nothing.

One typed schema checks them (`MethodFacts`; a yaml-only peft tuner's `TunerFacts` adds how `rank` maps onto its
peft arguments): a typo or a wrong type stops the import of `methods` with one line naming the yaml file and key.

A yaml may start from others (`defaults: [lora, _self_]`, as LoRA's initialisations do); `method_yaml` merges them
as Hydra composes the method group, so such a yaml states only the facts and defaults that differ.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from methods.errors import BenchError

REPO_ROOT = Path(__file__).resolve().parent.parent
METHOD_CONF = REPO_ROOT / "conf" / "method"
FACTS_KEY = "facts"  # the yaml key of the facts; left out of every effective config
EVERY_FAMILY = "*"  # `cannot_apply` key for a method that refuses every model (it needs what no run of the suite has)


class MethodFacts(BaseModel):
    """What every method's yaml states under `facts:` (strict types: `merges: yes` or `display_order: "2"` is an
    error, not a guess)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    label: str = Field(min_length=1)  # display name in tables and plots ("LoRA", "Full FT")
    summary: str = Field(min_length=1)  # README's method table: what trains besides the task head
    defaults_source: str = Field(min_length=1)  # how the defaults were set: paper, peft example, our lr sweep, guess
    lr_source: str = Field(min_length=1)  # where the default learning rate comes from
    rank_meaning: str | None  # what the `rank` knob means; null: ignored, and left out of the run's identity
    merges: bool  # can be folded into the base weights for zero-overhead inference (the method implements `merged`)
    identity_at_init: bool  # the attached model computes what the base model does, before training
    display_order: int = 100  # position in tables and plots (then by name)
    rank_format: str = "r={}"  # how a table labels the rank ("{}" is the rank)
    # True: the pre-trained parameters (W or biases) differ after training (after merging where it merges);
    # False: the method only adds modules or inputs, and `unchanged_reason` says how.
    changes_base_weights: bool = True
    unchanged_reason: str = ""
    edits_in_place: bool = False  # trains pre-trained parameters in place: nothing added, nothing to merge
    trains_all_weights: bool = False  # every weight trains (no "attached nothing" check)
    # model family -> the one line saying why the run stops at plan time; "*": every model family (the method needs
    # inputs no run of the suite has, such as several trained adapters)
    cannot_apply: dict[str, str] = {}

    @model_validator(mode="after")
    def _consistent(self) -> MethodFacts:
        if "{}" not in self.rank_format:
            raise ValueError("rank_format: needs '{}' where the rank goes")
        if not self.changes_base_weights and not self.unchanged_reason:
            raise ValueError("unchanged_reason: needed when changes_base_weights is false (how W stays unchanged)")
        return self


class TunerFacts(MethodFacts):
    """The facts of a yaml-only peft tuner (methods/peft_generic.py): also how `rank` maps onto its peft arguments,
    and whether it puts virtual tokens in front of the input."""

    rank_fills: dict[str, float] = {}  # peft argument -> multiple of `rank` it is set to ({r: 1, alpha: 2})
    # P-tuning: `rank` virtual tokens in front of the input (the head reads the real first token, as for prompt tuning)
    prepends_tokens: bool = False

    @model_validator(mode="after")
    def _rank_goes_somewhere(self) -> TunerFacts:
        if bool(self.rank_meaning) != bool(self.rank_fills):
            raise ValueError("rank_meaning and rank_fills go together (both set: `rank` fills those peft arguments; "
                             "rank_meaning null and no rank_fills: `rank` is ignored)")
        return self


def yaml_path(name: str) -> Path:
    return METHOD_CONF / f"{name}.yaml"


def relative(path: Path) -> str:
    """`path` as written from the repository root (conf/method/lora.yaml)."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _load(name: str) -> dict[str, Any]:
    path = yaml_path(name)
    if not path.is_file():
        raise BenchError(f"{relative(path)}: no such file; every registered method has its yaml in conf/method/")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:  # noqa: BLE001 - yaml's parser and OmegaConf raise several types: one line for each
        text = " ".join(str(exc).split())
        raise BenchError(f"{relative(path)}: not valid yaml: {text[:200]}") from None
    if not isinstance(raw, dict):
        raise BenchError(f"{relative(path)}: not a mapping of settings")
    return raw


def _defaults(name: str, raw: dict[str, Any]) -> list[str]:
    defaults = raw.get("defaults") or []
    for entry in defaults:
        if not isinstance(entry, str):
            raise BenchError(f"conf/method/{name}.yaml: defaults entry {entry!r}: a method yaml may start from other "
                             "method yamls by name only (defaults: [lora, _self_])")
    return list(defaults)


def parents(name: str) -> list[str]:
    """The method yamls `conf/method/<name>.yaml` starts from (its `defaults:` list without `_self_`)."""
    return [entry for entry in _defaults(name, _load(name)) if entry != "_self_"]


def method_yaml(name: str) -> dict[str, Any]:
    """conf/method/<name>.yaml as Hydra composes it into `cfg.method`, interpolations unresolved
    (`${model.lora_targets}`): the yamls of its defaults list merged in order, its own keys where `_self_` stands
    (last when it is not listed)."""
    raw = _load(name)
    own = {k: v for k, v in raw.items() if k != "defaults"}
    order = _defaults(name, raw)
    if "_self_" not in order:
        order.append("_self_")
    merged = OmegaConf.create()
    for entry in order:
        merged = OmegaConf.merge(merged, own if entry == "_self_" else method_yaml(entry))
    return OmegaConf.to_container(merged, resolve=False)


def header(name: str) -> list[str]:
    """The comment lines at the top of conf/method/<name>.yaml, without '# ': where each default comes from."""
    lines = []
    for line in yaml_path(name).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" "))
    return lines


def validate_facts(name: str, facts: Any, schema: type[MethodFacts] = MethodFacts) -> MethodFacts:
    """`facts` (the yaml's `facts:` block) checked against `schema`; BenchError with one line naming the yaml file
    and each bad key."""
    where = f"conf/method/{name}.yaml"
    if not isinstance(facts, dict):
        raise BenchError(f"{where}: no `facts:` block (every method states its facts there; see methods/facts.py)")
    try:
        return schema.model_validate(facts)
    except ValidationError as exc:
        raise BenchError(f"{where}: " + "; ".join(_problem(e, schema) for e in exc.errors())) from None


def _problem(error: dict, schema: type[MethodFacts]) -> str:
    key = ".".join(str(part) for part in (FACTS_KEY, *error["loc"]))
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown fact (known: {', '.join(schema.model_fields)})"
    if error["type"] == "missing":
        return f"{key}: missing (every method states it)"
    if not error["loc"]:  # a check across keys (model_validator): its message names the keys
        return f"{FACTS_KEY}.{error['msg'].removeprefix('Value error, ')}"
    return f"{key}: {error['msg'].removeprefix('Value error, ')} (got {error['input']!r})"


def read_facts(name: str, schema: type[MethodFacts] = MethodFacts) -> MethodFacts:
    """The checked facts of conf/method/<name>.yaml (merged with the yamls it starts from)."""
    return validate_facts(name, method_yaml(name).get(FACTS_KEY), schema)


__all__ = ["EVERY_FAMILY", "FACTS_KEY", "METHOD_CONF", "MethodFacts", "TunerFacts", "header", "method_yaml", "parents",
           "read_facts", "relative", "validate_facts", "yaml_path"]
