"""The shared training loop (bench/loop/train.py) and evaluation (bench/loop/evaluate.py)."""
