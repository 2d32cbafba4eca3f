"""The GPU checks of "Real pretrained models, end to end", prepared as one script for a lent device.

1. DP-SGD step time over the plain step with a bfloat16 base, batch 16 x 256 tokens, at
   about 350M and 1B parameters (Llama shapes built from a config with random weights:
   the step's time does not depend on the values), with and without gradient
   checkpointing, and with a 4-bit NF4 base (QLoRA, model.quantization=4bit); tokens/s and
   peak CUDA memory of each.  The goal: DP <= 1.1x plain at 1B.
   The repeats interleave (plain, DP, plain, DP, ...) so that drift hits both.
2. A 3-site simulation that trains on the GPU (federation.gpus_per_site=0.3, bfloat16
   base), started as a user starts it (`fedtune simulate`), its exit status and rounds.
Usage: python benchmarks/gpu_check.py [--sizes 350m,1b] [--repeats 5] [--out DIR] [--skip-simulation]
       python benchmarks/gpu_check.py --device cpu --sizes tiny --skip-simulation   (a smoke run of the script)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# (hidden, layers, heads, intermediate): ~0.4B and ~1.0B parameters in their transformer blocks.
SHAPES = {"tiny": (64, 2, 2, 128), "350m": (1024, 24, 16, 4096), "1b": (2048, 20, 16, 5632)}
# The base's memory form in each row: bfloat16, bfloat16 + gradient checkpointing, NF4 (QLoRA).
VARIANTS = ("bf16", "checkpointing", "4bit")


def build(shape: str, device: str, variant: str) -> Any:
    from fedtune.config import ModelConfig
    from fedtune.models import build_fingerprinted_model

    hidden, layers, heads, intermediate = SHAPES[shape]
    cfg = ModelConfig(dtype="bfloat16", gradient_checkpointing=variant == "checkpointing",
                      quantization="4bit" if variant == "4bit" else None)
    cfg.tiny.hidden_size, cfg.tiny.num_layers, cfg.tiny.num_heads = hidden, layers, heads
    cfg.tiny.intermediate_size, cfg.tiny.max_position_embeddings = intermediate, 512
    built = build_fingerprinted_model(cfg)
    built.model.to(device)
    return built


def fixed_batch(built: Any, batch: int, length: int, device: str) -> Any:
    import random

    from fedtune.data.records import Record
    from fedtune.tasks import get_task

    task = get_task("causal_lm")
    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdefghij klmnopqrstuvwxyz.,") for _ in range(length * 2)) for _ in range(batch)]
    examples = task.encode_all([Record("", t) for t in texts], built.tokenizer, length)
    return task.collate(examples, built.tokenizer.pad_token_id).to(device)


def timed_step(model: Any, batch: Any, private: bool, device: str) -> float:
    import torch

    from fedtune.privacy.dpsgd import DPSGDParams, DPSGDTrainer
    from fedtune.tasks import get_task

    task = get_task("causal_lm")
    d = task.training_defaults
    params = DPSGDParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0, steps=1,
                         learning_rate=d.learning_rate, optimizer=d.optimizer, private=private)
    with DPSGDTrainer(task, model, params, num_records=len(batch), noise_seed=0) as trainer:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.step(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def peak_memory_gb(model: Any, batch: Any, private: bool, device: str) -> float:
    import torch

    if device != "cuda":
        return float("nan")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    timed_step(model, batch, private, device)
    return torch.cuda.max_memory_allocated() / 2**30


def measure(shape: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    built = build(shape, args.device, variant)
    batch = fixed_batch(built, args.batch, args.length, args.device)
    for private in (False, True):
        timed_step(built.model, batch, private, args.device)  # warm-up: kernels, allocator
    plain, dp = [], []
    for _ in range(args.repeats):
        plain.append(timed_step(built.model, batch, False, args.device))
        dp.append(timed_step(built.model, batch, True, args.device))
    tokens = int(batch.attention_mask.sum())
    result = {"shape": shape, "variant": variant,
              # an NF4 weight holds two values a byte: count the shape it was quantised from
              "params": sum(getattr(getattr(p, "quant_state", None), "shape", p.shape).numel()
                            for p in built.model.parameters()),
              "plain_s": statistics.median(plain), "dp_s": statistics.median(dp), "tokens": tokens,
              "plain_gb": peak_memory_gb(built.model, batch, False, args.device),
              "dp_gb": peak_memory_gb(built.model, batch, True, args.device)}
    del built
    if args.device == "cuda":
        import torch

        torch.cuda.empty_cache()
    return result


def print_row(r: dict[str, Any]) -> None:
    print(f"{r['shape']:>5} {r['params'] / 1e9:5.2f}B  {r['variant']:>13}  "
          f"plain {r['plain_s']:7.3f} s  DP {r['dp_s']:7.3f} s  DP/plain {r['dp_s'] / r['plain_s']:.3f}x  "
          f"DP {r['tokens'] / r['dp_s']:8.0f} tok/s  memory plain {r['plain_gb']:.1f} GB, DP {r['dp_gb']:.1f} GB",
          flush=True)


def simulation(out: Path) -> dict[str, Any]:
    """`fedtune simulate` with the sites on the GPU; returns its exit status and rounds."""
    run_dir = out / "gpu_sim"
    cmd = [sys.executable, "-m", "fedtune.cli", "simulate", "federation.num_sites=3", "federation.num_rounds=2",
           "federation.gpus_per_site=0.3", "model.dtype=bfloat16", "data.demo_records=600", f"run_dir={run_dir}"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    return {"exit": done.returncode, "seconds": round(time.perf_counter() - start, 1), "rounds": len(rows),
            "eval_loss": [r.get("eval_loss") for r in rows], "tail": done.stdout[-1500:] + done.stderr[-1500:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="350m,1b")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_check"))
    parser.add_argument("--skip-simulation", action="store_true")
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("torch sees no CUDA device: run this on the GPU machine (or --device cpu for a smoke run)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}; "
          f"batch {args.batch} x {args.length} tokens, bfloat16 base, LoRA r8 float32, median of {args.repeats}")
    results = []
    for shape in args.sizes.split(","):
        for variant in VARIANTS:
            results.append(measure(shape, variant, args))
            print_row(results[-1])
    if not args.skip_simulation:
        sim = simulation(out)
        print(f"simulation on the GPU: exit {sim['exit']}, {sim['rounds']} rounds in {sim['seconds']} s, "
              f"held-out loss {sim['eval_loss']}")
        if sim["exit"] != 0:
            print(sim["tail"])
        results.append({"simulation": sim})
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
