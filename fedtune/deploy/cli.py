"""``fedtune init-federation``, ``fedtune server`` and ``fedtune client``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fedtune.data.records import DataError
from fedtune.errors import ConfigError

log = logging.getLogger("fedtune")


def _fail(exc: Exception) -> None:
    print(f"fedtune: {exc}", file=sys.stderr)
    raise SystemExit(2)


def _init_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune init-federation",
        description="Create a federation: a private CA, the SuperLink's TLS certificate and key, and one "
                    "enrolment kit per site (CA certificate and site.yaml template). Each site makes its own key "
                    "pair with `fedtune client keygen` and sends you only auth.pub: you enrol that public key, "
                    "and no kit holds a private key. Private state is written owner-only; nothing secret is printed.")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--site", action="append", default=[], metavar="SITE_ID=PUBKEY",
                        help="a site and the auth.pub it sent you, e.g. hosp-a=keys/hosp-a.pub (repeatable)")
    parser.add_argument("--site-keys", type=Path, default=None, metavar="DIR",
                        help="a folder of <site-id>.pub files, one per site")
    parser.add_argument("--sites", default="", metavar="IDS",
                        help="with --demo-keys only: comma-separated ids of demo sites, e.g. hosp-a,hosp-b,hosp-c")
    parser.add_argument("--demo-keys", action="store_true",
                        help="for a one-machine try-out: generate the --sites' key pairs into their kits. You then "
                             "hold their private keys and can act as them: never for real sites")
    parser.add_argument("--add-sites", nargs="?", const="", default=None, metavar="IDS",
                        help="enrol more sites (given by --site/--site-keys, or demo ids here with --demo-keys) "
                             "into an existing federation")
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
    return parser


def _enrolment(args: argparse.Namespace) -> tuple[dict[str, bytes], list[str]]:
    """The sites' public keys and the demo sites, from the flags; demo ids need --demo-keys."""
    from fedtune.deploy.federation import KEYGEN_HINT, read_site_keys

    ids = args.add_sites if args.add_sites else args.sites
    demo_sites = [s.strip() for s in ids.split(",") if s.strip()]
    flag = "--add-sites" if args.add_sites else "--sites"
    if demo_sites and not args.demo_keys:
        raise ConfigError(flag, f"names sites ({', '.join(demo_sites)}) but gives none of their public keys",
                          KEYGEN_HINT + " Only for a one-machine try-out, add --demo-keys to generate their keys "
                          "here (you would then hold them).")
    if args.demo_keys and not demo_sites:
        raise ConfigError("--demo-keys", "names no demo site", "List them: --sites hosp-a,hosp-b --demo-keys.")
    return read_site_keys(args.site, args.site_keys), demo_sites


def init_federation_main(argv: list[str]) -> None:
    args = _init_parser().parse_args(argv)
    from fedtune.deploy.federation import add_sites, init_federation, load_federation, write_demo_data

    try:
        site_keys, demo_sites = _enrolment(args)
        if args.add_sites is not None:
            paths = add_sites(args.directory, site_keys, demo_sites=demo_sites)
        else:
            paths = init_federation(args.directory, site_keys, host=args.host, port=args.port,
                                    tls_hosts=args.tls_host, name=args.name, control_port=args.control_port,
                                    demo_sites=demo_sites)
    except ConfigError as exc:
        _fail(exc)
    _, fed = load_federation(paths.root)
    if args.demo_data:
        write_demo_data(paths, fed, demo_records=args.demo_data)
    print(f"Federation '{fed.name}' in {paths.root}")
    print(f"  Sites connect to:  {fed.address} (TLS, certificate for {', '.join(fed.tls_hosts)}; Fleet API only)")
    print(f"  SuperLink:         127.0.0.1:{fed.control_port} (this machine only)")
    print(f"  Run settings:      {paths.server_config}")
    print(f"  Privacy ledger:    {paths.server_ledger} (the server's, shared by every run of this federation)")
    for site in fed.sites:
        held = "  DEMO KEY (you hold its private key)" if site.operator_holds_key else ""
        print(f"  Site kit {site.site_id:<16} {paths.kit(site.site_id)}  key {site.fingerprint}{held}")
    if any(not s.operator_holds_key for s in fed.sites):
        print("Before `fedtune server` enrols them, check each fingerprint against the one the site's "
              "`fedtune client keygen` printed (over the phone or another channel you trust): a wrong key would "
              "let someone else act as that site.")
    print("Send each site its kit folder (ca.crt, site.yaml: no private key); the site puts it beside its auth.key. "
          "Keep operator/ca.key offline.")
    print(f"Start the server:  fedtune server --federation {paths.root}")


