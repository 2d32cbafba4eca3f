"""A site's side: ``fedtune client --site-config site.yaml``.

Starts Flower's SuperNode with the site's enrolment kit, in ``--isolation process``
mode, bound to 127.0.0.1 for its local Runtime API, and runs fedtune's own executor
(:mod:`fedtune.deploy.executor`) beside it.  The Flower command underneath is::

    flower-supernode --superlink HOST:PORT --root-certificates ca.crt \\
        --auth-supernode-private-key auth.key --isolation process \\
        --host 127.0.0.1 --port RUNTIME_PORT --superexec-auth-secret-file state/superexec.secret

No ``--allow-runtime-dependency-installation``: a site never installs packages because
a server asked.  Stopping the client (SIGINT/SIGTERM) stops both, and so does killing it
(the SuperNode shares its process group and is signalled when its parent dies); a
SuperNode that exits on its own (SuperLink unreachable, key not yet enrolled) is
restarted with backoff.
"""

from __future__ import annotations

import logging
import secrets
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from fedtune import __version__
from fedtune.deploy import pki, processes
from fedtune.deploy.executor import AppPin, SiteExecutor
from fedtune.deploy.site_config import SiteConfig
from fedtune.deploy.site_data import data_files, load_site_records

log = logging.getLogger(__name__)


def supernode_command(site: SiteConfig, secret_file: Path) -> list[str]:
    # `flower-supernode` itself, via a launcher that only shortens its idle poll (see
    # fedtune.deploy.supernode for why).
    return [sys.executable, "-m", "fedtune.deploy.supernode",
            "--superlink", site.superlink,
            "--root-certificates", str(site.resolve(site.root_certificates)),
            "--auth-supernode-private-key", str(site.resolve(site.auth_private_key)),
            "--isolation", "process",
            "--host", "127.0.0.1", "--port", str(site.runtime_port),
            "--superexec-auth-secret-file", str(secret_file)]


def app_pin(site: SiteConfig) -> AppPin:
    return AppPin(site.app.publisher, site.app.name, site.app.version or __version__)


def run_site(site: SiteConfig, stop_event: Optional[threading.Event] = None) -> int:
    """Run this site's SuperNode and executor until stopped; returns an exit code."""
    from fedtune.apps import make_client_app

    state = site.resolve(site.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    # A fresh secret per start: only this process may claim the SuperNode's tasks.
    secret_file = state / "superexec.secret"
    pki.write_secret(secret_file, secrets.token_bytes(32))
    auth_secret = secret_file.read_bytes()

    # Data checks (δ against the record count, labels against the declared classes) run
    # now, before the site can be asked for a round: see fedtune.deploy.site_data.
    records = load_site_records(site)
    if "cohorts" in site.manifest.disclose:
        from fedtune.deploy.manifest import commitment_key

        commitment_key(site)  # made now (0600), so a bad key file stops the site here, not in a round
    pin = app_pin(site)
    log.info("site %s: budget ε=%g δ=%g, ledger %s, data %s (%d records, %d cohorts); runs only %s==%s",
             site.site_id, site.budget.epsilon, site.budget.delta, site.resolve(site.ledger_path),
             ", ".join(map(str, data_files(site))), len(records), len(site.data.cohorts), pin.fab_id, pin.version)
    executor = SiteExecutor(f"127.0.0.1:{site.runtime_port}", make_client_app(deployed=site), pin,
                            auth_secret=auth_secret, idle_poll_s=site.poll_interval_s)
    stop = stop_event or threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("site %s: stopping (signal %d)", site.site_id, signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)

    supervisor = threading.Thread(target=_supervise, args=(site, secret_file, state, stop), daemon=True)
    supervisor.start()
    executor.stop_event = stop
    try:
        executor.serve_forever()
    finally:
        stop.set()
        supervisor.join(timeout=30)
    return 0


def _supervise(site: SiteConfig, secret_file: Path, state: Path, stop: threading.Event) -> None:
    """Keep the SuperNode running until ``stop``.

    Flower's SuperNode exits when the SuperLink refuses to activate it (the operator has
    not enrolled the key yet, or the SuperLink is restarting) or stays unreachable; a
    hospital's client should not need a human to restart it then.  Restart with backoff.
    """
    log_path = state / "supernode.log"
    env = processes.flower_env({"FEDTUNE_SUPERNODE_POLL_S": str(site.poll_interval_s)})
    backoff = 2.0
    while not stop.is_set():
        started = time.monotonic()
        supernode = processes.start(supernode_command(site, secret_file), log_path=log_path, env=env)
        while supernode.poll() is None and not stop.is_set():
            stop.wait(0.5)
        if stop.is_set():
            processes.stop(supernode)
            return
        if time.monotonic() - started > 60:
            backoff = 2.0
        log.warning("site %s: the SuperNode exited with code %s (SuperLink unreachable or this site not "
                    "enrolled yet?); restarting in %.0f s. Details: %s", site.site_id, supernode.returncode,
                    backoff, log_path)
        stop.wait(backoff)
        # The SuperLink re-admits a crashed site's key ~20 s after its last heartbeat.
        backoff = min(10.0, backoff * 2)
