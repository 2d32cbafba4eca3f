"""Grid expansion and resumable execution of many simulated federations.

A *setting* is one point of an experiment grid (ε, partition, strategy, number of
sites, seed).  :func:`config_for` turns it into a complete :class:`FedtuneConfig`;
:func:`run_plans` runs each under a progress bar and keeps one ``result.json`` per
run, so an interrupted sweep continues where it stopped: a run whose result exists
*for the same resolved configuration* is not run again.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TextIO

from fedtune.config import FedtuneConfig, load_structured, to_dict
from fedtune.checkpoint import atomic_write_text
from fedtune.errors import ConfigError
from fedtune.experiments.engine import run_federation
from fedtune.privacy.calibration import calibrate_noise
from fedtune.strategies import REGISTRY as STRATEGIES
from fedtune.validation import validate, validate_against_data

log = logging.getLogger(__name__)

INF = math.inf
RESULT_FILE = "result.json"

# Fields a grid sets for every run: overriding them on the command line would be
# silently ignored, so it is refused with the flag to use instead.
GRID_FIELDS = {
    "privacy.enabled": "--epsilons (inf = non-private)",
    "privacy.target_epsilon": "--epsilons",
    "privacy.noise_multiplier": "--epsilons (σ is calibrated to each ε)",
    "federation.strategy": "--strategies",
    "federation.num_sites": "--sites",
    "data.partition": "--partitions",
    "data.dirichlet_alpha": "--alpha",
    "train.seed": "--seeds",
    "data.seed": "--seeds",
    "federation.seed": "--seeds",
}


@dataclass(frozen=True)
class Setting:
    """One run of a grid.  ``centralised`` means one site holding all the data."""

    epsilon: float
    strategy: str
    num_sites: int
    partition: str
    seed: int
    dirichlet_alpha: float = 0.3
    centralised: bool = False

    @property
    def group(self) -> str:
        """The setting without ε and seed: one line of a plot, one row of a table."""
        rule = STRATEGIES.get(self.strategy)
        name = rule.title if rule is not None else self.strategy
        if self.centralised:
            return f"centralised, {name}"
        return f"{self._partition_title}, {name}, {self.num_sites} sites"

    @property
    def _partition_title(self) -> str:
        return {"iid": "iid", "by_field": "by field"}.get(self.partition, f"Dirichlet α={self.dirichlet_alpha:g}")

    @property
    def key(self) -> str:
        """A file-system-safe, unique name of the run."""
        eps = "inf" if math.isinf(self.epsilon) else f"{self.epsilon:g}"
        if self.centralised:
            head = f"central-{self.strategy}"
        else:
            part = {"iid": "iid", "by_field": "byfield"}.get(self.partition, f"dir{self.dirichlet_alpha:g}")
            head = f"{part}-{self.strategy}-{self.num_sites}sites"
        return f"{head}-eps{eps}-seed{self.seed}"


def parse_epsilon(text: str) -> float:
    value = text.strip().lower()
    if value in ("inf", "infinity", "∞", "none"):
        return INF
    return float(value)


def expand_grid(epsilons: Sequence[float], partitions: Sequence[str], strategies: Sequence[str],
                num_sites: Sequence[int], seeds: Sequence[int], dirichlet_alpha: float,
                centralised: bool, centralised_strategies: Sequence[str] = ("fedavg",),
                field_sites: Optional[int] = None) -> list[Setting]:
    """Every federated setting, then the centralised references (one site, all data).

    ``by_field`` makes as many sites as the data has groups (``field_sites``, counted by
    :func:`fedtune.data.site_count.count_field_sites`), so it takes no size from ``num_sites``.
    """
    settings: list[Setting] = []
    for seed in seeds:
        sizes = [(n, p) for n in num_sites for p in partitions if p != "by_field"]
        if "by_field" in partitions:
            if field_sites is None:
                raise ConfigError("--partitions", "by_field is in the grid but its number of sites is unknown",
                                  "Count it with fedtune.data.site_count.count_field_sites and pass field_sites.")
            sizes.append((field_sites, "by_field"))
        for n, partition in sizes:
            for strategy in strategies:
                for eps in epsilons:
                    settings.append(Setting(eps, strategy, n, partition, seed, dirichlet_alpha))
        if centralised:
            for strategy in centralised_strategies:
                for eps in epsilons:
                    settings.append(Setting(eps, strategy, 1, "iid", seed, dirichlet_alpha, centralised=True))
    return settings


def config_for(setting: Setting, base: FedtuneConfig, run_dir: Path) -> FedtuneConfig:
    """The complete configuration of one run of the grid."""
    cfg = copy.deepcopy(base)
    cfg.run_dir = str(run_dir)
    cfg.federation.strategy = setting.strategy
    cfg.federation.num_sites = setting.num_sites
    cfg.data.partition = setting.partition
    cfg.data.dirichlet_alpha = setting.dirichlet_alpha
    cfg.train.seed = setting.seed
    cfg.data.seed = setting.seed
    cfg.federation.seed = setting.seed
    if setting.num_sites < 3:
        # SecAgg+ needs three parties; one site holding all data has nothing to hide from itself.
        cfg.secagg.enabled = False
    if setting.centralised:
        cfg.federation.sites_per_round = None  # the one site holding all data trains every round
    if math.isinf(setting.epsilon):
        cfg.privacy.enabled = False
        cfg.privacy.noise_multiplier = 0.0
    else:
        p = cfg.privacy
        # calibrate_noise is memoised, so a grid's runs that share a schedule search once.
        sigma = calibrate_noise(setting.epsilon, p.delta, p.sample_rate, cfg.federation.num_rounds,
                                cfg.train.local_steps, p.accountant)
        p.enabled = True
        p.noise_multiplier = sigma
        p.target_epsilon = setting.epsilon
    return cfg


def config_hash(cfg: FedtuneConfig) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_runs(configs: Sequence[FedtuneConfig]) -> None:
    """Validate every run's configuration, and its data split, before any training."""
    from fedtune.data import load_federated_data

    checked: set[str] = set()
    for cfg in configs:
        validate(cfg)
        data_key = json.dumps([dataclasses.asdict(cfg.data), cfg.federation.num_sites, cfg.privacy.enabled,
                               cfg.privacy.delta, cfg.secagg.enabled], sort_keys=True, default=str)
        if data_key in checked:
            continue
        checked.add(data_key)
        data = load_federated_data(cfg.data, cfg.federation.num_sites)
        validate_against_data(cfg, [len(s) for s in data.site_indices], data.num_train_records)


