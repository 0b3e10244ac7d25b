"""Method registry: name -> how to attach it. Importing this package imports every module in it, and each
module registers its methods (`@register`), so a new method is one module here plus its conf/method yaml."""
import importlib
import pkgutil

from methods.base import REGISTRY, AttachContext, Method, get_method

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def in_display_order() -> list[str]:
    """Registered method names in the order tables and plots show them."""
    return sorted(REGISTRY, key=lambda name: (REGISTRY[name].display_order, name))


__all__ = ["REGISTRY", "AttachContext", "Method", "get_method", "in_display_order"]
