"""Benchmark scripts, apart from the run's code path: `python -m bench.tools.perf.gpu`, `bench.tools.perf.memory`,
`bench.tools.perf.overhead`, `bench.tools.perf.hotswap`, `bench.tools.perf.serving` (adapters.py: the synthetic
adapters the last two load). They print figures; they are not tests."""
