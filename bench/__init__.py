"""peft-bench runner: one run = plan -> run the steps -> record (see README, "Architecture")."""
from methods.errors import BenchError

__all__ = ["BenchError"]
