"""Cost in the number of sites: the same per-round work (sites_per_round of them) in federations of growing size.

Each federation runs the built-in tiny model on iid demo data (3 records per site, at
least 240; a held-out set of about 100 records whatever the size, so evaluation is the
same work everywhere), `--per-round` sites a round for `--rounds` rounds, each in its own
subprocess so that one's caches do not speed up the next.  Engines (`--engines`):

* `inprocess`: the ServerApp and ClientApp code of `fedtune simulate` without Ray
  (fedtune.experiments' in-process grid);
* `flower`: `fedtune simulate` itself (:func:`fedtune.simulation.simulate`), Flower's
  simulation engine on Ray;
* `trivial`: Flower's own trivial app on the same engine and Ray settings: a ServerApp
  that waits for every node, then each round sends `--per-round` sampled nodes a message
  whose ClientApp returns a 4-float array.  The floor any app on Flower pays.

`--secagg off,on` runs the fedtune engines without and with secure aggregation.
Printed side by side, per engine and size: start-up (from the engine's call to round 1,
plus round 1's excess over a steady round: config and data checks, Ray and node start, the server's
setup and first evaluation, and what round 1 pays once, such as Ray's actors starting and
each process building its model), the last round's wall time, peak memory of the process
and all its descendants, Ray's included, sampled every 0.5 s (the sum of RSS, an upper
bound that counts shared pages in every process, and the sum of PSS), and the ratios to
the smallest federation and to the trivial app.  Each round is also given in CPU
seconds of the benchmark's own process, which the machine's other load barely changes:
for the in-process engine all of the round's work; under Ray the driver's (the ServerApp
and Flower's engine threads), not the sites'.
Usage: python benchmarks/scale.py [--sites 100,1000,10000] [--per-round 20] [--rounds 2]
       [--engines inprocess,flower,trivial] [--secagg off,on] [--timeout 900]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("inprocess", "flower", "trivial")
EVAL_RECORDS = 100


class PeakMemory:
    """The largest total memory of this process and its descendants (Ray's head and actors), sampled.

    Two sums: RSS, which counts the pages processes share (torch's libraries in every
    actor) once per process, an upper bound; and PSS, which splits each shared page among
    its sharers, so the sum is the memory the whole federation takes from the machine.
    """

    def __init__(self, period_s: float = 0.5) -> None:
        import psutil

        self.me, self.period_s, self._stop = psutil.Process(), period_s, threading.Event()
        self.peak, self.peak_pss = 0, 0
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            rss = pss = 0
            for proc in [self.me, *self.me.children(recursive=True)]:
                try:
                    info = proc.memory_full_info()
                    rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
                except psutil.Error:
                    pass  # a worker that just exited
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            self._stop.wait(self.period_s)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mb(self) -> float:
        return self.peak / 2**20

    @property
    def pss_mb(self) -> float:
        return self.peak_pss / 2**20


def fedtune_config(num_sites: int, per_round: int, rounds: int, secagg: bool, run_dir: str):  # type: ignore[no-untyped-def]
    """The tests' tiny federation at ``num_sites`` sites, tiny data per site, a held-out set of fixed size."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_config

    cfg = tiny_config(Path(run_dir))
    cfg.federation.num_sites, cfg.federation.sites_per_round, cfg.federation.num_rounds = num_sites, per_round, rounds
    cfg.data.partition, cfg.data.demo_records, cfg.log_level = "iid", max(240, 3 * num_sites), "WARNING"
    cfg.data.eval_fraction = min(0.5, EVAL_RECORDS / cfg.data.demo_records)
    cfg.secagg.enabled = secagg
    cfg.federation.wait_for_sites_s = 1200.0  # 10,000 Ray nodes take a while to register
    return cfg


def timed_rounds(cpu: list[float]) -> list[tuple[float, float]]:
    """(start, end) of each round the server plays in this process (fedtune's ServerRun.play, patched).

    ``cpu`` gets each round's CPU seconds of this process: for the in-process engine all of
    the round's work, a measure that the machine's other load barely moves.
    """
    from fedtune.federation.server import ServerRun

    spans: list[tuple[float, float]] = []
    play = ServerRun.play

    def timed(self, round_number, finisher):  # type: ignore[no-untyped-def]
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            return play(self, round_number, finisher)
        finally:
            spans.append((start, time.perf_counter()))
            cpu.append(time.process_time() - cpu_start)

    ServerRun.play = timed  # type: ignore[method-assign]
    return spans


def run_inprocess(cfg) -> int:  # type: ignore[no-untyped-def]
    from conftest import InProcessGrid  # the tests' message-keeping grid: it counts the describe messages

    from fedtune.apps import make_client_app
    from fedtune.federation import protocol
    from fedtune.federation.server import run_server
    from fedtune.simulation import check_data

    check_data(cfg)
    grid = InProcessGrid(make_client_app(cfg), cfg.federation.num_sites)
    run_server(grid, cfg, Path(cfg.run_dir), show_progress=False)
    return sum(m.metadata.message_type == protocol.DESCRIBE for m in grid.sent)


def run_flower(cfg) -> int:  # type: ignore[no-untyped-def]
    import logging

    from fedtune.simulation import simulate

    logging.getLogger("flwr").setLevel(logging.WARNING)
    with open(Path(cfg.run_dir).parent / f"{Path(cfg.run_dir).name}.progress.txt", "w") as progress:
        simulate(cfg, progress_file=progress)
    return -1  # the describe messages travel through Ray, uncounted


def trivial_apps(num_nodes: int, per_round: int, rounds: int, spans: list[tuple[float, float]]):  # type: ignore[no-untyped-def]
    """Flower's trivial ServerApp and ClientApp: wait for every node, then sample, send, receive."""
    import random

    import numpy as np
    from flwr.app import ArrayRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp

    def tiny() -> RecordDict:
        return RecordDict({"arrays": ArrayRecord(numpy_ndarrays=[np.zeros(4, dtype=np.float32)])})

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(tiny(), reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        while len(list(grid.get_node_ids())) < num_nodes:  # as fedtune's server waits for num_sites nodes
            time.sleep(0.1)
        rng = random.Random(0)
        for _ in range(rounds):
            start = time.perf_counter()
            nodes = rng.sample(sorted(grid.get_node_ids()), per_round)
            replies = list(grid.send_and_receive([Message(tiny(), dst_node_id=n, message_type="train") for n in nodes]))
            assert len(replies) == per_round and not any(r.has_error() for r in replies)
            spans.append((start, time.perf_counter()))

    return server, client


def run_trivial(cfg, spans: list[tuple[float, float]]) -> int:  # type: ignore[no-untyped-def]
    from flwr.simulation import run_simulation

    from fedtune.simulation import backend_config

    f = cfg.federation
    server, client = trivial_apps(f.num_sites, f.sites_per_round, f.num_rounds, spans)
    run_simulation(server_app=server, client_app=client, num_supernodes=f.num_sites,
                   backend_config=backend_config(cfg))  # the same Ray settings as fedtune simulate
    return 0


def worker(engine: str, num_sites: int, per_round: int, rounds: int, secagg: bool, run_dir: str) -> dict[str, Any]:
    """One federation in this process: start-up, each round's time, peak memory, describe messages."""
    import torch

    import fedtune.simulation  # noqa: F401 - imports are not start-up: every engine pays them before its call

    torch.set_num_threads(1)
    cfg = fedtune_config(num_sites, per_round, rounds, secagg, run_dir)
    cpu: list[float] = []
    spans = timed_rounds(cpu)
    runners: dict[str, Callable[[], int]] = {"inprocess": lambda: run_inprocess(cfg),
                                             "flower": lambda: run_flower(cfg),
                                             "trivial": lambda: run_trivial(cfg, spans)}
    with PeakMemory() as memory:
        start = time.perf_counter()
        describes = runners[engine]()
        total = time.perf_counter() - start
    # Ray starts its actors, and fedtune's sites build their model, at the first message: round 1
    # carries that start-up, so start-up = the time to round 1 plus round 1's excess over a
    # steady (the last) round, if any.
    steady = spans[-1][1] - spans[-1][0] if spans else 0.0
    return {"engine": engine, "secagg": secagg, "sites": num_sites, "total_s": total, "rounds": len(spans),
            "startup_s": spans[0][0] - start + max(0.0, spans[0][1] - spans[0][0] - steady) if spans else None,
            "to_round_1_s": spans[0][0] - start if spans else None,
            "round_s": [end - begin for begin, end in spans], "round_cpu_s": cpu, "describes": describes, "peak_mb": memory.mb,
            "peak_pss_mb": memory.pss_mb}


def run_one(engine: str, n: int, secagg: bool, args: argparse.Namespace, base: str) -> dict[str, Any]:
    """:func:`worker` in a fresh subprocess (its own caches, its own Ray), or why it did not finish."""
    run_dir = f"{base}/{engine}-{'secagg' if secagg else 'plain'}-n{n}"
    cmd = [sys.executable, __file__, "--per-round", str(args.per_round), "--rounds", str(args.rounds),
           "--worker", engine, str(n), "on" if secagg else "off", run_dir]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                              env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    except subprocess.TimeoutExpired:
        return {"engine": engine, "secagg": secagg, "sites": n, "failed": f"over {args.timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        Path(f"{run_dir}.stderr.txt").write_text(done.stderr)
        return {"engine": engine, "secagg": secagg, "sites": n,
                "failed": f"exit {done.returncode}, see {run_dir}.stderr.txt: {done.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def _label(r: dict[str, Any]) -> str:
    return r["engine"] + (" +secagg" if r["secagg"] else "") if r["engine"] != "trivial" else "flower trivial app"


def print_table(results: list[dict[str, Any]], per_round: int, rounds: int) -> None:
    """One line per run; ratios to the same engine's smallest federation, and start-up to the trivial app's."""
    print(f"{per_round} sites a round, {rounds} rounds, tiny model, ~3 records per site; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f} at the end")
    print(f"{'engine':22s} {'sites':>6s} {'start-up':>9s} {'x small':>7s} {'x trivial':>9s} {'round':>8s} "
          f"{'x small':>7s} {'CPU':>7s} {'x small':>7s} {'RSS MB':>8s} {'PSS MB':>8s} {'describes':>9s}")
    smallest: dict[str, dict[str, Any]] = {}
    nan = float("nan")
    trivial = {r["sites"]: r for r in results if r["engine"] == "trivial" and "failed" not in r}
    for r in results:
        if "failed" in r:
            print(f"{_label(r):22s} {r['sites']:6d}  did not finish: {r['failed']}")
            continue
        if r["rounds"] < rounds:
            print(f"{_label(r):22s} {r['sites']:6d}  played {r['rounds']} of {rounds} rounds")
            continue
        first = smallest.setdefault(_label(r), r)
        last_round = r["round_s"][-1]
        vs_trivial = r["startup_s"] / trivial[r["sites"]]["startup_s"] if r["sites"] in trivial else nan
        cpu, first_cpu = (r.get("round_cpu_s") or [nan])[-1], (first.get("round_cpu_s") or [nan])[-1]
        print(f"{_label(r):22s} {r['sites']:6d} {r['startup_s']:8.1f}s {r['startup_s'] / first['startup_s']:6.2f}x "
              f"{vs_trivial:8.2f}x {last_round:7.2f}s {last_round / first['round_s'][-1]:6.2f}x "
              f"{cpu:6.2f}s {cpu / first_cpu:6.2f}x "
              f"{r['peak_mb']:8.0f} {r.get('peak_pss_mb', float('nan')):8.0f} "
              f"{r['describes'] if r['describes'] >= 0 else '-':>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default="100,1000,10000")
    parser.add_argument("--per-round", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--secagg", default="off", help="off, on, or off,on (the fedtune engines only)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one federation may take")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        engine, n, secagg, run_dir = args.worker
        print(json.dumps(worker(engine, int(n), args.per_round, args.rounds, secagg == "on", run_dir)))
        return
    base = tempfile.mkdtemp(prefix="fedtune-scale-")
    engines = [e for e in args.engines.split(",") if e]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise SystemExit(f"--engines: unknown {', '.join(sorted(unknown))}; use some of {', '.join(ENGINES)}")
    modes = [m == "on" for m in args.secagg.split(",")]
    results = []
    for engine in engines:
        for secagg in (modes if engine != "trivial" else [False]):
            for n in (int(s) for s in args.sites.split(",")):
                results.append(run_one(engine, n, secagg, args, base))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # each result as it lands
    print_table(results, args.per_round, args.rounds)
    print(f"run directories: {base}")


if __name__ == "__main__":
    main()
