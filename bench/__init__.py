"""peft-bench runner: one run = plan -> the recipe -> record (see docs/design.md)."""
from methods.errors import BenchError

__all__ = ["BenchError"]
