"""Hot-swap: several saved peft adapters on one base model, switched by name (peft's multi-adapter API:
`PeftModel.from_pretrained` for the first, `load_adapter` for the rest, `set_adapter` to switch).

Each adapter keeps its own copy of the task head (peft's modules_to_save), and switching swaps that too.
Only for methods saved in peft format (lora, rslora, dora, adalora, ia3, prompt/prefix tuning), all of
one peft type; bitfit, full and the bottleneck adapters save plain tensors and cannot be hot-swapped.

Mixed-adapter batches (each row through its own adapter in one call: peft's `adapter_names=` argument to forward
and generate) work for fewer: the tuners that route rows to adapters (LoRA and its variants and initialisations,
RoAd, GLoRA), not DoRA. The others either refuse the argument (AdaLoRA, DoRA) or ignore it and run every row
through the active adapter (IA3, LoHa, VeRA, prompt methods, ...); `check_mixed_batches` refuses them in one line.

    model = load_adapters(base_model, {"sst2": "runs/a/weights", "rte": "runs/b/weights"})
    switch(model, "rte")
    check_mixed_batches(model)
    model(**batch, adapter_names=["sst2", "rte", "sst2"])   # one adapter per row
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from peft import PeftModel, PeftType
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


# The peft types whose layers implement `_mixed_batch_forward` and whose tuner injects `adapter_names` (peft 0.21).
MIXED_BATCH_TYPES = (PeftType.LORA, PeftType.ROAD, PeftType.GLORA)


def mixed_batch_problem(model: PeftModel) -> str | None:
    """Why `model`'s adapters cannot serve mixed-adapter batches (`adapter_names=`), or None when they can."""
    for config in model.peft_config.values():
        if config.peft_type not in MIXED_BATCH_TYPES:
            return (f"{config.peft_type.value} adapters: peft routes the rows of a mixed-adapter batch "
                    f"(adapter_names=) only for {', '.join(t.value for t in MIXED_BATCH_TYPES)} adapters without DoRA; "
                    "for the others it refuses adapter_names= or ignores it and runs every row through the active "
                    "adapter")
        if getattr(config, "use_dora", False):
            return "DoRA adapters: peft refuses adapter_names= (mixed-adapter batches) for DoRA"
    return None


def check_mixed_batches(model: PeftModel) -> None:
    """BenchError (one line) unless every adapter of `model` can serve mixed-adapter batches."""
    problem = mixed_batch_problem(model)
    if problem:
        raise BenchError(f"mixed-adapter batches: {problem}")
