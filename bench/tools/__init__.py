"""Tools no run needs: docs/methods.md's method table (method_table.py), the memory estimator (memory_estimate.py)
and the speed and memory benchmark scripts (perf/)."""
