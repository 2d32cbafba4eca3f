"""The operator's federation directory: what ``fedtune init-federation`` writes.

Layout (``DIR``)::

    federation.yaml          enrolled sites (id, public key, fingerprint), SuperLink address
    server.yaml              the run's shared settings (a fedtune config; edit before `fedtune server`)
    operator/ca.crt, ca.key  the federation's private CA (ca.key never leaves the operator)
    superlink/               the SuperLink's TLS certificate and key, its state and log
    sites/<site-id>/         one enrolment kit per site: auth.key, auth.pub, ca.crt, site.yaml
    run/                     the run's outputs, checkpoint and server ledger (same files as a simulation)

Each kit folder is what the operator hands to one site (over a channel they trust):
the site's authentication key pair, the CA certificate to verify the SuperLink, and a
``site.yaml`` template whose budget and data path the site fills in itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fedtune.config import ConfigError
from fedtune.deploy import pki
from fedtune.deploy.site_config import is_site_id

log = logging.getLogger(__name__)

FEDERATION_FILE = "federation.yaml"
SERVER_FILE = "server.yaml"
DEFAULT_PORT = 9093
WILDCARDS = ("0.0.0.0", "::", "")


@dataclass
class EnrolledSite:
    site_id: str
    public_key: str
    fingerprint: str
    # The SuperLink's node id for this key, recorded when `fedtune server` first enrols it.
    node_id: Optional[int] = None


@dataclass
class Federation:
    name: str = "fedtune"
    # Where sites connect: fedtune's Fleet gateway (TLS; only the Fleet API is forwarded).
    superlink_host: str = "127.0.0.1"
    superlink_port: int = DEFAULT_PORT
    # The SuperLink itself (Fleet + Control + Runtime APIs): always 127.0.0.1, operator only.
    control_port: int = DEFAULT_PORT + 1
    # Names/IPs in the SuperLink certificate (every address the sites dial).
    tls_hosts: list[str] = field(default_factory=lambda: ["127.0.0.1", "localhost"])
    sites: list[EnrolledSite] = field(default_factory=list)

    @property
    def address(self) -> str:
        """What sites dial: the bind host, or the first certificate name when binding all interfaces."""
        host = self.superlink_host
        if host in WILDCARDS:
            host = next((h for h in self.tls_hosts if h not in ("127.0.0.1", "localhost")), "127.0.0.1")
        return f"{host}:{self.superlink_port}"


@dataclass(frozen=True)
class FederationPaths:
    root: Path

    @property
    def federation_file(self) -> Path:
        return self.root / FEDERATION_FILE

    @property
    def server_config(self) -> Path:
        return self.root / SERVER_FILE

    @property
    def ca_cert(self) -> Path:
        return self.root / "operator" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "operator" / "ca.key"

    @property
    def superlink_dir(self) -> Path:
        return self.root / "superlink"

    @property
    def superlink_cert(self) -> Path:
        return self.superlink_dir / "superlink.crt"

    @property
    def superlink_key(self) -> Path:
        return self.superlink_dir / "superlink.key"

    @property
    def superlink_ca(self) -> Path:
        return self.superlink_dir / "ca.crt"

    @property
    def flwr_home(self) -> Path:
        return self.superlink_dir / "flwr-home"

    def kit(self, site_id: str) -> Path:
        return self.root / "sites" / site_id

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def app_dir(self) -> Path:
        return self.superlink_dir / "app"


def _site_yaml(site_id: str, address: str, port_offset: int) -> str:
    return f"""# fedtune site configuration for {site_id}.
# Everything here is this site's own: the server never sends or overrides it.
# Relative paths are relative to this file.  Start with:
#   fedtune client --site-config site.yaml
site_id: {site_id}
superlink: {address}
root_certificates: ca.crt          # the federation CA: the only certificate this site trusts
auth_private_key: auth.key         # this site's enrolment key (keep it 0600, never share it)
data:
  path: data.jsonl                 # your training data (JSONL: text, or prompt/response)
  format: auto
  group_field: source
budget:
  epsilon: 8.0                     # your (ε, δ) budget over the whole federation
  delta: 1.0e-05
  accountant: rdp
  require_privacy: true            # refuse any round that is not DP-SGD
ledger_path: ledger.sqlite         # your privacy ledger: keep it, it is your budget's memory
model_path: null                   # local copy of the base model when the federation uses one
device: cpu
torch_threads: 1
runtime_port: {9100 + port_offset}                 # local only (127.0.0.1): SuperNode <-> fedtune executor
state_dir: state
app:
  publisher: fedtune
  name: fedtune
  version: null                    # null: the fedtune version installed here
"""


SERVER_TEMPLATE = """# The federation's shared run settings (a fedtune config, as in configs/).
# Sites' budgets and data are their own (site.yaml); privacy.target_epsilon here is only
# the default for sites that do not report one.
federation:
  num_sites: {num_sites}
  num_rounds: 5
secagg:
  enabled: true
