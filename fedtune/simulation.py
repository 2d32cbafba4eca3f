"""Run a whole federation locally in Flower's simulation engine (Ray backend).

Why ``flwr.simulation.run_simulation`` and not ``flwr run``: flwr 1.42 deprecates the
former in favour of ``flwr run``, but ``flwr run``'s local simulation builds a fresh
environment from the package registry on every run (about 46 s here, and impossible
offline, which is how hospitals' machines are).  ``run_simulation`` starts the same
ServerApp and ClientApp, in the same Ray backend, in-process and offline.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from fedtune.checkpoint import atomic_write_text
from fedtune.apps import make_client_app, make_server_app
from fedtune.config import FedtuneConfig
from fedtune.data import load_federated_data
from fedtune.federation.server import ServerSummary
from fedtune.validation import validate, validate_against_data

log = logging.getLogger(__name__)


def check_data(cfg: FedtuneConfig) -> None:
    """Load and partition the data once, before Ray starts, to fail fast on bad input."""
    data = load_federated_data(cfg.data, cfg.federation.num_sites)
    validate_against_data(cfg, [len(s) for s in data.site_indices], data.num_train_records)


def write_resolved_config(cfg: FedtuneConfig, run_dir: Path) -> None:
    from omegaconf import OmegaConf

    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def simulate(cfg: FedtuneConfig) -> ServerSummary:
    """Validate, then run ``cfg.federation.num_sites`` virtual sites to completion."""
    validate(cfg)
    check_data(cfg)
    cfg.run_dir = str(Path(cfg.run_dir or "runs/default").resolve())
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    write_resolved_config(cfg, Path(cfg.run_dir))

    from flwr.simulation import run_simulation

    summaries: list[ServerSummary] = []
    server_app = make_server_app(cfg, on_done=summaries.append)
    client_app = make_client_app(cfg)
    cpus = os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": cfg.federation.cpus_per_site, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": "ERROR",
                      "log_to_driver": True},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.federation.num_sites,
                       backend_config=backend_config)
    if not summaries:
        raise RuntimeError(f"the simulation ended without a result; see the log above and {cfg.run_dir}")
    return summaries[0]
