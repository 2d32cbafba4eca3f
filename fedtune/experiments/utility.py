"""How much utility does privacy cost?  The ε × partition × strategy × sites sweep.

One command runs the grid (plus centralised references: one site holding all data,
non-private and DP at each ε), repeated over seeds, and writes into one directory:

* ``results.csv``: every run, one row each (per-round curves included);
* ``table.md``: mean ± std over seeds of held-out loss and perplexity (and accuracy for
  a classification task), settings × ε;
* ``utility_vs_epsilon.png``, ``utility_vs_round.png``;
* ``experiment.json`` and ``config.yaml``: the grid, the resolved base configuration,
  package versions and the command, so ``--spec DIR/experiment.json`` reruns it exactly;
* ``runs/<key>/``: each federation's own run directory (metrics.jsonl, privacy report...).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

from fedtune.checkpoint import atomic_write_text
from fedtune.config import PARTITIONS, STRATEGIES, FedtuneConfig, from_dict, to_dict
from fedtune.errors import ConfigError
from fedtune.experiments import plots, tables
from fedtune.experiments.engine import ENGINES
from fedtune.experiments.sweep import INF, expand_grid, plan_runs, run_plans

log = logging.getLogger(__name__)

CSV_NAME = "results.csv"
TABLE_NAME = "table.md"
SPEC_NAME = "experiment.json"


@dataclass
class UtilitySpec:
    """The grid of a utility sweep (the base configuration travels beside it)."""

    epsilons: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0, INF])
    partitions: list[str] = field(default_factory=lambda: ["iid", "dirichlet"])
    dirichlet_alpha: float = 0.3
    strategies: list[str] = field(default_factory=lambda: ["fedavg", "ffa"])
    num_sites: list[int] = field(default_factory=lambda: [5, 10])
    centralised: bool = True
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    engine: str = "flower"


def quick_base() -> FedtuneConfig:
    """A federation small enough that the whole quick grid runs in minutes on 2 cores."""
    cfg = FedtuneConfig()
    cfg.model.tiny.hidden_size = 32
    cfg.model.tiny.intermediate_size = 64
    cfg.model.tiny.num_heads = 2
    cfg.model.lora.rank = 4
    cfg.data.demo_records = 600
    cfg.data.max_length = 96
    cfg.federation.num_rounds = 4
    cfg.train.local_steps = 10
    cfg.train.learning_rate = 0.02
    cfg.privacy.sample_rate = 0.1
    return harness_defaults(cfg)


def full_base() -> FedtuneConfig:
    return harness_defaults(FedtuneConfig())


def harness_defaults(cfg: FedtuneConfig) -> FedtuneConfig:
    # Secure aggregation changes what the server sees, not what is learnt (beyond a
    # quantisation error bounded in metrics.jsonl); it is off so sweeps spend their time
    # on training.  secagg.enabled=true turns it back on for runs with >= 3 sites.
    cfg.secagg.enabled = False
    cfg.log_level = "WARNING"
    return cfg


def set_task(cfg: FedtuneConfig, task: str) -> FedtuneConfig:
    """``--task NAME``: the task's settings on the base config (``Task.configure``).

    For classification on the demo corpus the labels are the six specialities; for a JSONL
    file set model.num_labels (and data.label_names for string labels) as overrides.
    """
    from fedtune.tasks import REGISTRY

    if task not in REGISTRY:
        raise ConfigError("--task", f"'{task}' is not one of {', '.join(REGISTRY)}",
                          f"Use --task with one of: {', '.join(REGISTRY)}.")
    REGISTRY[task].configure(cfg)
    return cfg


def quick_spec() -> UtilitySpec:
    return UtilitySpec(num_sites=[3], seeds=[0, 1], engine="inprocess")


def validate_spec(spec: UtilitySpec) -> None:
    if not spec.epsilons:
        raise ConfigError("--epsilons", "is empty", "Give at least one ε, e.g. --epsilons 1,2,4,8,inf.")
    for eps in spec.epsilons:
        if not (eps > 0):
            raise ConfigError("--epsilons", f"{eps} is not a positive ε",
                              "Use positive budgets such as 1,2,4,8 and inf for the non-private run.")
    for part in spec.partitions:
        if part not in PARTITIONS:
            raise ConfigError("--partitions", f"'{part}' is not one of {', '.join(PARTITIONS)}",
                              "Use --partitions iid,dirichlet,by_field (or some of them).")
    for strategy in spec.strategies:
        if strategy not in STRATEGIES:
            raise ConfigError("--strategies", f"'{strategy}' is not one of {', '.join(STRATEGIES)}",
                              "Use --strategies fedavg,ffa (or one of them).")
    if spec.dirichlet_alpha <= 0:
        raise ConfigError("--alpha", f"{spec.dirichlet_alpha} is not positive", "Use α > 0, e.g. 0.3.")
    if not spec.num_sites or any(n < 2 for n in spec.num_sites):
        raise ConfigError("--sites", f"{spec.num_sites} needs federations of at least 2 sites",
                          "Use e.g. --sites 3,5; the one-site reference is the centralised run.")
    if not (spec.partitions and spec.strategies) and not spec.centralised:
        raise ConfigError("--partitions", "the grid is empty", "Give partitions and strategies, or keep the "
                          "centralised references.")
    if not spec.seeds or len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError("--seeds", f"{spec.seeds} is empty or repeats a seed", "Use e.g. --seeds 3.")
    if spec.engine not in ENGINES:
        raise ConfigError("--engine", f"'{spec.engine}' is not one of {', '.join(ENGINES)}",
                          "Use --engine flower (Ray) or --engine inprocess.")


def spec_to_json(spec: UtilitySpec) -> dict[str, Any]:
    data = dataclasses.asdict(spec)
    data["epsilons"] = ["inf" if math.isinf(e) else e for e in spec.epsilons]
    return data


def spec_from_json(data: dict[str, Any]) -> UtilitySpec:
    data = dict(data)
    data["epsilons"] = [tables.epsilon_value(e) for e in data["epsilons"]]
    return UtilitySpec(**data)


def provenance() -> dict[str, Any]:
    """Versions of everything that shapes a number in the table."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("fedtune", "flwr", "torch", "opacus", "peft", "transformers", "numpy"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"versions": versions, "python": sys.version.split()[0], "command": sys.argv}


