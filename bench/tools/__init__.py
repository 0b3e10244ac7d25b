"""Tools no run needs: docs/methods.md's method table (method_table.py), the memory estimator (memory_estimate.py),
the speed and memory benchmark scripts (perf/) and the kit that runs the GPU figures on an offline GPU machine
(gpu_kit.py)."""
