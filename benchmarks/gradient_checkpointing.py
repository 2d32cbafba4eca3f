"""Memory-saving settings on real models on CPU: the DP-SGD step's time and peak memory, off and on.

--setting gradient_checkpointing (default): model.gradient_checkpointing; --setting quantization:
model.quantization=4bit (QLoRA, an NF4 base) against the float32 base.

Same models, batches and DP step as benchmarks/real_models.py (whose helpers this reuses):
MiniLM (classification, 32 records x <=64 tokens) and SmolLM2-135M (causal LM, 8 x 128).
  1. time per DP-SGD step with checkpointing over without: two models in one process, the
     repeats interleaved (off, on, off, on, ...) so the shared machine's noise hits both;
  2. peak RSS of the training steps, each mode in its own fresh process, the peak reset
     after the model load so that the load's own peak does not hide the increment.
Usage: python benchmarks/gradient_checkpointing.py [--setting quantization] [--models minilm,smollm2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_models as rm  # noqa: E402  (the sibling benchmark's model, data and timing helpers)


# What "on" sets in the model config, per --setting.
SETTINGS = {"gradient_checkpointing": ("gradient_checkpointing", True), "quantization": ("quantization", "4bit")}


def load(key: str, setting: str, on: bool, cache_dir: Optional[str]) -> tuple[Any, Any]:
    from fedtune.models import build_fingerprinted_model
    from fedtune.tasks import get_task

    cfg = rm.model_config(key, cache_dir)
    if on:
        field, value = SETTINGS[setting]
        setattr(cfg, field, value)
    return build_fingerprinted_model(cfg), get_task(cfg.task)


def worker_time(key: str, setting: str, repeats: int, cache_dir: Optional[str]) -> dict:
    plain, task = load(key, setting, False, cache_dir)
    checkpointed, _ = load(key, setting, True, cache_dir)
    batch = rm.fixed_batch(key, rm.BENCHES[key], task, plain)
    for built in (plain, checkpointed):
        rm.timed_step(task, built.model, batch, True)  # warm-up
    off, on = [], []
    for _ in range(repeats):
        off.append(rm.timed_step(task, plain.model, batch, True))
        on.append(rm.timed_step(task, checkpointed.model, batch, True))
    return {"off": off, "on": on, "shape": list(batch.input_ids.shape)}


def worker_memory(key: str, setting: str, on: bool, steps: int, cache_dir: Optional[str]) -> dict:
    built, task = load(key, setting, on, cache_dir)
    batch = rm.fixed_batch(key, rm.BENCHES[key], task, built)
    after_load = rm.rss_mb("VmRSS")
    reset = rm.reset_peak_rss()
    for _ in range(steps):
        rm.timed_step(task, built.model, batch, True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"after_load": after_load, "peak": peak, "reset": reset}


def report(key: str, setting: str, timing: dict, memory: dict[bool, dict]) -> None:
    off, on = statistics.median(timing["off"]), statistics.median(timing["on"])
    print(f"{rm.BENCHES[key].name}, batch {timing['shape'][0]} x {timing['shape'][1]} tokens, DP-SGD step, "
          f"{setting} off/on")
    print(f"  time   off {off:6.2f} s   on {on:6.2f} s   on/off {on / off:.2f}x   (median of {len(timing['off'])})")
    grow = {mode: m["peak"] - m["after_load"] for mode, m in memory.items()}
    print(f"  memory training increment off {grow[False]:7.0f} MB   on {grow[True]:7.0f} MB   "
          f"on/off {grow[True] / max(grow[False], 1.0):.2f}x   (peak RSS over the loaded model)")
    print(f"  memory after the load   off {memory[False]['after_load']:7.0f} MB   on {memory[True]['after_load']:7.0f} MB")
    if not all(m["reset"] for m in memory.values()):
        print("  (the kernel refused to reset the peak RSS: the increments include the load's peak)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="gradient_checkpointing")
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=None, help="where the converted GGUF is kept (default: a temp dir)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        kind, key, *rest = args.worker
        result = (worker_time(key, args.setting, args.repeats, args.cache_dir) if kind == "time"
                  else worker_memory(key, args.setting, rest[0] == "on", rm.BENCHES[key].memory_steps,
                                     args.cache_dir))
        print(json.dumps(result))
        return
    if args.cache_dir is None:
        import tempfile

        args.cache_dir = tempfile.mkdtemp(prefix="fedtune-bench-")
    for key in args.models.split(","):
        extra = ("--setting", args.setting)
        timing = rm.run_worker(args, "time", key, script=__file__, extra=extra)
        memory = {mode: rm.run_worker(args, "memory", key, "on" if mode else "off", script=__file__, extra=extra)
                  for mode in (False, True)}
        report(key, args.setting, timing, memory)


if __name__ == "__main__":
    main()
