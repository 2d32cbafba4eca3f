"""The operator's side: start the SuperLink, enrol the sites' keys, submit the fedtune run.

Under the hood this is exactly Flower's deployment engine, in this order (each command is
logged, and README.md shows them):

1. ``flower-superlink --ssl-certfile … --ssl-keyfile … --ssl-ca-certfile …
   --enable-supernode-auth --disable-runtime-dependency-installation --database …
   --host 127.0.0.1 --port CONTROL_PORT``, and fedtune's Fleet gateway on the address the
   sites dial (see :mod:`fedtune.deploy.gateway` for why)
2. ``flwr supernode register operator/site-keys/<id>.pub fedtune`` for every enrolled site
   (the public key the site sent; the operator never holds a real site's private key)
3. ``flwr run <app> fedtune --run-config run_config.toml --stream``

The run's outputs and checkpoint go to ``DIR/run``; starting the server again on the same
directory resumes from the last completed round.  The server's privacy ledger is the
federation's (``DIR/operator/server_ledger.sqlite``), not the run's: a new run (``DIR/run``
moved away) still counts every charge of the earlier runs toward each site's budget.
The SuperLink and everything it starts run with umask 077, so its database (which holds
plain-mode updates), the ledger and the run's outputs are owner-only.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

from fedtune import __version__
from fedtune.config import FedtuneConfig, load_structured, to_dict
from fedtune.deploy import pki, processes
from fedtune.deploy.federation import Federation, FederationPaths, save_federation, secure_server_state
from fedtune.errors import ConfigError
from fedtune.validation import validate

log = logging.getLogger(__name__)

CONNECTION = "fedtune"
APP_NAME = "fedtune"
PUBLISHER = "fedtune"


def load_server_config(paths: FederationPaths, fed: Federation, config_path: Optional[Path],
                       overrides: list[str]) -> FedtuneConfig:
    """server.yaml (+ overrides), validated before anything starts; outputs go to DIR/run."""
    source = config_path or paths.server_config
    if config_path is not None and not source.is_file():
        raise ConfigError("--config", f"{source} does not exist", "Pass an existing YAML file.")
    cfg = load_structured(FedtuneConfig, *([source] if source.is_file() else []), overrides=overrides)
    cfg.run_dir = str(paths.run_dir)
    if cfg.federation.round_timeout_s is None:
        # Real sites can vanish; never wait forever on one.
        cfg.federation.round_timeout_s = 600.0
    validate(cfg)
    if cfg.train.seed is not None:
        raise ConfigError("train.seed", "a fixed seed makes the sites' DP noise reproducible by anyone who knows it",
                          "Remove train.seed for a deployment (it is for research simulations only).")
    enrolled = len(fed.sites)
    if cfg.federation.num_sites > enrolled:
        raise ConfigError("federation.num_sites", f"{cfg.federation.num_sites} sites asked for but only {enrolled} "
                          "are enrolled", "Lower federation.num_sites or enrol more sites with --add-sites.")
    return cfg


def write_flwr_home(paths: FederationPaths, fed: Federation) -> Path:
    """The ``flwr`` CLI's config: one SuperLink connection named ``fedtune``, verified by our CA."""
    from fedtune.checkpoint import atomic_write_text

    atomic_write_text(paths.flwr_home / "config.toml", (
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "127.0.0.1:{fed.control_port}"\n'
        f'root-certificates = "{paths.superlink_ca}"\n'
    ))
    return paths.flwr_home


