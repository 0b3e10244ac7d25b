"""Method registry: name -> how to attach it. Importing this package registers every method."""
from methods import (  # noqa: F401  (registration side effect)
    adalora,
    adapters,
    bitfit,
    dora,
    full,
    ia3,
    lora,
    prompt,
    qlora,
    rslora,
)
from methods.base import REGISTRY, AttachContext, Method, get_method

__all__ = ["REGISTRY", "AttachContext", "Method", "get_method"]
