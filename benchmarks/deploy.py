"""Real deployment against simulation, and where a deployed round's time goes (issue 4).

One run, side by side, on the same configuration (3 sites, secure aggregation and DP-SGD
on, the same data partition):

1. a calibration in this process: build the LoRA model and encode one site's records
   (what every site repeats at the start of its masked-input stage), and the largest
   site's DP-SGD steps alone on one core;
2. ``fedtune.simulation.simulate`` (Flower's simulation engine, one process);
3. a real deployment on 127.0.0.1 (``fedtune server``: SuperLink with TLS and node
   authentication; three ``fedtune client``: SuperNode + fedtune's executor), started and
   stopped by ``LocalFederation`` (tests/localhost.py).

Round 1 includes warm-up (imports, first model build in the executor or Ray worker) and is
reported separately; the ratios use the mean of rounds 2.. .

Where the numbers come from:
- ``round_seconds``, ``aggregation_seconds``, ``eval_seconds`` and ``local_train_seconds``
  from ``metrics.jsonl``.  ``local_train_seconds`` is the *sum over sites* of each site's
  ``local_update`` time, which also includes charging the ledger, building the model,
  loading the global adapter and encoding the records: it is not the critical path.
  ``round_seconds`` runs from a round's first message to its checkpoint; the held-out
  evaluation (``eval_seconds``) runs on the server's evaluator thread beside the next
  round, so it is reported but not counted in the round;
- the four secure-aggregation round trips from the server's ``fedtune.federation.exchange``
  DEBUG lines (``log_level=DEBUG``); in simulation from the same logger in this process;
- per site, from its log: the executor's masked-input task line (pull, fedtune, push
  seconds, logged when the task ends) and the ``<site> round N: K steps`` line (logged when
  DP-SGD ends).  Training phase = from the task's fedtune start to that line; masking = from
  that line to the task's fedtune end.  DP-SGD = training phase − model build and encode
  (from the calibration, measured on an idle process, so DP-SGD is if anything overstated).

Outside-training share = 1 − (DP-SGD seconds of the critical site) / (round wall time),
where the critical site is the last one to finish the masked-input stage.

Usage: python benchmarks/deploy.py [--quick] [--rounds N] [--steps K] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

SITES = ["hosp-a", "hosp-b", "hosp-c"]
STAGES = ("advertise keys", "share keys", "masked input", "unmask")
# 8 layers x 4 attention projections x rank 64 x (256 + 256) = 2^20 LoRA entries.
FULL_MODEL = ("model.tiny.hidden_size=256", "model.tiny.num_layers=8", "model.tiny.num_heads=4",
              "model.tiny.intermediate_size=704", "model.lora.rank=64")
QUICK_MODEL = ()  # the built-in tiny model: 2 layers x 4 projections x rank 8 x (64 + 64) = 8192 entries

TS = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
TASK_LINE = re.compile(TS + r".*task run=\S+ type=(\S+) (\S+) in ([\d.]+)s \(pull ([\d.]+)s, fedtune ([\d.]+)s, "
                            r"push ([\d.]+)s\)")
TRAINED_LINE = re.compile(TS + r".* (\S+) round (\d+): (\d+) steps")
EXCHANGE_LINE = re.compile(r"round trip: (\d+) message\(s\) pushed in ([\d.]+)s, (\d+) repl\(ies\) after ([\d.]+)s")


def stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


# ---------------------------------------------------------------- configuration

def overrides_for(args: argparse.Namespace) -> list[str]:
    cpus = os.cpu_count() or 1
    return [
        *(QUICK_MODEL if args.quick else FULL_MODEL),
        f"federation.num_sites={len(SITES)}", f"federation.num_rounds={args.rounds}",
        f"train.local_steps={args.steps}", f"data.demo_records={args.records}",
        "secagg.enabled=true", "privacy.enabled=true",
        # Simulation only (ignored by a deployment): run all sites at once, as the deployment does.
        f"federation.cpus_per_site={cpus / len(SITES):.4f}",
        "federation.round_timeout_s=600", "federation.wait_for_sites_s=180",
    ]


def config_from(overrides: list[str]):
    from omegaconf import OmegaConf

    from fedtune.config import FedtuneConfig

    merged = OmegaConf.merge(OmegaConf.structured(FedtuneConfig), OmegaConf.from_dotlist(overrides))
    return OmegaConf.to_object(merged)


# ---------------------------------------------------------------- calibration

@dataclass
class Calibration:
    entries: int
    build_seconds: float
    encode_seconds: float
    dpsgd_seconds: float
    largest_site_records: int


def calibrate(cfg) -> Calibration:
    """Model build, encoding and the largest site's DP-SGD, alone in this process on one thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.train.torch_threads)
    try:
        return _calibrate(cfg)
    finally:
        torch.set_num_threads(threads)  # the simulated server then uses torch's default, as a deployed one does


