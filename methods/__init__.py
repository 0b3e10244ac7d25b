"""Method registry: name -> the method (how it attaches; its facts from conf/method/<name>.yaml). The first use of
the registry (`REGISTRY`, `get_method`, `in_display_order`) imports every module in this package: a module registers
the methods written in Python (`@register`), and methods/peft_generic.py builds one method per yaml-only tuner. So a
new method is one yaml (a peft tuner or a LoRA initialisation), or one yaml plus one module here.
`python -m methods show <name>` says where a method is defined.

Importing the package itself imports none of them (nor peft): a command that stops early (a config error,
`--help`) or needs no method starts in a second, not in the several seconds peft and every tuner take to import.
"""
from __future__ import annotations

import importlib
import pkgutil
import warnings
from typing import TYPE_CHECKING, Any

# peft 0.21.2's PeftModel reads transformers 5's deprecated `is_gradient_checkpointing` each time a method attaches:
# a warning about peft's code that no run can act on (it goes once peft reads `is_activation_checkpointing`).
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

if TYPE_CHECKING:
    from methods.base import AttachContext, Method

_loaded = False


def _registry() -> dict[str, Method]:
    """The registry, with every module of the package imported (once)."""
    global _loaded
    from methods import base

    if not _loaded:
        for module in pkgutil.iter_modules(__path__):
            if not module.name.startswith("_"):  # not __main__ (the command line)
                importlib.import_module(f"{__name__}.{module.name}")
        _loaded = True
    return base.REGISTRY


def get_method(name: str) -> Method:
    """The registered method `name`; BenchError (one line, with the choices) for an unknown name."""
    from methods import base

    _registry()
    return base.get_method(name)


def in_display_order() -> list[str]:
    """Registered method names in the order tables and plots show them."""
    registry = _registry()
    return sorted(registry, key=lambda name: (registry[name].display_order, name))


def __getattr__(name: str) -> Any:
    if name == "REGISTRY":
        return _registry()
    if name in ("AttachContext", "Method"):
        from methods import base

        return getattr(base, name)
    raise AttributeError(f"module 'methods' has no attribute {name!r}")


__all__ = ["REGISTRY", "AttachContext", "Method", "get_method", "in_display_order"]