def write_experiment_record(out_dir: Path, kind: str, spec_json: dict[str, Any], base: FedtuneConfig) -> None:
    from omegaconf import OmegaConf

    record = {"experiment": kind, "spec": spec_json, "base_config": to_dict(base), **provenance()}
    atomic_write_text(out_dir / SPEC_NAME, json.dumps(record, indent=2, default=str))
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(base)))


def load_experiment_record(path: Path) -> tuple[UtilitySpec, FedtuneConfig]:
    record = json.loads(path.read_text())
    if record.get("experiment") != "utility":
        raise ConfigError("--spec", f"{path} records a '{record.get('experiment')}' experiment, not 'utility'",
                          "Pass the experiment.json of a utility sweep.")
    return spec_from_json(record["spec"]), from_dict(record["base_config"])


def render(out_dir: Path, rows: Optional[list[dict[str, Any]]] = None) -> str:
    """Table and plots from ``results.csv`` (or the given rows); returns the Markdown."""
    if rows is None:
        rows = tables.read_csv(out_dir / CSV_NAME)
    else:
        tables.write_csv(rows, out_dir / CSV_NAME)
    note = ""
    record_path = out_dir / SPEC_NAME
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        note = f"fedtune {record['versions'].get('fedtune')}; grid and base configuration in `{SPEC_NAME}`."
    text = tables.write_tables(rows, out_dir / TABLE_NAME, provenance=note)
    plots.plot_utility_vs_epsilon(rows, out_dir / "utility_vs_epsilon.png")
    plots.plot_utility_vs_round(rows, out_dir / "utility_vs_round.png")
    return text


def field_sites(spec: UtilitySpec, base: FedtuneConfig) -> Optional[int]:
    """How many sites ``--partitions by_field`` makes of the base data (None when the grid has no by_field).

    Counted once, before any run, as ``fedtune simulate federation.num_sites=null`` does,
    so every by_field run of the grid has that many sites (``--sites`` sizes the others).
    """
    if "by_field" not in spec.partitions:
        return None
    from fedtune.data.site_count import resolve_num_sites

    cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, partition="by_field"),
                              federation=dataclasses.replace(base.federation, num_sites=None))
    resolve_num_sites(cfg)
    log.info("by_field: %d sites (one per data.group_field=%s value)", cfg.federation.num_sites, base.data.group_field)
    return cfg.federation.num_sites


def run_utility(spec: UtilitySpec, base: FedtuneConfig, out_dir: Path, progress: bool = True,
                progress_file: Optional[TextIO] = None) -> str:
    """Run (or resume) the sweep; write CSV, table and plots; return the Markdown table."""
    validate_spec(spec)
    settings = expand_grid(spec.epsilons, spec.partitions, spec.strategies, spec.num_sites, spec.seeds,
                           spec.dirichlet_alpha, spec.centralised, field_sites=field_sites(spec, base))
    plans = plan_runs(settings, base, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_experiment_record(out_dir, "utility", spec_to_json(spec), base)
    rows = run_plans(plans, out_dir, spec.engine, progress=progress, progress_file=progress_file)
    return render(out_dir, rows)
