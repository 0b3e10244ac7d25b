"""Hot-swap: several saved peft adapters on one base model, switched by name (peft's multi-adapter API:
`PeftModel.from_pretrained` for the first, `load_adapter` for the rest, `set_adapter` to switch).

Each adapter keeps its own copy of the task head (peft's modules_to_save), and switching swaps that too.
Only for methods saved in peft format (lora, rslora, dora, adalora, ia3, prompt/prefix tuning), all of
one peft type; bitfit, full and the bottleneck adapters save plain tensors and cannot be hot-swapped.

    model = load_adapters(base_model, {"sst2": "runs/a/weights", "rte": "runs/b/weights"})
    switch(model, "rte")
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from peft import PeftModel
from torch import nn

from methods.errors import BenchError


def load_adapters(base_model: nn.Module, adapter_dirs: Mapping[str, str | Path]) -> PeftModel:
    """Load every adapter folder onto `base_model` (modified in place) under its name; the first is active."""
    if not adapter_dirs:
        raise BenchError("hot-swap: no adapter folders given")
    for name, folder in adapter_dirs.items():
        if not (Path(folder) / "adapter_config.json").is_file():
            raise BenchError(f"hot-swap: {folder} (adapter '{name}') is not a peft adapter folder (no "
                             "adapter_config.json); only peft-format methods can be hot-swapped")
    items = list(adapter_dirs.items())
    first_name, first_dir = items[0]
    model = PeftModel.from_pretrained(base_model, str(first_dir), adapter_name=first_name)
    for name, folder in items[1:]:
        model.load_adapter(str(folder), adapter_name=name)
    model.eval()
    return model


def switch(model: PeftModel, name: str) -> None:
    """Make adapter `name` (and its task head) the active one."""
    if name not in model.peft_config:
        raise BenchError(f"hot-swap: no adapter '{name}'; loaded: {', '.join(model.peft_config)}")
    model.set_adapter(name)