def read_run(run_dir: Path) -> dict[str, Any]:
    """The numbers of a finished run, from the files it wrote (metrics, summary, privacy report)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    summary = json.loads((run_dir / "summary.json").read_text())
    report = json.loads((run_dir / "privacy_report.json").read_text())
    spent = [s["epsilon"] for s in report["sites"].values()]
    numeric = [float(e) for e in spent]  # "inf" parses to inf
    last = rows[-1] if rows else {}
    return {
        "rounds_completed": summary["rounds_completed"],
        "stop_reason": summary["stop_reason"],
        "initial_eval_loss": summary["initial_eval_loss"],
        "final_eval_loss": last.get("eval_loss", summary["initial_eval_loss"]),
        "final_eval_perplexity": last.get("eval_perplexity", math.exp(min(summary["initial_eval_loss"], 50.0))),
        "final_eval_accuracy": last.get("eval_accuracy"),
        "epsilon_spent": max(numeric) if numeric else 0.0,
        # The most-trained site's DP-SGD steps: its records' worst case (search_cost).
        "max_site_steps": max((int(s["steps"]) for s in report["sites"].values()), default=0),
        "eval_loss_by_round": [summary["initial_eval_loss"]] + [r["eval_loss"] for r in rows],
        "eval_accuracy_by_round": [r.get("eval_accuracy") for r in rows],
    }


def result_row(setting: Setting, cfg: FedtuneConfig, run: dict[str, Any], wall_seconds: float,
               run_dir: Path, out_dir: Path) -> dict[str, Any]:
    return {
        "key": setting.key,
        "group": setting.group,
        "centralised": setting.centralised,
        "partition": "central" if setting.centralised else setting.partition,
        "dirichlet_alpha": setting.dirichlet_alpha if setting.partition == "dirichlet" else None,
        "strategy": setting.strategy,
        "num_sites": setting.num_sites,
        "seed": setting.seed,
        "epsilon_target": "inf" if math.isinf(setting.epsilon) else setting.epsilon,
        "epsilon_spent": "inf" if math.isinf(run["epsilon_spent"]) else run["epsilon_spent"],
        "delta": cfg.privacy.delta,
        "noise_multiplier": cfg.privacy.noise_multiplier,
        "sample_rate": cfg.privacy.sample_rate,
        "num_rounds": cfg.federation.num_rounds,
        "local_steps": cfg.train.local_steps,
        "rounds_completed": run["rounds_completed"],
        "max_site_steps": run.get("max_site_steps"),
        "stop_reason": run["stop_reason"],
        "initial_eval_loss": run["initial_eval_loss"],
        "final_eval_loss": run["final_eval_loss"],
        "final_eval_perplexity": run["final_eval_perplexity"],
        "final_eval_accuracy": run["final_eval_accuracy"],
        "eval_loss_by_round": run["eval_loss_by_round"],
        "eval_accuracy_by_round": run["eval_accuracy_by_round"],
        "wall_seconds": round(wall_seconds, 2),
        "run_dir": str(run_dir.relative_to(out_dir)) if run_dir.is_relative_to(out_dir) else str(run_dir),
    }


def load_result(run_dir: Path, cfg: FedtuneConfig) -> Optional[dict[str, Any]]:
    """The stored result of this exact configuration, or None (absent, or another config)."""
    path = run_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return stored["row"] if stored.get("config_hash") == config_hash(cfg) else None


def plan_runs(settings: Sequence[Setting], base: FedtuneConfig, out_dir: Path) -> list[tuple[Setting, FedtuneConfig]]:
    """Every run's complete configuration, all validated (with their data) before any training."""
    plans = []
    for setting in settings:
        try:
            cfg = config_for(setting, base, out_dir / "runs" / setting.key)
        except ValueError as exc:  # Opacus: "The privacy budget is too low."
            raise ConfigError("--epsilons", f"no noise level reaches ε={setting.epsilon:g} ({exc})",
                              "Use a larger ε, fewer rounds or local steps, or a smaller privacy.sample_rate.") \
                from None
        plans.append((setting, cfg))
    check_runs([cfg for _, cfg in plans])
    return plans


