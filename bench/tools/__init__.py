"""Tools no run needs: README's method table (method_table.py), the memory estimator (memory_estimate.py) and the
speed and memory benchmark scripts (perf/)."""
