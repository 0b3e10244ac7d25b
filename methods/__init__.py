"""Method registry: name -> how to attach it. Importing this package registers every method."""
from methods import full, lora, qlora  # noqa: F401  (registration side effect)
from methods.base import REGISTRY, AttachContext, Method, get_method

__all__ = ["REGISTRY", "AttachContext", "Method", "get_method"]