def _calibrate(cfg) -> Calibration:
    from fedtune import adapters
    from fedtune.data import load_federated_data
    from fedtune.models import build_lora_model, lora_parameter_names, set_trainable
    from fedtune.privacy.dpsgd import DPSGDParams, train_locally
    from fedtune.strategies import make_strategy
    from fedtune.tasks import get_task

    data = load_federated_data(cfg.data, cfg.federation.num_sites)
    largest = max(range(cfg.federation.num_sites), key=lambda i: len(data.site_records(i)))
    records = data.site_records(largest)
    build_lora_model(cfg.model)  # imports and first-call caches, as a warm executor has them
    started = time.perf_counter()
    model, tokenizer = build_lora_model(cfg.model)
    names = make_strategy(cfg.federation.strategy).trainable_names(model)
    state = adapters.lora_state(model, lora_parameter_names(model))
    adapters.load_lora_state(model, state)
    built = time.perf_counter()
    task = get_task(cfg.model.task)
    examples = task.encode_all(records, tokenizer, cfg.data.max_length)
    encoded = time.perf_counter()
    set_trainable(model, lora_parameter_names(model))
    params = DPSGDParams(noise_multiplier=cfg.privacy.noise_multiplier, max_grad_norm=cfg.privacy.max_grad_norm,
                         sample_rate=cfg.privacy.sample_rate, steps=cfg.train.local_steps,
                         learning_rate=cfg.train.learning_rate, optimizer=cfg.train.optimizer)
    trained_at = time.perf_counter()
    train_locally(task, model, examples, params, tokenizer.pad_token_id, seed=1)
    done = time.perf_counter()
    entries = sum(int(state[n].size) for n in names)
    return Calibration(entries, built - started, encoded - built, done - trained_at, len(records))


# ---------------------------------------------------------------- simulation

