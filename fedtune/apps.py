"""Flower's ServerApp and ClientApp for fedtune, built from a config.

In simulation the config object is handed over directly; under ``flwr run`` it
arrives as JSON in the run config (key ``fedtune-config``).  Either way the apps
only route messages to :mod:`fedtune.federation`; there is no second code path.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedtune.config import FedtuneConfig, from_dict, validate
from fedtune.federation import client as site
from fedtune.federation import protocol, secure_client
from fedtune.federation.server import ServerSummary, run_server

RUN_CONFIG_KEY = "fedtune-config"


def config_from_context(context: Context, fallback: Optional[FedtuneConfig]) -> FedtuneConfig:
    if fallback is not None:
        return fallback
    raw = context.run_config.get(RUN_CONFIG_KEY, "")
    cfg = from_dict(json.loads(str(raw))) if raw else FedtuneConfig()
    validate(cfg)
    return cfg


def run_dir_of(cfg: FedtuneConfig) -> Path:
    return Path(cfg.run_dir or "runs/default").resolve()


def make_server_app(cfg: Optional[FedtuneConfig] = None,
                    on_done: Optional[Callable[[ServerSummary], None]] = None,
                    wait_timeout_s: float = 120.0) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = config_from_context(context, cfg)
        summary = run_server(grid, config, run_dir_of(config), wait_timeout_s=wait_timeout_s)
        if on_done is not None:
            on_done(summary)

    return app


def make_client_app(cfg: Optional[FedtuneConfig] = None) -> ClientApp:
    app = ClientApp()

    @app.query()
    def describe(msg: Message, context: Context) -> Message:
        config = config_from_context(context, cfg)
        return site.describe(msg, site.site_settings(context, config, run_dir_of(config)))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = config_from_context(context, cfg)
        settings = site.site_settings(context, config, run_dir_of(config))
        logging.getLogger("fedtune").setLevel(config.log_level)
        if protocol.SECAGG in msg.content.config_records:
            stage = str(msg.content[protocol.SECAGG]["stage"])
            records = site.site_records(context, config) if stage == protocol.STAGE_MASK else []
            return secure_client.handle(msg, context, settings, config, records)
        return site.train(msg, settings, config, site.site_records(context, config))

    return app
