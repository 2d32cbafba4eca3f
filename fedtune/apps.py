"""Flower's ServerApp and ClientApp for fedtune, built from a config.

In simulation the config object is handed over directly; under ``flwr run`` it
arrives as JSON in the run config (key ``fedtune-config``).  Either way the apps
only route messages to :mod:`fedtune.federation`; there is no second code path.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedtune.config import FedtuneConfig, from_dict, validate
from fedtune.federation import client as site
from fedtune.federation import protocol, secure_client
from fedtune.federation.server import ServerSummary, run_server

if TYPE_CHECKING:
    from fedtune.deploy.site_config import SiteConfig

RUN_CONFIG_KEY = "fedtune-config"
# Deployment only: JSON {node_id: site_id} of the enrolled keys, written by `fedtune server`.
SITES_KEY = "fedtune-sites"
# Deployment only: the federation's server ledger, shared by every run (simulation: in the run dir).
LEDGER_KEY = "fedtune-ledger"


def config_from_context(context: Context, fallback: Optional[FedtuneConfig]) -> FedtuneConfig:
    if fallback is not None:
        return fallback
    raw = context.run_config.get(RUN_CONFIG_KEY, "")
    cfg = from_dict(json.loads(str(raw))) if raw else FedtuneConfig()
    validate(cfg)
    return cfg


def run_dir_of(cfg: FedtuneConfig) -> Path:
    return Path(cfg.run_dir or "runs/default").resolve()


def ensure_logging(level: str) -> None:
    """Make fedtune's log lines visible in Flower's app processes.

    ``flwr-serverapp`` configures only Flower's own logger, so refusals and rejected
    updates logged by fedtune would vanish from an operator's ``flwr run --stream`` /
    SuperLink log without a handler of our own.
    """
    logger = logging.getLogger("fedtune")
    logger.setLevel(level)
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def make_server_app(cfg: Optional[FedtuneConfig] = None,
                    on_done: Optional[Callable[[ServerSummary], None]] = None,
                    wait_timeout_s: Optional[float] = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = config_from_context(context, cfg)
        ensure_logging(config.log_level)
        fed = config.federation
        raw_sites = str(context.run_config.get(SITES_KEY, "") or "")
        enrolled = {int(node): str(site) for node, site in json.loads(raw_sites).items()} if raw_sites else None
        raw_ledger = str(context.run_config.get(LEDGER_KEY, "") or "")
        summary = run_server(grid, config, run_dir_of(config),
                             wait_timeout_s=wait_timeout_s or fed.wait_for_sites_s,
                             round_timeout_s=fed.round_timeout_s, enrolled=enrolled,
                             ledger_path=Path(raw_ledger) if raw_ledger else None)
        if on_done is not None:
            on_done(summary)

    return app


def make_client_app(cfg: Optional[FedtuneConfig] = None, deployed: Optional["SiteConfig"] = None) -> ClientApp:
    """The site's ClientApp.

    In simulation a site is a partition of the pooled data and takes its budget from the
    shared config.  A deployed site (``deployed`` given, see ``fedtune client``) trains on
    its own data with its own budget and ledger from ``site.yaml``; only the shared
    training settings come from the server's run config.
    """
    app = ClientApp()
    records_cache: dict[tuple, list] = {}

    def settings_and_config(context: Context) -> tuple[site.SiteSettings, FedtuneConfig]:
        config = config_from_context(context, cfg)
        if deployed is None:
            return site.site_settings(context, config, run_dir_of(config)), config
        from fedtune.deploy.site_config import apply_site

        config = apply_site(config, deployed)
        budget = deployed.budget
        settings = site.SiteSettings(name=deployed.site_id, ledger_path=deployed.resolve(deployed.ledger_path),
                                     budget_epsilon=budget.epsilon, delta=budget.delta,
                                     accountant=budget.accountant, require_privacy=budget.require_privacy,
                                     device=deployed.device)
        return settings, config

    def records_of(context: Context, config: FedtuneConfig) -> list:
        if deployed is None:
            return site.site_records(context, config)
        from fedtune.data import load_records

        # A deployed site holds all of its own file; the process is warm, so read it once.
        path = Path(str(config.data.path))
        key = (str(path), path.stat().st_mtime_ns, config.data.format, config.data.group_field)
        if key not in records_cache:
            records_cache.clear()
            records_cache[key] = load_records(config.data)
        return records_cache[key]

    @app.query()
    def describe(msg: Message, context: Context) -> Message:
        settings, _ = settings_and_config(context)
        return site.describe(msg, settings)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        settings, config = settings_and_config(context)
        logging.getLogger("fedtune").setLevel(config.log_level)
        if protocol.SECAGG in msg.content.config_records:
            stage = str(msg.content[protocol.SECAGG]["stage"])
            records = records_of(context, config) if stage == protocol.STAGE_MASK else []
            return secure_client.handle(msg, context, settings, config, records)
        return site.train(msg, settings, config, records_of(context, config))

    return app