"""


def save_federation(paths: FederationPaths, fed: Federation) -> None:
    from omegaconf import OmegaConf

    from fedtune.checkpoint import atomic_write_text

    atomic_write_text(paths.federation_file, OmegaConf.to_yaml(OmegaConf.structured(fed)))


def load_federation(root: str | Path) -> tuple[FederationPaths, Federation]:
    from omegaconf import OmegaConf

    paths = FederationPaths(Path(root).expanduser().resolve())
    if not paths.federation_file.is_file():
        raise ConfigError("--federation", f"{paths.root} has no {FEDERATION_FILE}",
                          "Create the federation first: fedtune init-federation DIR --sites a,b,c")
    merged = OmegaConf.merge(OmegaConf.structured(Federation), OmegaConf.load(paths.federation_file))
    return paths, OmegaConf.to_object(merged)  # type: ignore[return-value]


def _check_site_ids(site_ids: list[str]) -> None:
    if not site_ids:
        raise ConfigError("--sites", "no site named", "Name the sites, e.g. --sites hospital-a,hospital-b")
    for site_id in site_ids:
        if not is_site_id(site_id):
            raise ConfigError("--sites", f"{site_id!r} is not a valid site id",
                              "Use letters, digits, '-', '_' or '.', e.g. hospital-a.")
    if len(set(site_ids)) != len(site_ids):
        raise ConfigError("--sites", "a site id appears twice", "Give every site its own id.")


def init_federation(root: str | Path, site_ids: list[str], host: str = "127.0.0.1",
                    port: int = DEFAULT_PORT, tls_hosts: Optional[list[str]] = None,
                    name: str = "fedtune", control_port: Optional[int] = None) -> FederationPaths:
    """Create the CA, the SuperLink's certificate and one enrolment kit per site."""
    _check_site_ids(site_ids)
    paths = FederationPaths(Path(root).expanduser().resolve())
    if paths.federation_file.exists():
        raise ConfigError("DIR", f"{paths.root} already holds a federation",
                          "Use a new directory, or `fedtune init-federation DIR --add-sites ...` to enrol more sites.")
    if not 1 <= port <= 65535:
        raise ConfigError("--port", f"{port} is not a TCP port", "Use e.g. 9093.")
    control_port = port + 1 if control_port is None else control_port
    if not 1 <= control_port <= 65535 or control_port == port:
        raise ConfigError("--control-port", f"{control_port} is not a TCP port other than --port {port}",
                          "Use a free local port, e.g. 9094.")
    hosts = [h for h in dict.fromkeys([host, *(tls_hosts or []), "127.0.0.1", "localhost"]) if h not in WILDCARDS]
    if host in WILDCARDS and not tls_hosts:
        raise ConfigError("--tls-host", f"--host {host} listens on every interface but names no address for the sites",
                          "Add --tls-host with the DNS name or IP the sites will dial, e.g. --tls-host fl.example.org.")
    ca = pki.CertificateAuthority.create(name)
    pki.write_secret(paths.ca_key, ca.key_pem())
    pki.write_public(paths.ca_cert, ca.cert_pem())
    cert, key = ca.issue_server_cert(hosts)
    pki.write_public(paths.superlink_cert, cert)
    pki.write_secret(paths.superlink_key, key)
    pki.write_public(paths.superlink_ca, ca.cert_pem())
    fed = Federation(name=name, superlink_host=host, superlink_port=port, control_port=control_port,
                     tls_hosts=hosts)
    _enrol(paths, fed, ca, site_ids)
    from fedtune.checkpoint import atomic_write_text

    atomic_write_text(paths.server_config, SERVER_TEMPLATE.format(num_sites=len(site_ids)))
    log.info("federation %s created in %s with %d site kit(s)", name, paths.root, len(site_ids))
    return paths


def add_sites(root: str | Path, site_ids: list[str]) -> FederationPaths:
    """Enrol more sites into an existing federation (new kits, same CA)."""
    _check_site_ids(site_ids)
    paths, fed = load_federation(root)
    existing = {s.site_id for s in fed.sites}
    clash = sorted(existing & set(site_ids))
    if clash:
        raise ConfigError("--add-sites", f"already enrolled: {', '.join(clash)}", "Choose new site ids.")
    ca = pki.CertificateAuthority.load(paths.ca_cert, paths.ca_key)
    _enrol(paths, fed, ca, site_ids)
    return paths


def _enrol(paths: FederationPaths, fed: Federation, ca: pki.CertificateAuthority, site_ids: list[str]) -> None:
    from fedtune.checkpoint import atomic_write_text

    for site_id in site_ids:
        kit = paths.kit(site_id)
        private, public = pki.node_auth_keypair()
        pki.write_secret(kit / "auth.key", private)
        pki.write_public(kit / "auth.pub", public)
        pki.write_public(kit / "ca.crt", ca.cert_pem())
        atomic_write_text(kit / "site.yaml", _site_yaml(site_id, fed.address, len(fed.sites)))
        fed.sites.append(EnrolledSite(site_id=site_id, public_key=public.decode().strip(),
                                      fingerprint=pki.public_key_fingerprint(public)))
    save_federation(paths, fed)


def write_demo_data(paths: FederationPaths, fed: Federation, demo_records: int = 6000, seed: int = 0) -> None:
    """Give every kit a ``data.jsonl``: its Dirichlet share of the built-in demo corpus.

    For trying a deployment on one machine; real sites point ``data.path`` at their own file.
    """
    import json

    from fedtune.checkpoint import atomic_write_text
    from fedtune.config import DataConfig
    from fedtune.data import load_federated_data

    data = load_federated_data(DataConfig(demo_records=demo_records, seed=seed), len(fed.sites))
    for index, site in enumerate(fed.sites):
        lines = [json.dumps({"prompt": r.prompt, "response": r.response, "source": r.group})
                 for r in data.site_records(index)]
        atomic_write_text(paths.kit(site.site_id) / "data.jsonl", "\n".join(lines) + "\n")