def run_plans(plans: Sequence[tuple[Setting, FedtuneConfig]], out_dir: Path, engine: str, progress: bool = True,
              on_result: Optional[Callable[[dict[str, Any]], None]] = None,
              progress_file: Optional[TextIO] = None) -> list[dict[str, Any]]:
    """Run (or reuse) every planned run; return one result row per run, in order.

    ``progress_file``: where the bar goes (stderr if None), e.g. the console of a
    command whose other output goes to its log.
    """
    from tqdm.auto import tqdm

    rows: list[dict[str, Any]] = []
    reused = 0
    bar = tqdm(plans, desc="runs", unit="run", disable=not progress, file=progress_file)
    for setting, cfg in bar:
        bar.set_postfix_str(setting.key)
        run_dir = Path(cfg.run_dir)  # type: ignore[arg-type]
        row = load_result(run_dir, cfg)
        if row is None:
            # A run without its result was interrupted (or configured differently):
            # start it afresh rather than resume a half-written ledger.
            shutil.rmtree(run_dir, ignore_errors=True)
            started = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                summary = run_federation(cfg, engine)
            if summary.failure is not None:
                log.warning("run %s trained nothing (%s): its row holds the untrained adapter's numbers",
                            setting.key, summary.failure)
            row = result_row(setting, cfg, read_run(run_dir), time.perf_counter() - started, run_dir, out_dir)
            atomic_write_text(run_dir / RESULT_FILE,
                              json.dumps({"config_hash": config_hash(cfg), "row": row}, indent=2))
        else:
            reused += 1
        rows.append(row)
        if on_result is not None:
            on_result(row)
    bar.close()
    if reused:
        log.info("reused %d finished run(s) of %d", reused, len(plans))
    return rows


def reject_grid_overrides(overrides: Sequence[str]) -> None:
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+")
        if key in GRID_FIELDS:
            raise ConfigError(key, "is set by the experiment grid for every run, so an override would be ignored",
                              f"Use {GRID_FIELDS[key]} instead.")


def apply_overrides(base: FedtuneConfig, overrides: Sequence[str]) -> FedtuneConfig:
    """Hydra-style ``section.field=value`` overrides, type-checked against the schema."""
    if not overrides:
        return base
    return load_structured(base, overrides=overrides,
                           fix="Check the field name and its type against the configuration reference in README.md.")
