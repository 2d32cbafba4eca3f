"""Cost in the number of sites: the same per-round work (sites_per_round of them) in federations of growing size.

Each federation runs the built-in tiny model, iid data (3 records per site, at least 240),
`--per-round` sites a round for `--rounds` rounds, secure aggregation off, through the
in-process engine (the ServerApp and ClientApp code of `fedtune simulate` without Ray),
each in its own subprocess so that one's caches do not speed up the next.  Printed side by
side: wall time, peak RSS, the DESCRIBE messages sent, and the time over the smallest
federation's.  `--flower N` adds one run of `fedtune simulate` (Ray) with N sites.
Usage: python benchmarks/scale.py [--sites 20,200,2000] [--per-round 10] [--rounds 2] [--flower 1000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(num_sites: int, per_round: int, rounds: int, run_dir: str) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch

    from conftest import InProcessGrid, tiny_config  # the tests' tiny federation and message-keeping grid

    from fedtune.apps import make_client_app
    from fedtune.federation import protocol
    from fedtune.federation.server import run_server
    from fedtune.simulation import check_data

    torch.set_num_threads(1)
    cfg = tiny_config(Path(run_dir))
    cfg.federation.num_sites, cfg.federation.sites_per_round, cfg.federation.num_rounds = num_sites, per_round, rounds
    cfg.data.partition, cfg.data.demo_records, cfg.log_level = "iid", max(240, 3 * num_sites), "WARNING"
    start = time.perf_counter()
    check_data(cfg)
    grid = InProcessGrid(make_client_app(cfg), num_sites)
    summary = run_server(grid, cfg, Path(run_dir), show_progress=False)
    seconds = time.perf_counter() - start
    describes = sum(m.metadata.message_type == protocol.DESCRIBE for m in grid.sent)
    return {"sites": num_sites, "seconds": seconds, "rounds": summary.rounds_completed, "describes": describes,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def flower(num_sites: int, per_round: int, rounds: int, run_dir: str) -> dict:
    cmd = [str(Path(sys.executable).parent / "fedtune"), "simulate", f"federation.num_sites={num_sites}",
           f"federation.num_rounds={rounds}", f"federation.sites_per_round={per_round}",
           f"data.demo_records={max(240, 30 * num_sites)}", "data.partition=iid", f"run_dir={run_dir}"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    summary = json.loads((Path(run_dir) / "summary.json").read_text()) if (Path(run_dir) / "summary.json").is_file() \
        else {}
    return {"sites": num_sites, "seconds": time.perf_counter() - start, "exit": done.returncode,
            "rounds": summary.get("rounds_completed"), "failed": summary.get("failed")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default="20,200,2000")
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--flower", type=int, default=0, help="also run `fedtune simulate` (Ray) with this many sites")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(int(args.worker[0]), args.per_round, args.rounds, args.worker[1])))
        return
    base = tempfile.mkdtemp(prefix="fedtune-scale-")
    results = []
    for n in (int(s) for s in args.sites.split(",")):
        cmd = [sys.executable, __file__, "--per-round", str(args.per_round), "--rounds", str(args.rounds),
               "--worker", str(n), f"{base}/n{n}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{n} sites failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    smallest = results[0]["seconds"]
    print(f"in-process engine, {args.per_round} sites a round, {args.rounds} rounds")
    for r in results:
        print(f"  {r['sites']:6d} sites  {r['seconds']:6.1f} s  x{r['seconds'] / smallest:4.2f}  "
              f"{r['describes']:5d} describe messages  peak {r['peak_mb']:6.0f} MB  {r['rounds']} rounds")
    if args.flower:
        r = flower(args.flower, args.per_round, args.rounds, f"{base}/flower{args.flower}")
        print(f"fedtune simulate (Ray), {r['sites']} sites: {r['seconds']:.0f} s, exit {r['exit']}, "
              f"{r['rounds']} rounds, failed: {r['failed']}")


if __name__ == "__main__":
    main()
