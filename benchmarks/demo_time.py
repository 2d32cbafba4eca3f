"""Wall time of the demo federation and how it splits.

Runs ``fedtune simulate`` on the built-in defaults (in-process, Flower simulation
engine) and prints, as shares of the total wall time: local training (site-seconds
of DP-SGD divided by the number of sites Ray runs at once), aggregation and
checkpointing, server-side evaluation, and the rest (Ray start-up, process and model
set-up per message, serialisation, the describe round).
Usage: python benchmarks/demo_time.py [hydra-style overrides are not parsed; edit below]
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

from fedtune.config import FedtuneConfig
from fedtune.simulation import simulate


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    cfg = FedtuneConfig()
    with tempfile.TemporaryDirectory() as tmp:
        cfg.run_dir = str(Path(tmp) / "run")
        started = time.perf_counter()
        simulate(cfg)
        wall = time.perf_counter() - started
        rows = [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    parallel = max(1, min(cfg.federation.num_sites, int((os.cpu_count() or 1) / cfg.federation.cpus_per_site)))
    training = sum(r["local_train_seconds"] for r in rows) / parallel
    aggregation = sum(r["aggregation_seconds"] for r in rows)
    evaluation = sum(r["eval_seconds"] for r in rows)
    rest = wall - training - aggregation - evaluation
    print(f"demo: {cfg.federation.num_sites} sites x {cfg.federation.num_rounds} rounds, {parallel} sites at once")
    print(f"wall time           {wall:7.1f} s   1.00")
    for name, seconds in (("local training", training), ("aggregation+ckpt", aggregation),
                          ("server evaluation", evaluation), ("framework+start-up", rest)):
        print(f"{name:<19} {seconds:7.1f} s   {seconds / wall:.2f}")
    print(f"held-out loss {rows[0]['eval_loss']:.3f} (round 1) -> {rows[-1]['eval_loss']:.3f} "
          f"(round {rows[-1]['round']}), max ε {rows[-1]['max_epsilon']}")


if __name__ == "__main__":
    main()