class StageLog(logging.Handler):
    """Collects the exchange's round-trip DEBUG lines emitted in this process."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.trips: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = EXCHANGE_LINE.search(record.getMessage())
        if match:
            self.trips.append(float(match.group(4)))


def run_simulation(overrides: list[str], run_dir: Path) -> tuple[list[dict], list[list[float]], float]:
    from fedtune.simulation import simulate

    cfg = config_from(overrides)
    cfg.run_dir = str(run_dir)
    cfg.log_level = "DEBUG"
    handler = StageLog()
    exchange_log = logging.getLogger("fedtune.federation.exchange")
    exchange_log.addHandler(handler)
    started = time.perf_counter()
    try:
        simulate(cfg)
    finally:
        exchange_log.removeHandler(handler)
    wall = time.perf_counter() - started
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return rows, stages_per_round(handler.trips, len(rows)), wall


def stages_per_round(trips: list[float], rounds: int) -> list[list[float]]:
    """The last 4·rounds round trips are the rounds' four stages (earlier ones: describe)."""
    trips = trips[-4 * rounds:] if rounds else []
    return [trips[4 * i:4 * i + 4] for i in range(len(trips) // 4)]


# ---------------------------------------------------------------- deployment

@dataclass
class SiteRound:
    site: str
    pull: float
    app: float
    push: float
    task_end: float
    train_phase: float = float("nan")  # fedtune start of the masked-input task -> end of DP-SGD
    mask_phase: float = float("nan")   # end of DP-SGD -> end of the masked-input handler
    other_stages: float = 0.0          # the three other stages' task seconds at this site


@dataclass
class Deployment:
    rows: list[dict]
    stages: list[list[float]]
    sites: dict[int, list[SiteRound]] = field(default_factory=dict)
    wall: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)       # CPU seconds per party over the run
    idle_cpu: dict[str, float] = field(default_factory=dict)  # share of a core per site, server gone


def group_cpu_seconds(leaders: dict[str, int]) -> dict[str, dict[int, float]]:
    """Cumulative CPU seconds (user + system) of every live process, by the party whose group it is in."""
    tick = os.sysconf("SC_CLK_TCK")
    by_group = {pgid: name for name, pgid in leaders.items()}
    out: dict[str, dict[int, float]] = {name: {} for name in leaders}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = by_group.get(int(fields[2]))  # field 5 (pgrp), counted after the command name
        if name is not None:
            out[name][int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    return out


class CpuMeter:
    """Samples the parties' process groups; a process's last sample counts (exited ones too)."""

    def __init__(self, leaders: dict[str, int]) -> None:
        self.leaders = leaders
        self.seen: dict[str, dict[int, float]] = {name: {} for name in leaders}

    def sample(self) -> dict[str, float]:
        for name, pids in group_cpu_seconds(self.leaders).items():
            self.seen[name].update(pids)
        return self.totals()

    def totals(self) -> dict[str, float]:
        return {name: sum(pids.values()) for name, pids in self.seen.items()}


def parse_site_log(text: str, site: str, rounds: int) -> dict[int, SiteRound]:
    tasks = [m for m in TASK_LINE.finditer(text) if m.group(2) == "train"]
    trained = {int(m.group(3)): stamp(m.group(1)) for m in TRAINED_LINE.finditer(text) if m.group(2) == site}
    out: dict[int, SiteRound] = {}
    for r in range(1, rounds + 1):
        stage_tasks = tasks[4 * (r - 1):4 * r]
        if len(stage_tasks) < 3:
            break
        m = stage_tasks[2]
        seconds, pull, app, push = (float(m.group(i)) for i in range(4, 8))
        end = stamp(m.group(1))
        sr = SiteRound(site, pull, app, push, end)
        sr.other_stages = sum(float(t.group(4)) for i, t in enumerate(stage_tasks) if i != 2)
        if r in trained:
            app_start = end - seconds + pull
            sr.train_phase = trained[r] - app_start
            sr.mask_phase = app_start + app - trained[r]
        out[r] = sr
    return out


def run_deployment(overrides: list[str], root: Path, timeout_s: float) -> Deployment:
    # The one-machine deployment harness is a test helper (tests/localhost.py), not part of
    # the library: a benchmark run from a checkout borrows it from tests/.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from localhost import LocalFederation

    cfg = config_from(overrides)
    fed = LocalFederation(root, SITES, demo_records=cfg.data.demo_records)
    started = time.perf_counter()
    try:
        fed.init()
        fed.start_server(*overrides, "log_level=DEBUG")
        for site in SITES:
            fed.start_site(site)
        assert fed.server is not None
        meter = CpuMeter({"server": fed.server.pid, **{s: p.pid for s, p in fed.sites.items()}})
        deadline = time.monotonic() + timeout_s
        while fed.server.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the deployment took over {timeout_s:.0f} s:\n{fed.tail('server', 60)}")
            meter.sample()
            time.sleep(0.5)
        wall = time.perf_counter() - started
        if fed.server.returncode != 0:
            raise RuntimeError(f"the server exited with {fed.server.returncode}:\n{fed.tail('server', 60)}")
        cpu = meter.sample()
        # The sites stay connected and idle once the run is over: what does waiting cost them?
        before, idle_started = cpu, time.perf_counter()
        time.sleep(5.0)
        after = meter.sample()
        idle = {s: (after[s] - before[s]) / (time.perf_counter() - idle_started) for s in SITES}
    finally:
        fed.stop_all()
    rows = fed.metrics()
    server_log = fed.log_path("server").read_text(errors="replace")
    trips = [float(m.group(4)) for m in EXCHANGE_LINE.finditer(server_log)]
    dep = Deployment(rows, stages_per_round(trips, len(rows)), wall=wall, cpu=cpu, idle_cpu=idle)
    per_site = {s: parse_site_log(fed.log_path(s).read_text(errors="replace"), s, len(rows)) for s in SITES}
    for r in range(1, len(rows) + 1):
        dep.sites[r] = [per_site[s][r] for s in SITES if r in per_site[s]]
    return dep


# ---------------------------------------------------------------- report

def column_mean(rows: list[dict], key: str, rounds: list[int]) -> float:
    return mean([float(rows[r - 1][key]) for r in rounds])


def stage_mean(stages: list[list[float]], i: int, rounds: list[int]) -> float:
    """Mean round trip of stage i over the rounds that have their four stages."""
    return mean([stages[r - 1][i] for r in rounds if r - 1 < len(stages)])


def server_rest(rows: list[dict], stages: list[list[float]], rounds: list[int]) -> float:
    """Round time outside the four round trips and aggregation: unmasking, decoding.

    The held-out evaluation of a round runs on its own thread while the next round's
    stages run, so it is not part of ``round_seconds``.
    """
    return mean([rows[r - 1]["round_seconds"] - sum(stages[r - 1]) - rows[r - 1]["aggregation_seconds"]
                 for r in rounds if r - 1 < len(stages)])


def critical_sites(dep: Deployment, rounds: list[int]) -> list[SiteRound]:
    """Per round, the site that finished the masked-input stage last (rounds without site lines skipped)."""
    crit = []
    for r in rounds:
        sites = dep.sites.get(r, [])
        if sites:
            crit.append(max(sites, key=lambda s: s.task_end))
    return crit


def report(args: argparse.Namespace, cal: Calibration, sim_rows: list[dict], sim_stages: list[list[float]],
           sim_wall: float, dep: Deployment) -> list[str]:
    n_rounds = min(len(sim_rows), len(dep.rows))
    steady = list(range(2, n_rounds + 1)) or [1]
    label = f"rounds {steady[0]}-{steady[-1]}" if len(steady) > 1 else f"round {steady[0]}"
    sim_r = column_mean(sim_rows, "round_seconds", steady)
    dep_r = column_mean(dep.rows, "round_seconds", steady)
    crit = critical_sites(dep, steady)
    dpsgd = max(0.0, mean([c.train_phase for c in crit]) - (cal.build_seconds + cal.encode_seconds))
    return [*report_header(args, cal, n_rounds, label), "",
            *report_side_by_side(sim_rows, sim_stages, sim_wall, dep, steady, label), "",
            *report_critical_path(cal, dep, crit, steady, label, dpsgd), "",
            *report_goals(dpsgd, dep_r, sim_r)]


def report_header(args: argparse.Namespace, cal: Calibration, n_rounds: int, label: str) -> list[str]:
    return [f"deploy vs simulate: {len(SITES)} sites, {n_rounds} rounds, {args.steps} DP-SGD steps/round, "
            f"secure aggregation + DP on, {cal.entries:,} aggregated LoRA entries (float32, "
            f"{cal.entries * 4 / 2**20:.1f} MiB), {os.cpu_count()} CPU cores; steady state = mean of {label}",
            f"calibration (this process, 1 thread): model build+load {cal.build_seconds:.2f} s, encode "
            f"{cal.encode_seconds:.2f} s, largest site ({cal.largest_site_records} records) DP-SGD alone "
            f"{cal.dpsgd_seconds:.2f} s"]


def report_side_by_side(sim_rows: list[dict], sim_stages: list[list[float]], sim_wall: float, dep: Deployment,
                        steady: list[int], label: str) -> list[str]:
    """Round time, stage by stage, in simulation and in the deployment."""
    lines: list[str] = []
    say = lines.append
    sim_r = column_mean(sim_rows, "round_seconds", steady)
    dep_r = column_mean(dep.rows, "round_seconds", steady)
    say(f"{'':38}{'simulation':>12}{'deployment':>12}{'ratio':>8}")
    say(f"{'round 1 wall (warm-up)':38}{sim_rows[0]['round_seconds']:>10.2f} s{dep.rows[0]['round_seconds']:>10.2f} s"
        f"{dep.rows[0]['round_seconds'] / sim_rows[0]['round_seconds']:>8.2f}")
    say(f"{'round wall, ' + label:38}{sim_r:>10.2f} s{dep_r:>10.2f} s{dep_r / sim_r:>8.2f}")
    for i, stage in enumerate(STAGES):
        s, d = stage_mean(sim_stages, i, steady), stage_mean(dep.stages, i, steady)
        say(f"{'  stage ' + str(i + 1) + ' ' + stage + ' (round trip)':38}{s:>10.2f} s{d:>10.2f} s{d / s:>8.2f}")
    for key, name in (("aggregation_seconds", "  server aggregate + checkpoint"),
                      ("eval_seconds", "server evaluation (beside next round)")):
        s, d = column_mean(sim_rows, key, steady), column_mean(dep.rows, key, steady)
        say(f"{name:38}{s:>10.2f} s{d:>10.2f} s{d / s if s else float('nan'):>8.2f}")
    sim_rest, dep_rest = server_rest(sim_rows, sim_stages, steady), server_rest(dep.rows, dep.stages, steady)
    say(f"{'  server unmask/decode/other':38}{sim_rest:>10.2f} s{dep_rest:>10.2f} s")
    say(f"{'  Σ sites local_update (metrics)':38}{column_mean(sim_rows, 'local_train_seconds', steady):>10.2f} s"
        f"{column_mean(dep.rows, 'local_train_seconds', steady):>10.2f} s")
    say(f"{'whole run (incl. start-up)':38}{sim_wall:>10.1f} s{dep.wall:>10.1f} s{dep.wall / sim_wall:>8.2f}")
    return lines


def round_parts(cal: Calibration, dep: Deployment, crit: list[SiteRound], steady: list[int], dpsgd: float
                ) -> list[tuple[str, float]]:
    """The deployment's steady round split along the critical site's path, in seconds."""
    build = cal.build_seconds + cal.encode_seconds
    dep_r = column_mean(dep.rows, "round_seconds", steady)
    stage3 = stage_mean(dep.stages, 2, steady)
    pull, push = mean([c.pull for c in crit]), mean([c.push for c in crit])
    train_phase, mask_phase = mean([c.train_phase for c in crit]), mean([c.mask_phase for c in crit])
    app = mean([c.app for c in crit])
    other_stages = [stage_mean(dep.stages, i, steady) for i in (0, 1, 3)]
    return [
        ("local training: DP-SGD of the critical site", dpsgd),
        ("outside training", dep_r - dpsgd),
        ("  stages 1, 2, 4 (advertise, share, unmask)", sum(other_stages)),
        ("  stage 3: pull global adapter (site)", pull),
        ("  stage 3: ledger+model build+encode (site, est.)", min(build, train_phase)),
        ("  stage 3: delta+quantise+mask (site)", mask_phase),
        ("  stage 3: other handler time (site)", app - train_phase - mask_phase),
        ("  stage 3: push masked vector (site)", push),
        ("  stage 3: transport, polling, scheduling", stage3 - pull - app - push),
        ("  server unmask/decode/other", server_rest(dep.rows, dep.stages, steady)),
        ("  server aggregate + checkpoint", column_mean(dep.rows, "aggregation_seconds", steady)),
    ]


def report_critical_path(cal: Calibration, dep: Deployment, crit: list[SiteRound], steady: list[int], label: str,
                         dpsgd: float) -> list[str]:
    """The deployment's round along its critical path, and the CPU the parties used."""
    dep_r = column_mean(dep.rows, "round_seconds", steady)
    lines = [f"deployment round ({label}), critical site = last to finish the masked-input stage "
             f"({', '.join(c.site for c in crit)})",
             f"{'round wall':50}{dep_r:>8.2f} s   1.00"]
    lines += [f"{name:50}{seconds:>8.2f} s   {seconds / dep_r:.2f}"
              for name, seconds in round_parts(cal, dep, crit, steady, dpsgd)]
    lines.append(f"{'(server evaluation, beside the next round)':50}"
                 f"{column_mean(dep.rows, 'eval_seconds', steady):>8.2f} s")
    lenient = 1 - mean([c.train_phase for c in crit]) / dep_r
    lines.append(f"(counting the site's ledger, model build and encode as training: outside share {lenient:.2f})")
    lines.append(f"CPU seconds over the whole deployment (incl. start-up): server side (SuperLink, gateway, "
                 f"ServerApp, flwr run) {dep.cpu.get('server', 0):.0f} s; sites (SuperNode + executor + training) "
                 + ", ".join(f"{s} {dep.cpu.get(s, 0):.0f} s" for s in SITES)
                 + f"; an idle site after the run uses {mean(list(dep.idle_cpu.values())):.0%} of a core")
    return lines


def report_goals(dpsgd: float, dep_r: float, sim_r: float) -> list[str]:
    """The deployment's two performance goals, each met or missed."""
    share = 1 - dpsgd / dep_r
    ratio = dep_r / sim_r
    return [f"goal: outside-training share < 0.25 of a round: {share:.2f}  {'PASS' if share < 0.25 else 'MISS'}",
            f"goal: deployment round within 2x of simulation: {ratio:.2f}x  {'PASS' if ratio <= 2 else 'MISS'}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the default tiny adapter (8192 entries), 2 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3, --quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="DP-SGD steps per round (default 3, --quick 3)")
    parser.add_argument("--records", type=int, default=1200, help="demo records over all sites")
    parser.add_argument("--timeout", type=float, default=1500, help="seconds the deployment may take")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run directories and logs here")
    args = parser.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.steps = args.steps or 3
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # fedtune's DEBUG lines reach StageLog, not the terminal
        handler.setLevel(logging.WARNING)

    overrides = overrides_for(args)
    cfg = config_from(overrides)
    work = Path(tempfile.mkdtemp(prefix="fedtune-deploy-bench-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    try:
        print("calibrating ...", file=sys.stderr, flush=True)
        cal = calibrate(cfg)
        print("simulating ...", file=sys.stderr, flush=True)
        sim_rows, sim_stages, sim_wall = run_simulation(overrides, work / "simulation")
        print("deploying on 127.0.0.1 ...", file=sys.stderr, flush=True)
        dep = run_deployment(overrides, work / "deployment", args.timeout)
        print("\n".join(report(args, cal, sim_rows, sim_stages, sim_wall, dep)))
        if args.keep is not None:
            print(f"runs and logs kept in {work}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
