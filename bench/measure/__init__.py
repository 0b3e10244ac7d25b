"""What a run measures besides its task metrics: memory per phase (memory.py), inference latency (latency.py),
forgetting probes (probes.py)."""
