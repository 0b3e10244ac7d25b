"""Hot-swap latency benchmark (a script, not a test): several adapters on one base model, switched by name.

    python -m bench.tools.perf.hotswap                                  # 3 LoRA adapters on tiny-bert
    python -m bench.tools.perf.hotswap --model minilm --method dora --rank 16
    python -m bench.tools.perf.hotswap --model minilm --adapter-dir runs/A/weights --adapter-dir runs/B/weights

Without --adapter-dir it makes --n-adapters adapters of --method (random non-zero weights: latency does
not depend on the values; bench/tools/perf/adapters.py) and saves them to a temporary folder. It prints the
time to load each adapter, the swap latency (`set_adapter`, p50/p95 over --iters swaps, device-synchronised),
and one forward pass with and without a swap before it. Many adapters at serving time (mixed-adapter batches,
throughput and memory vs the number of adapters): `python -m bench.tools.perf.serving`.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.config import compose_config
from bench.measure.latency import latency_batch
from bench.model import load_model
from bench.model.device import sync
from bench.tools.perf.adapters import make_adapters
from methods.hotswap import load_adapters, switch


def _pct(times_ms: list[float]) -> str:
    arr = np.asarray(times_ms)
    return f"p50 {np.percentile(arr, 50):8.3f} ms   p95 {np.percentile(arr, 95):8.3f} ms   (n={len(arr)})"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-bert", help="a conf/model name (default tiny-bert)")
    ap.add_argument("--method", default="lora", help="a peft-format method (default lora)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--n-adapters", type=int, default=3)
    ap.add_argument("--adapter-dir", action="append", default=[], help="use saved adapters instead (repeat)")
    ap.add_argument("--num-labels", type=int, default=2)
    ap.add_argument("--iters", type=int, default=200, help="timed swaps")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)

    cfg = compose_config([f"model={args.model}", f"method={args.method}", f"rank={args.rank}"])
    with tempfile.TemporaryDirectory() as tmp:
        if args.adapter_dir:
            dirs = {f"adapter{i}": Path(d) for i, d in enumerate(args.adapter_dir)}
            source = "given folders"
        else:
            dirs = make_adapters(cfg, args.n_adapters, Path(tmp), args.num_labels)
            source = f"{args.n_adapters} x {args.method} r={args.rank}, random weights"
        torch.manual_seed(0)
        base, _ = load_model(cfg.model, args.num_labels)
        base.to(device)
        names = list(dirs)
        t0 = time.perf_counter()
        model = load_adapters(base, {names[0]: dirs[names[0]]})
        load_first_ms = 1000 * (time.perf_counter() - t0)
        load_ms = []
        for name in names[1:]:
            t0 = time.perf_counter()
            model.load_adapter(str(dirs[name]), adapter_name=name)
            load_ms.append(1000 * (time.perf_counter() - t0))
        model.to(device).eval()
        if len(names) < 2:
            raise SystemExit("need at least 2 adapters to swap")

        batch = latency_batch(int(base.config.vocab_size), args.batch_size, args.seq_len, device)
        swap_ms, fwd_ms, swap_fwd_ms = [], [], []
        with torch.inference_mode():
            for _ in range(5):  # warm-up
                model(**batch)
            for it in range(args.iters):
                target = names[(it + 1) % len(names)]
                sync(device)
                t0 = time.perf_counter()
                switch(model, target)
                sync(device)
                t1 = time.perf_counter()
                swap_ms.append(1000 * (t1 - t0))
            for it in range(min(args.iters, 50)):
                sync(device)
                t0 = time.perf_counter()
                model(**batch)
                sync(device)
                fwd_ms.append(1000 * (time.perf_counter() - t0))
                target = names[(it + 1) % len(names)]
                sync(device)
                t0 = time.perf_counter()
                switch(model, target)
                model(**batch)
                sync(device)
                swap_fwd_ms.append(1000 * (time.perf_counter() - t0))

    rows = [("load first adapter (from_pretrained)", f"{load_first_ms:8.1f} ms")]
    if load_ms:
        rows.append(("load each further adapter (mean)", f"{np.mean(load_ms):8.1f} ms"))
    rows += [("swap (set_adapter)", _pct(swap_ms)),
             (f"forward, batch {args.batch_size}x{args.seq_len}", _pct(fwd_ms)),
             ("swap + forward", _pct(swap_fwd_ms))]
    print(f"hot-swap on {args.model} ({device}), adapters: {source}")
    for label, value in rows:
        print(f"  {label:<38}{value}")

if __name__ == "__main__":
    main()