def keygen_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="fedtune client keygen",
        description="Make this site's authentication key pair: DIR/auth.key (0600, never leaves the site) and "
                    "DIR/auth.pub (send it to the federation operator). Never overwrites a key.")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="the site's folder: where its site.yaml and ledger will live")
    args = parser.parse_args(argv)
    from fedtune.deploy import pki

    try:
        private, public, fingerprint = pki.write_site_keypair(args.out.expanduser())
    except FileExistsError as exc:
        _fail(ConfigError("--out", f"{exc.args[0]} already exists: it is this site's enrolled identity",
                          "Keep using it. To replace it, move it away first and send the operator the new auth.pub."))
    print(f"Private key:  {private}  (0600: never send it to anyone, the operator included)")
    print(f"Public key:   {public}")
    print(f"Fingerprint:  {fingerprint}")
    print("Send auth.pub and your site id to the federation operator, and read them the fingerprint over another "
          "channel (phone) so they can check it. They enrol it with:")
    print("  fedtune init-federation FED --site SITE_ID=path/to/auth.pub   (or --add-sites --site ...)")
    print(f"Put the kit they send back (ca.crt, site.yaml) in {private.parent}, then start with:")
    print(f"  fedtune client --site-config {private.parent / 'site.yaml'}")


def server_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="fedtune server",
        description="Start the SuperLink (TLS, node authentication, no runtime installs), enrol the sites' "
                    "keys and run fedtune with `flwr run`. Outputs and checkpoint go to DIR/run (running it again "
                    "resumes from the last completed round); the server's privacy ledger is "
                    "DIR/operator/server_ledger.sqlite, so every run of the federation counts toward a site's budget.")
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
    if cfg.versions.every_hours is None:
        raise SystemExit(serve(paths, fed, cfg, keep_running=args.keep_running))
    from fedtune.deploy.schedule import run_on_schedule

    raise SystemExit(run_on_schedule(lambda: serve(paths, fed, cfg), cfg.versions.every_hours))


def fingerprint_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="fedtune client fingerprint",
        description="Print the base-model fingerprint of this site's model copy (site.yaml model_path, or the "
                    "built-in tiny model), to pin it as policy.expected_base_fingerprint. The server logs the "
                    "fingerprint of its own copy when a run starts; the two must match.")
    parser.add_argument("--site-config", type=Path, required=True)
    parser.add_argument("overrides", nargs="*",
                        help="the run's model settings if not the defaults, e.g. model.task=classification "
                             "model.num_labels=2 (the classification head is part of the base model)")
    args = parser.parse_args(argv)
    from fedtune.config import FedtuneConfig, load_structured
    from fedtune.deploy.run_config import use_site_model
    from fedtune.deploy.site_config import load_site_config
    from fedtune.models import build_fingerprinted_model
    from fedtune.validation import validate

    try:
        site = load_site_config(args.site_config)
        cfg = load_structured(FedtuneConfig, overrides=args.overrides)
        use_site_model(cfg, site)
        cfg.secagg.enabled = False
        validate(cfg)
    except ConfigError as exc:
        _fail(exc)
    print(build_fingerprinted_model(cfg.model).fingerprint)


def client_main(argv: list[str]) -> None:
    if argv[:1] == ["keygen"]:
        keygen_main(argv[1:])
        return
    if argv[:1] == ["fingerprint"]:
        fingerprint_main(argv[1:])
        return
    parser = argparse.ArgumentParser(
        prog="fedtune client",
        description="Start this site's SuperNode and fedtune executor from its site.yaml. The site's data, "
                    "budget and ledger are its own; it runs only the fedtune version installed here. "
                    "First make the site's key pair: `fedtune client keygen --out DIR`.")
    parser.add_argument("--site-config", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="site.yaml overrides, e.g. budget.epsilon=4")
    args = parser.parse_args(argv)
    from fedtune.deploy.site import run_site
    from fedtune.deploy.site_config import load_site_config

    try:
        site = load_site_config(args.site_config, args.overrides)
        code = run_site(site)
    except (ConfigError, DataError) as exc:
        _fail(exc)
    raise SystemExit(code)
