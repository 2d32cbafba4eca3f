"""``fedtune init-federation``, ``fedtune server`` and ``fedtune client``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fedtune.config import ConfigError

log = logging.getLogger("fedtune")


def _fail(exc: Exception) -> None:
    print(f"fedtune: {exc}", file=sys.stderr)
    raise SystemExit(2)


def init_federation_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="fedtune init-federation",
        description="Create a federation: a private CA, the SuperLink's TLS certificate and key, and one "
                    "enrolment kit per site (auth key pair, CA certificate, site.yaml template). Private keys "
                    "are written 0600; nothing secret is printed.")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--sites", default="", help="comma-separated site ids, e.g. hospital-a,hospital-b")
    parser.add_argument("--add-sites", default="", help="enrol more sites into an existing federation")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the sites' gateway binds (default 127.0.0.1: only this machine; use "
                             "0.0.0.0 or a public interface for real sites). The SuperLink itself always "
                             "binds 127.0.0.1")
    parser.add_argument("--port", type=int, default=9093, help="port the sites dial (the Fleet gateway)")
    parser.add_argument("--control-port", type=int, default=None,
                        help="the SuperLink's own port, on 127.0.0.1 only (default: --port + 1)")
    parser.add_argument("--tls-host", action="append", default=[],
                        help="extra DNS name or IP the sites dial, put in the certificate (repeatable)")
    parser.add_argument("--name", default="fedtune")
    parser.add_argument("--demo-data", type=int, default=0, metavar="N",
                        help="also write each kit a data.jsonl: its share of N demo records (to try it locally)")
    args = parser.parse_args(argv)
    from fedtune.deploy.federation import add_sites, init_federation, load_federation, write_demo_data

    try:
        if args.add_sites:
            paths = add_sites(args.directory, [s.strip() for s in args.add_sites.split(",") if s.strip()])
        else:
            paths = init_federation(args.directory, [s.strip() for s in args.sites.split(",") if s.strip()],
                                    host=args.host, port=args.port, tls_hosts=args.tls_host, name=args.name,
                                    control_port=args.control_port)
    except ConfigError as exc:
        _fail(exc)
    _, fed = load_federation(paths.root)
    if args.demo_data:
        write_demo_data(paths, fed, demo_records=args.demo_data)
    print(f"Federation '{fed.name}' in {paths.root}")
    print(f"  Sites connect to:  {fed.address} (TLS, certificate for {', '.join(fed.tls_hosts)}; Fleet API only)")
    print(f"  SuperLink:         127.0.0.1:{fed.control_port} (this machine only)")
    print(f"  Run settings:      {paths.server_config}")
    for site in fed.sites:
        print(f"  Site kit {site.site_id:<16} {paths.kit(site.site_id)}  key {site.fingerprint}")
    print("Send each site its kit folder over a channel you trust; keep operator/ca.key offline.")
    print(f"Start the server:  fedtune server --federation {paths.root}")


def server_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="fedtune server",
        description="Start the SuperLink (TLS, node authentication, no runtime installs), enrol the sites' "
                    "keys and run fedtune with `flwr run`. Outputs, checkpoint and server ledger go to DIR/run; "
                    "running it again resumes from the last completed round.")
    parser.add_argument("--federation", type=Path, required=True, help="directory from `fedtune init-federation`")
    parser.add_argument("--config", type=Path, default=None, help="run settings (default DIR/server.yaml)")
    parser.add_argument("--keep-running", action="store_true", help="keep the SuperLink up after the run")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. federation.num_rounds=10")
    args = parser.parse_args(argv)
    from fedtune.deploy.federation import load_federation
    from fedtune.deploy.operator import load_server_config, serve

    try:
        paths, fed = load_federation(args.federation)
        cfg = load_server_config(paths, fed, args.config, args.overrides)
    except ConfigError as exc:
        _fail(exc)
    raise SystemExit(serve(paths, fed, cfg, keep_running=args.keep_running))


def client_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="fedtune client",
        description="Start this site's SuperNode and fedtune executor from its site.yaml. The site's data, "
                    "budget and ledger are its own; it runs only the fedtune version installed here.")
    parser.add_argument("--site-config", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="site.yaml overrides, e.g. budget.epsilon=4")
    args = parser.parse_args(argv)
    from fedtune.deploy.site import run_site
    from fedtune.deploy.site_config import load_site_config

    try:
        site = load_site_config(args.site_config, args.overrides)
    except ConfigError as exc:
        _fail(exc)
    raise SystemExit(run_site(site))