def write_app(paths: FederationPaths) -> Path:
    """A minimal Flower app folder (pyproject + the two thin apps) for ``flwr run``.

    Only the operator's own ServerApp runs from it.  Sites never import its code: their
    executor checks the app's id and version and runs the fedtune installed on the site.
    """
    import client.app
    import server.app
    from fedtune.checkpoint import atomic_write_text

    app = paths.app_dir
    for module, folder in ((server.app, "server"), (client.app, "client")):
        (app / folder).mkdir(parents=True, exist_ok=True)
        (app / folder / "__init__.py").touch()
        shutil.copyfile(str(module.__file__), app / folder / "app.py")
    atomic_write_text(app / "pyproject.toml", f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "{__version__}"
description = "fedtune federation run"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "{PUBLISHER}"

[tool.flwr.app.components]
serverapp = "server.app:app"
clientapp = "client.app:app"

[tool.flwr.app.config]
fedtune-config = ""
fedtune-sites = ""
fedtune-ledger = ""
""")
    return app


def write_run_config(paths: FederationPaths, cfg: FedtuneConfig, enrolled: Optional[dict[int, str]] = None) -> Path:
    """The run config for ``flwr run``: the shared settings, which node id is which site, and the ledger.

    The ledger is the federation's, beside the enrolment records, so that every run of the
    federation charges (and checks budgets against) one history per site.
    """
    from fedtune.checkpoint import atomic_write_text

    def literal(payload: str) -> str:
        # A TOML literal string cannot hold a single quote; escape it inside the JSON.
        return "'" + payload.replace("'", "\\u0027") + "'"

    lines = [f"fedtune-config = {literal(json.dumps(to_dict(cfg), sort_keys=True))}"]
    if enrolled:
        lines.append(f"fedtune-sites = {literal(json.dumps({str(k): v for k, v in enrolled.items()}))}")
    lines.append(f"fedtune-ledger = {json.dumps(str(paths.server_ledger))}")  # a JSON string is a TOML basic string
    target = paths.superlink_dir / "run_config.toml"
    atomic_write_text(target, "\n".join(lines) + "\n")
    return target


class SuperLink:
    """A running ``flower-superlink`` for this federation (TLS + node auth, runtime installs off)."""

    def __init__(self, paths: FederationPaths, fed: Federation) -> None:
        self.paths, self.fed = paths, fed
        self.log_path = paths.superlink_dir / "superlink.log"
        self.process: Optional[subprocess.Popen] = None
        self.gateway = None
        with pki.private_umask():
            secure_server_state(paths)
            self.env = processes.flower_env({"FLWR_HOME": str(write_flwr_home(paths, fed))})

    def command(self) -> list[str]:
        p = self.paths
        return [processes.tool("flower-superlink"),
                "--ssl-certfile", str(p.superlink_cert), "--ssl-keyfile", str(p.superlink_key),
                "--ssl-ca-certfile", str(p.superlink_ca),
                "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                "--database", str(p.superlink_dir / "state.db"),
                "--host", "127.0.0.1", "--port", str(self.fed.control_port)]

    def start(self, timeout_s: float = 60.0) -> None:
        """The SuperLink on 127.0.0.1 only, then the Fleet gateway on the address sites dial."""
        from fedtune.deploy.gateway import FleetGateway

        # umask 077: the database (plain-mode updates), and everything the SuperLink's ServerApp writes
        # (run outputs, the federation ledger), is owner-only.
        self.process = processes.start(self.command(), log_path=self.log_path, env=self.env,
                                       umask=pki.PRIVATE_UMASK)
        processes.wait_for_port("127.0.0.1", self.fed.control_port, timeout_s, self.process,
                                "flower-superlink", self.log_path)
        log.info("SuperLink up on 127.0.0.1:%d, reachable from this machine only (pid %d, log %s)",
                 self.fed.control_port, self.process.pid, self.log_path)
        p = self.paths
        self.gateway = FleetGateway(self.fed.superlink_host, self.fed.superlink_port,
                                    f"https://127.0.0.1:{self.fed.control_port}", p.superlink_cert,
                                    p.superlink_key, p.superlink_ca)
        try:
            self.gateway.start()
        except RuntimeError:
            self.stop()
            raise

    def register_sites(self) -> dict[str, int]:
        """Enrol every site's public key; a key registered before (a restart) is fine.

        The key file is written from ``federation.yaml`` (the operator's record of what
        each site sent) when missing, e.g. for a federation made by an older fedtune.
        """
        for site in self.fed.sites:
            key_file = self.paths.site_public_key(site.site_id)
            if not key_file.is_file():
                pki.write_secret(key_file, site.public_key.encode() + b"\n")
            result = processes.run([processes.tool("flwr"), "supernode", "register", str(key_file), CONNECTION,
                                    "--format", "json", "--name", site.site_id], env=self.env)
            try:
                reply = json.loads(result.stdout)
            except json.JSONDecodeError:
                raise RuntimeError(f"`flwr supernode register` failed for {site.site_id}: "
                                   f"{result.stdout}{result.stderr}") from None
            if reply.get("success"):
                site.node_id = int(reply["node-id"])
                log.info("enrolled %s (key %s) as node %s", site.site_id, site.fingerprint, reply["node-id"])
            elif "already in use" in str(reply.get("error-message", "")):
                log.info("%s (key %s) was enrolled before, as node %s", site.site_id, site.fingerprint, site.node_id)
            else:
                raise RuntimeError(f"could not enrol {site.site_id}: {reply.get('error-message')}")
        save_federation(self.paths, self.fed)

    def submit(self, cfg: FedtuneConfig, stream: bool = True) -> subprocess.Popen:
        """``flwr run`` the fedtune app with ``cfg``; returns the (streaming) flwr process."""
        with pki.private_umask():
            app = write_app(self.paths)
        known = {s.node_id: s.site_id for s in self.fed.sites if s.node_id is not None}
        if len(known) < len(self.fed.sites):
            log.warning("node ids of %d enrolled site(s) are unknown (enrolled outside fedtune?); the server will "
                        "not check which node speaks for which site", len(self.fed.sites) - len(known))
            known = {}
        run_config = write_run_config(self.paths, cfg, known)
        command = [processes.tool("flwr"), "run", str(app), CONNECTION, "--run-config", str(run_config)]
        if stream:
            command.append("--stream")
        return processes.start(command, env=self.env, new_session=False, umask=pki.PRIVATE_UMASK)

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        if self.process is not None:
            processes.stop(self.process)
            log.info("SuperLink stopped")


def serve(paths: FederationPaths, fed: Federation, cfg: FedtuneConfig, keep_running: bool = False) -> int:
    """Start the SuperLink, enrol the sites, run fedtune to completion; returns an exit code.

    Runs under umask 077 so that everything the operator's process writes is owner-only.
    """
    held = [s.site_id for s in fed.sites if s.operator_holds_key]
    if held:
        log.warning("the keys of %s were generated with --demo-keys: this directory holds their private keys, so "
                    "whoever holds it can act as them. Fine for a try-out, never for real sites.", ", ".join(held))
    with pki.private_umask():
        secure_server_state(paths)
        return _serve(paths, fed, cfg, keep_running)


def _failure(summary: Path) -> Optional[str]:
    """The run's ``failed`` line from its summary.json, or why it is unreadable.

    Null: it trained, or (versions.on_new_cohort) it chose not to.
    """
    try:
        body = json.loads(summary.read_text())
        failed = body.get("failed")
    except (OSError, ValueError, AttributeError):
        return f"{summary} is not a readable summary"
    if failed is None and body.get("skipped"):
        log.info("no version trained: %s", body.get("stop_reason"))
    return None if failed is None else str(failed)


def _serve(paths: FederationPaths, fed: Federation, cfg: FedtuneConfig, keep_running: bool) -> int:
    from fedtune.simulation import write_resolved_config

    paths.run_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(cfg, paths.run_dir)
    superlink = SuperLink(paths, fed)
    superlink.start()
    try:
        superlink.register_sites()
        started = time.monotonic()
        runner = superlink.submit(cfg)
        submitted = time.time()
        code = runner.wait()
        summary = paths.run_dir / "summary.json"
        # `flwr run --stream` exits 0 even when the ServerApp raised: the run only counts as
        # finished if it wrote its summary.
        if code == 0 and summary.exists() and summary.stat().st_mtime >= submitted - 1:
            failed = _failure(summary)
            if failed is None:
                log.info("run finished in %.0f s; outputs in %s", time.monotonic() - started, paths.run_dir)
            else:
                log.error("the run trained nothing: %s; outputs in %s", failed, paths.run_dir)
                code = 1
        else:
            log.error("the run did not finish (`flwr run` exit code %d, no new %s); see the log above and %s",
                      code, summary.name, superlink.log_path)
            code = code or 1
        if keep_running:
            log.info("keeping the SuperLink running (Ctrl-C to stop)")
            superlink.process.wait()  # type: ignore[union-attr]
        return code
    finally:
        superlink.stop()
