"""Find a method by name: where it is defined, its facts, its defaults and where they come from.

    python -m methods list            # every registered method: label, Python class, yaml
    python -m methods show vera       # one method: its module and class, its yaml, facts, defaults and their sources

A method is its yaml (conf/method/<name>.yaml: defaults and `facts:`) plus the Python class that attaches it: a
class of its own for the methods written here, a shared class built from the yaml for the yaml-only tuners
(methods/peft_generic.py: `peft_config:`, `lora_init:` or `lora_variant:`), so `show` names both.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from methods import REGISTRY, Method, get_method, in_display_order
from methods.errors import BenchError
from methods.facts import FACTS_KEY, header, method_yaml, parents, relative, yaml_path

LOOP_SETTINGS = ("lr", "warmup_ratio", "weight_decay")  # what the shared loop reads; the rest is the method's own
_HIDDEN = ("name", "defaults", FACTS_KEY)  # not defaults: the name, the yaml's own defaults list, the facts
_BUILT_FROM = ("peft_config", "lora_init", "lora_variant")  # the yaml keys that pick a yaml-only method's behaviour


def defined_in(method: Method) -> str:
    """'methods/lora.py:21 Lora', plus the yaml key a shared class is built from (`peft_config: VeraConfig`)."""
    cls = type(method)
    where = f"{relative(Path(inspect.getsourcefile(cls)))}:{inspect.getsourcelines(cls)[1]} {cls.__qualname__}"
    raw = method_yaml(method.name)
    built = [f"{key}: {raw[key]}" for key in _BUILT_FROM if raw.get(key)]
    return where + (f", built from the yaml ({', '.join(built)})" if built else "")


def _scalar(value: Any) -> str:
    """A value as a yaml file writes it (true, null, [a, b], {a: 1}; interpolations such as ${model.lora_targets}
    as written)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_scalar(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, str) and (not value or value != value.strip() or value[0] in "{['\"" or ": " in value):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _lr(value: Any) -> str:
    """4e-4, not 0.0004: as the yamls and papers write learning rates."""
    try:
        mantissa, exponent = f"{float(value):e}".split("e")
    except (TypeError, ValueError):
        return _scalar(value)
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _entry(key: str, value: Any, indent: str = "  ") -> list[str]:
    """`key: value` lines, a mapping of settings (peft_args) one key per line below it."""
    if isinstance(value, dict) and value:
        return [f"{indent}{key}:"] + [line for k, v in value.items() for line in _entry(k, v, indent + "  ")]
    return [f"{indent}{key}: {_lr(value) if key == 'lr' else _scalar(value)}"]


def _owner(name: str, key: str) -> str | None:
    """The yaml a default of `name` comes from when it is not `name`'s own file (a parent in its defaults list)."""
    own = OmegaConf.to_container(OmegaConf.load(yaml_path(name)), resolve=False)
    if key in own:
        return None
    for parent in reversed(parents(name)):
        if key in method_yaml(parent):
            return _owner(parent, key) or f"conf/method/{parent}.yaml"
    return None


def show(name: str) -> str:
    """The text `python -m methods show <name>` prints."""
    method = get_method(name)
    raw = method_yaml(name)
    lines = [f"{name}: {method.display_label}",
             f"  python:  {defined_in(method)}",
             f"  yaml:    conf/method/{name}.yaml" + "".join(f" (starts from conf/method/{p}.yaml)"
                                                          for p in parents(name)),
             f"  saves:   {method.saved_format}",
             "facts:"]
    lines += [line for key, value in method.facts.model_dump().items() for line in _entry(key, value)]
    lines.append("defaults (" + (f"`rank` means: {method.rank_meaning}" if method.uses_rank else
                                 "`rank` is ignored and left out of the run's identity") + "):")
    keys = [k for k in LOOP_SETTINGS if k in raw] + [k for k in raw if k not in LOOP_SETTINGS and k not in _HIDDEN]
    for key in keys:
        entry = _entry(key, raw[key])
        owner = _owner(name, key)
        if owner:
            entry[0] += f"    (from {owner})"
        lines += entry
    lines += ["sources:", f"  defaults_source: {method.defaults_source}", f"  lr_source: {method.lr_source}"]
    for source in [name, *parents(name)]:
        comments = header(source)
        if comments:
            lines.append(f"  conf/method/{source}.yaml says:")
            lines += [f"    {line}" for line in comments]
    return "\n".join(lines)


def listing() -> str:
    """The text `python -m methods list` prints: one line per method, in display order."""
    rows = [(name, REGISTRY[name].display_label, defined_in(REGISTRY[name]).split(",")[0],
             f"conf/method/{name}.yaml") for name in in_display_order()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{n:<{widths[0]}}  {label:<{widths[1]}}  {cls:<{widths[2]}}  {yaml}"
                     for n, label, cls, yaml in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m methods", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every registered method: label, Python class, yaml")
    one = sub.add_parser("show", help="one method: where it is defined, its facts, defaults and their sources")
    one.add_argument("name", help="a registry name (python -m methods list)")
    args = parser.parse_args(argv)
    try:
        print(listing() if args.command == "list" else show(args.name))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
