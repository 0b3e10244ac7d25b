"""Method registry: name -> the method (how it attaches; its facts from conf/method/<name>.yaml). Importing this
package imports every module in it: a module registers the methods written in Python (`@register`), and
methods/peft_generic.py builds one method per yaml-only tuner. So a new method is one yaml (a peft tuner or a LoRA
initialisation), or one yaml plus one module here. `python -m methods show <name>` says where a method is defined."""
import importlib
import pkgutil

from methods.base import REGISTRY, AttachContext, Method, get_method

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):  # not __main__ (the command line)
        importlib.import_module(f"{__name__}.{_module.name}")


def in_display_order() -> list[str]:
    """Registered method names in the order tables and plots show them."""
    return sorted(REGISTRY, key=lambda name: (REGISTRY[name].display_order, name))


__all__ = ["REGISTRY", "AttachContext", "Method", "get_method", "in_display_order"]
