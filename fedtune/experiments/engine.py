"""Run one federation for an experiment: in Flower's simulation engine, or in-process.

Both engines run the *same* ServerApp round loop (:func:`fedtune.federation.server.run_server`)
and the *same* ClientApp (:func:`fedtune.apps.make_client_app`); they differ only in how
messages travel.

* ``flower``: :func:`fedtune.simulation.simulate`, Flower's simulation engine on Ray.
  Every run starts and stops a Ray cluster and its actors (each imports torch and
  transformers).  Measured on this project's 2-core machines with the quick-size
  federation (3 sites, 3 rounds of 8 steps): 21–43 s per run, of which the rounds take
  8–12 s; the rest is Ray start-up and shutdown.  A 25-run quick sweep would spend
  most of its 15 minutes starting Ray.
* ``inprocess``: an in-memory Grid that hands each message straight to the ClientApp
  in this process, sites one after another.  No start-up cost; identical results for a
  seeded run (sites are independent within a round and their seeds are derived from
  ``train.seed``, the site name and the round).  The quick sizes use it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedtune.config import FedtuneConfig
from fedtune.experiments.grid import InProcessGrid
from fedtune.federation.server import ServerSummary
from fedtune.validation import validate

log = logging.getLogger(__name__)

ENGINES = ("inprocess", "flower")


def run_inprocess(cfg: FedtuneConfig) -> ServerSummary:
    """:func:`fedtune.simulation.simulate` with the in-process grid instead of Ray."""
    from fedtune.apps import make_client_app
    from fedtune.data.site_count import resolve_num_sites
    from fedtune.federation.server import run_server
    from fedtune.simulation import check_data, write_resolved_config
    from fedtune.tasks import resolve_format

    resolve_format(cfg)
    resolve_num_sites(cfg)
    validate(cfg)
    check_data(cfg)
    run_dir = Path(cfg.run_dir or "runs/default").resolve()
    cfg.run_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(cfg, run_dir)
    grid = InProcessGrid(make_client_app(cfg), cfg.federation.num_sites)
    return run_server(grid, cfg, run_dir, show_progress=False)  # type: ignore[arg-type]


def run_federation(cfg: FedtuneConfig, engine: str) -> ServerSummary:
    if engine == "flower":
        from fedtune.simulation import simulate

        return simulate(cfg)
    if engine == "inprocess":
        return run_inprocess(cfg)
    raise ValueError(f"unknown engine '{engine}'; use one of {', '.join(ENGINES)}")
