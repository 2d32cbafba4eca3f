"""DP-SGD step time and peak memory against the plain LoRA step, side by side.

Each mode runs in its own fresh subprocess (so peak RSS is its own), on the same
model, batch and thread count; the table prints ratios to the plain step.  Modes:
  plain      non-private LoRA step (same per-record loss, no clipping/noise)
  hooks      fedtune's DP-SGD path (Opacus GradSampleHooks + DPOptimizer)
  functorch  the same with Opacus' functorch per-sample gradients forced
Usage: python benchmarks/dp_step.py [--sizes tiny,50m] [--steps 3] [--batch 16] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SIZES = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=176),
    "50m": dict(hidden_size=640, num_layers=10, num_heads=10, intermediate_size=1728),
}


def worker(size: str, mode: str, steps: int, batch: int, seq: int) -> dict:
    import torch
    from opacus.grad_sample import GradSampleHooks

    from fedtune.config import ModelConfig, TinyModelConfig
    from fedtune.data.encoding import Batch
    from fedtune.models import build_lora_model
    from fedtune.privacy.dpsgd import DPSGDParams, DPSGDTrainer
    from fedtune.tasks import get_task

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    cfg = ModelConfig(tiny=TinyModelConfig(**SIZES[size], max_position_embeddings=max(512, seq)))
    model, tok = build_lora_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tok), (batch, seq), generator=gen)
    b = Batch(ids, torch.ones_like(ids), torch.ones_like(ids))
    params = DPSGDParams(1.0, 1.0, 0.5, steps, 1e-3, "adam", private=(mode != "plain"))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with DPSGDTrainer(get_task(cfg.task), model, params, num_records=2 * batch, noise_seed=0) as trainer:
        if mode == "functorch":
            trainer._hooks.remove_hooks()
            trainer._hooks = GradSampleHooks(model, loss_reduction="mean", force_functorch=True)
        trainer.step(b)  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            trainer.step(b)
        seconds = (time.perf_counter() - start) / steps
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"size": size, "mode": mode, "params": n_params, "step_s": seconds,
            "peak_rss_mb": rss_after / 1024, "step_rss_mb": (rss_after - rss_before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="tiny,50m")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--worker", nargs=2)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.batch, args.seq)))
        return
    print(f"batch {args.batch} x {args.seq} tokens, LoRA r=8, {os.environ.get('BENCH_THREADS', '2')} threads")
    print(f"{'size':>6} {'params':>8} {'mode':>10} {'step s':>8} {'x plain':>8} {'peak MB':>8} {'x plain':>8}")
    for size in args.sizes.split(","):
        results = {}
        for mode in ("plain", "hooks", "functorch"):
            out = subprocess.run([sys.executable, __file__, "--worker", size, mode, "--steps", str(args.steps),
                                  "--batch", str(args.batch), "--seq", str(args.seq)],
                                 capture_output=True, text=True, check=True)
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        base = results["plain"]
        for mode, r in results.items():
            print(f"{size:>6} {r['params'] / 1e6:>7.1f}M {mode:>10} {r['step_s']:>8.3f} "
                  f"{r['step_s'] / base['step_s']:>8.2f} {r['peak_rss_mb']:>8.0f} "
                  f"{r['peak_rss_mb'] / base['peak_rss_mb']:>8.2f}")


if __name__ == "__main__":
    main()
