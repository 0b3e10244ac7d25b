"""What a run measures besides its task metrics: memory per phase (memory.py), inference latency (latency.py),
forgetting probes (probes.py), training FLOPs and the device's utilisation, MFU and HFU (flops.py)."""
