"""Benchmark scripts, apart from the run's code path: `python -m bench.perf.gpu`, `bench.perf.memory`,
`bench.perf.overhead`, `bench.perf.hotswap`. They print figures; they are not tests."""
