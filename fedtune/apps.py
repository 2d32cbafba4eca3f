"""Flower's ServerApp and ClientApp for fedtune, built from a config.

In simulation the config object is handed over directly; under ``flwr run`` it
arrives as JSON in the run config (key ``fedtune-config``).  Either way the apps
only route messages to :mod:`fedtune.federation`; there is no second code path.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, TextIO

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedtune.config import FedtuneConfig, from_dict
from fedtune.data import load_federated_data
from fedtune.federation import client as site
from fedtune.federation import protocol, secure_client
from fedtune.federation.server import ServerSummary, run_server
from fedtune.validation import validate

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
                    wait_timeout_s: Optional[float] = None, progress_file: Optional[TextIO] = None) -> ServerApp:
    """fedtune's ServerApp.  ``cfg`` given: a simulation, whose server may hold out a split of the
    pooled data; None: a deployment (``flwr run``), whose config arrives in the run config and
    whose server evaluates only on ``data.eval_path``.  ``progress_file``: where the round table
    and its bar go (default: stdout and stderr)."""
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
                             ledger_path=Path(raw_ledger) if raw_ledger else None,
                             # A config handed over directly is a simulation's, whose data is pooled;
                             # one from the run config is a deployment's, whose server holds no site data.
                             pooled_data=cfg is not None, progress_file=progress_file)
        if on_done is not None:
            on_done(summary)

    return app


def guarded(handler: Callable[[Message, Context], Message], refusal_as_error: bool = False
            ) -> Callable[[Message, Context], Message]:
    """A ClientApp handler whose failures reach the server as fixed codes only.

    The exception (which may quote a record, a label, a path or the site's size) is logged
    on the site, with its traceback; the server gets ``protocol.FAILED_TRAINING`` or the
    refusal's code.  ``refusal_as_error``: answer a refusal with an Error message (for
    messages whose good reply has no status record, such as ``describe``).
    """
    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except protocol.Refusal as refused:
            if not refusal_as_error:
                return site.refusal(msg, refused)
            logging.getLogger(__name__).warning("refusing a %s message: %s", msg.metadata.message_type,
                                                refused.detail)
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=refused.code), reply_to=msg)
        except Exception:  # noqa: BLE001 - the detail stays here; the server learns a fixed code
            logging.getLogger(__name__).exception("the ClientApp failed on a %s message", msg.metadata.message_type)
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=protocol.FAILED_TRAINING),
                           reply_to=msg)

    return run


class SiteRecords:
    """A site's training records, read once per process and kept between messages.

    A simulated site's share is its partition of the pooled data, a function of the data
    config; a deployed site's is its whole file, read again only when the file changes.
    """

    def __init__(self, deployed: Optional["SiteConfig"]) -> None:
        self.deployed = deployed
        self.key: Optional[tuple] = None
        self.value: object = None

    def of(self, context: Context, config: FedtuneConfig) -> list:
        if self.deployed is None:
            key: tuple = (repr(config.data), config.federation.num_sites)
            if key != self.key:
                self.key, self.value = key, load_federated_data(config.data, config.federation.num_sites)
            return site.site_records(context, self.value, config)  # type: ignore[arg-type]
        from fedtune.deploy.site_data import data_files, load_site_records

        key = tuple((str(path), path.stat().st_mtime_ns) for path in data_files(self.deployed))
        if key != self.key:
            self.key, self.value = key, load_site_records(self.deployed)
        return self.value  # type: ignore[return-value]


def make_client_app(cfg: Optional[FedtuneConfig] = None, deployed: Optional["SiteConfig"] = None) -> ClientApp:
    """The site's ClientApp.

    In simulation a site is a partition of the pooled data and takes its budget from the
    shared config.  A deployed site (``deployed`` given, see ``fedtune client``) trains on
    its own data with its own budget, policy and ledger from ``site.yaml``; it takes only
    a declared list of shared settings from the server's run config
    (:mod:`fedtune.deploy.run_config`), never a path, a seed or an interpolation.
    """
    app = ClientApp()
    records = SiteRecords(deployed)
    identity = None
    if deployed is not None:
        from fedtune.deploy.roster import KitIdentity

        identity = KitIdentity(deployed.resolve(deployed.roster), deployed.resolve(deployed.root_certificates),
                               deployed.site_id, deployed.resolve(deployed.auth_private_key))

    def settings_and_config(context: Context) -> tuple[site.SiteSettings, FedtuneConfig]:
        if deployed is None:
            config = config_from_context(context, cfg)
            return site.site_settings(context, config, run_dir_of(config)), config
        from fedtune.deploy.run_config import site_run_config
        from fedtune.deploy.site_data import cohort_budgets, site_num_labels

        config = site_run_config(str(context.run_config.get(RUN_CONFIG_KEY, "") or ""), deployed)
        budget = deployed.budget
        settings = site.SiteSettings(name=deployed.site_id, ledger_path=deployed.resolve(deployed.ledger_path),
                                     budget_epsilon=budget.epsilon, delta=budget.delta,
                                     accountant=budget.accountant, require_privacy=budget.require_privacy,
                                     device=deployed.device, policy=deployed.policy, accept_seed=False,
                                     num_labels=site_num_labels(deployed),
                                     identity=identity.get() if identity is not None else None,
                                     cohorts=cohort_budgets(deployed))
        return settings, config

    @app.query()
    @guarded_describe
    def describe(msg: Message, context: Context) -> Message:
        settings, config = settings_and_config(context)
        if deployed is not None and deployed.manifest.disclose:
            from fedtune.deploy.manifest import site_disclosure

            settings = dataclasses.replace(settings, disclosure=site_disclosure(deployed, records.of(context, config)))
        return site.describe(msg, settings)

    @app.train()
    @guarded
    def train(msg: Message, context: Context) -> Message:
        settings, config = settings_and_config(context)
        logging.getLogger("fedtune").setLevel(config.log_level)
        if protocol.SECAGG in msg.content.config_records:
            stage = msg.content.config_records[protocol.SECAGG].get("stage")
            own = records.of(context, config) if stage == protocol.STAGE_MASK else []
            return secure_client.handle(msg, context, settings, config, own)
        return site.train(msg, settings, config, records.of(context, config))

    return app


def guarded_describe(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    return guarded(handler, refusal_as_error=True)
