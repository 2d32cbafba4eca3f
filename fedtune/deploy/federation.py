"""The operator's federation directory: what ``fedtune init-federation`` writes.

Layout (``DIR``)::

    federation.yaml          enrolled sites (id, public key, fingerprint), SuperLink address
    server.yaml              the run's shared settings (a fedtune config; edit before `fedtune server`)
    operator/ca.crt, ca.key  the federation's private CA (ca.key never leaves the operator)
    operator/site-keys/      the public key each site sent (what `flwr supernode register` enrols)
    operator/server_ledger.sqlite   the server's privacy ledger, shared by every run of the federation
    superlink/               the SuperLink's TLS certificate and key, its state and log
    sites/<site-id>/         one enrolment kit per site: ca.crt, site.yaml (no private key)
    run/                     the run's outputs and checkpoint (same files as a simulation)

A site makes its own authentication key pair (``fedtune client keygen``) and sends the
operator only the public half, so the operator cannot impersonate it.  Each kit folder is
what the operator hands back to that site (over a channel they trust): the CA certificate
to verify the SuperLink and a ``site.yaml`` template whose budget and data path the site
fills in itself.  ``--demo-keys`` (a one-machine try-out only) has the operator generate
the sites' keys into their kits instead.

Everything under ``operator/``, ``superlink/`` and ``run/`` is owner-only (files 0600,
directories 0700; certificates stay readable): the SuperLink's database holds plain-mode
updates, and the ledgers and run outputs are the operator's alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

from fedtune.config import load_structured
from fedtune.deploy import pki
from fedtune.deploy.site_config import is_site_id
from fedtune.errors import ConfigError

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
    # True for --demo-keys: the operator generated (and so holds) this site's private key.
    operator_holds_key: bool = False


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
    def operator_dir(self) -> Path:
        return self.root / "operator"

    def site_public_key(self, site_id: str) -> Path:
        return self.operator_dir / "site-keys" / f"{site_id}.pub"

    @property
    def server_ledger(self) -> Path:
        """The server's privacy ledger: one per federation, so a new run remembers every earlier run's charges."""
        return self.operator_dir / "server_ledger.sqlite"

    @property
    def private_dirs(self) -> tuple[Path, ...]:
        """The operator's private state: owner-only (the SuperLink's database holds plain-mode updates)."""
        return self.operator_dir, self.superlink_dir, self.run_dir

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


_OWN_KEY_NOTE = """# auth_private_key: the key this site made itself with `fedtune client keygen` (its auth.pub
# is what the operator enrolled).  Put this kit's files beside it, or give its path here.
# Keep it 0600 and never send it to anyone, the operator included."""
_DEMO_KEY_NOTE = """# DEMO KEY: the operator generated auth.key for this try-out and holds a copy, so it can act
# as this site.  A real site runs `fedtune client keygen` and sends the operator only auth.pub."""


def _site_yaml(site_id: str, address: str, port_offset: int, demo_key: bool = False) -> str:
    return f"""# fedtune site configuration for {site_id}.
# Everything here is this site's own: the server never sends or overrides it.
# Relative paths are relative to this file.  Start with:
#   fedtune client --site-config site.yaml
{_DEMO_KEY_NOTE if demo_key else _OWN_KEY_NOTE}
site_id: {site_id}
superlink: {address}
root_certificates: ca.crt          # the federation CA: the only certificate this site trusts
auth_private_key: {pki.SITE_PRIVATE_KEY}         # this site's own enrolment key (see above)
roster: roster.json                # the enrolled sites' keys, signed by the CA (secure aggregation checks them)
data:
  path: data.jsonl                 # your training data (JSONL: text, or prompt/response)
  format: auto
  group_field: source
  label_field: label               # labelled data only: the class field, and your classes
  label_names: null                #   as names in class order, or
  num_labels: null                 #   as a count of integer labels 0..N-1
budget:
  epsilon: 8.0                     # your (ε, δ) budget over the whole federation
  delta: 1.0e-05
  accountant: rdp
  require_privacy: true            # refuse any round that is not DP-SGD
ledger_path: ledger.sqlite         # your privacy ledger: keep it (and back it up), it is your budget's memory
model_path: null                   # your copy of the federation's base model; null: the built-in tiny model
model_gguf_file: null              # a GGUF checkpoint inside model_path (converted once, cached); null: none
model_cache_dir: null              # where converted GGUF weights are kept; null: ~/.cache/fedtune/gguf
model_gradient_checkpointing: false  # recompute activations in backward: less memory, same gradients
model_quantization: null           # 4bit: keep your base copy in NF4 (QLoRA, needs bitsandbytes); null: full precision
policy:                            # the rounds you accept, whatever the server asks
  min_noise_multiplier: 0.3        # least DP-SGD noise σ
  max_sample_rate: 0.5             # largest Poisson sampling rate q
  max_local_steps: 1000            # most DP-SGD steps in one round
  require_secure_aggregation: true # never send an unmasked update
  min_other_sites: 2               # least number of other sites in the masked sum
  expected_base_fingerprint: null  # pin the base model (`fedtune client fingerprint`); null: your copy's
  max_adapter_value: 10000.0       # a larger entry in the global adapter is refused
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
    paths = FederationPaths(Path(root).expanduser().resolve())
    if not paths.federation_file.is_file():
        raise ConfigError("--federation", f"{paths.root} has no {FEDERATION_FILE}",
                          "Create the federation first: fedtune init-federation DIR --site SITE_ID=path/to/auth.pub ...")
    return paths, load_structured(Federation, paths.federation_file,
                                  fix=f"{FEDERATION_FILE} is written by init-federation: undo the hand edit.")


KEYGEN_HINT = ("Each site makes its own key pair with `fedtune client keygen --out DIR` and sends you only its "
               "auth.pub; enrol it with --site SITE_ID=path/to/auth.pub (or --site-keys DIR of <site-id>.pub files).")


def _check_site_ids(site_ids: Sequence[str], flag: str) -> None:
    for site_id in site_ids:
        if not is_site_id(site_id):
            raise ConfigError(flag, f"{site_id!r} is not a valid site id",
                              "Use letters, digits, '-', '_' or '.', e.g. hospital-a.")
    if len(set(site_ids)) != len(site_ids):
        raise ConfigError(flag, "a site id appears twice", "Give every site its own id.")


def read_site_keys(specs: Sequence[str] = (), key_dir: Optional[Path] = None) -> dict[str, bytes]:
    """The public keys the sites sent: ``--site ID=PATH`` (repeatable) and a folder of ``ID.pub`` files."""
    sources: list[tuple[str, str, Path]] = []
    for spec in specs:
        site_id, sep, path = spec.partition("=")
        if not sep or not site_id.strip() or not path.strip():
            raise ConfigError("--site", f"{spec!r} is not SITE_ID=PATH",
                              "Give each site as --site hosp-a=path/to/auth.pub (the public key it sent you).")
        sources.append(("--site", site_id.strip(), Path(path.strip()).expanduser()))
    if key_dir is not None:
        found = sorted(key_dir.glob("*.pub")) if key_dir.is_dir() else []
        if not found:
            raise ConfigError("--site-keys", f"{key_dir} is not a folder holding <site-id>.pub files",
                              "Save each site's auth.pub there as <site-id>.pub, e.g. hosp-a.pub.")
        sources += [("--site-keys", path.stem, path) for path in found]
    keys: dict[str, bytes] = {}
    for flag, site_id, path in sources:
        if site_id in keys:
            raise ConfigError(flag, f"site {site_id!r} is given twice", "Give every site exactly one public key.")
        if not path.is_file():
            raise ConfigError(flag, f"{path} (the public key of {site_id}) does not exist",
                              "Point it at the auth.pub the site sent you.")
        keys[site_id] = path.read_bytes()
    return keys


def _check_new_sites(paths: FederationPaths, enrolled: Sequence[EnrolledSite], site_keys: Mapping[str, bytes],
                     demo_sites: Sequence[str]) -> dict[str, bytes]:
    """Every new site's id and key checked before anything is written; returns the normalised keys."""
    if not isinstance(site_keys, Mapping):
        raise TypeError("site_keys maps each site id to the public key it sent; for a demo pass demo_sites=[...]")
    if not site_keys and not demo_sites:
        raise ConfigError("--site", "no site named", KEYGEN_HINT + " For a one-machine try-out: --sites a,b,c "
                          "--demo-keys.")
    _check_site_ids(list(site_keys), "--site")
    _check_site_ids(list(demo_sites), "--sites")
    new_ids = [*site_keys, *demo_sites]
    _check_site_ids(new_ids, "--site")
    clash = sorted({s.site_id for s in enrolled} & set(new_ids))
    if clash:
        raise ConfigError("--add-sites", f"already enrolled: {', '.join(clash)}", "Choose new site ids.")
    keys: dict[str, bytes] = {}
    owners = {s.fingerprint: s.site_id for s in enrolled}
    for site_id, data in site_keys.items():
        try:
            keys[site_id] = pki.check_node_public_key(data)
        except ValueError as exc:
            raise ConfigError("--site", f"the key given for {site_id}: {exc}",
                              "Ask the site for the auth.pub that `fedtune client keygen` wrote.") from None
        fingerprint = pki.public_key_fingerprint(keys[site_id])
        if fingerprint in owners:
            raise ConfigError("--site", f"{site_id} and {owners[fingerprint]} have the same public key ({fingerprint})",
                              "Every site makes its own key pair with `fedtune client keygen`; ask for its own.")
        owners[fingerprint] = site_id
    for site_id in demo_sites:
        if (paths.kit(site_id) / pki.SITE_PRIVATE_KEY).exists():
            raise ConfigError("--demo-keys", f"{paths.kit(site_id) / pki.SITE_PRIVATE_KEY} already exists",
                              "Use a new federation directory; demo keys never overwrite a key.")
    return keys


def _check_addresses(host: str, port: int, control_port: Optional[int],
                     tls_hosts: Optional[list[str]]) -> tuple[int, list[str]]:
    """The SuperLink's own port and the certificate's names, or a ConfigError naming the flag."""
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
    return control_port, hosts


def secure_server_state(paths: FederationPaths) -> None:
    """Create ``operator/``, ``superlink/`` and ``run/`` owner-only and tighten anything already there.

    They hold the CA key, the SuperLink's database (plain-mode updates), the federation
    ledger and the run's outputs; a federation made by an older fedtune had them 0755/0644.
    """
    for directory in paths.private_dirs:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        pki.restrict_tree(directory)


def init_federation(root: str | Path, site_keys: Optional[Mapping[str, bytes]] = None, host: str = "127.0.0.1",
                    port: int = DEFAULT_PORT, tls_hosts: Optional[list[str]] = None, name: str = "fedtune",
                    control_port: Optional[int] = None, demo_sites: Sequence[str] = ()) -> FederationPaths:
    """Create the CA, the SuperLink's certificate and one enrolment kit per site.

    ``site_keys`` maps each site id to the OpenSSH public key the site made itself
    (``fedtune client keygen``).  ``demo_sites`` are sites whose key pairs the operator
    generates into their kits: for a one-machine try-out only, as the operator then holds
    their private keys.
    """
    paths = FederationPaths(Path(root).expanduser().resolve())
    if paths.federation_file.exists():
        raise ConfigError("DIR", f"{paths.root} already holds a federation",
                          "Use a new directory, or `fedtune init-federation DIR --add-sites --site ID=PUBKEY` "
                          "to enrol more sites.")
    keys = _check_new_sites(paths, [], site_keys or {}, demo_sites)
    control_port, hosts = _check_addresses(host, port, control_port, tls_hosts)
    from fedtune.checkpoint import atomic_write_text

    with pki.private_umask():
        secure_server_state(paths)
        ca = pki.CertificateAuthority.create(name)
        pki.write_secret(paths.ca_key, ca.key_pem())
        pki.write_public(paths.ca_cert, ca.cert_pem())
        cert, key = ca.issue_server_cert(hosts)
        pki.write_public(paths.superlink_cert, cert)
        pki.write_secret(paths.superlink_key, key)
        pki.write_public(paths.superlink_ca, ca.cert_pem())
        fed = Federation(name=name, superlink_host=host, superlink_port=port, control_port=control_port,
                         tls_hosts=hosts)
        _enrol(paths, fed, ca, keys, demo_sites)
        atomic_write_text(paths.server_config, SERVER_TEMPLATE.format(num_sites=len(fed.sites)))
    log.info("federation %s created in %s with %d site kit(s)", name, paths.root, len(fed.sites))
    return paths


def add_sites(root: str | Path, site_keys: Optional[Mapping[str, bytes]] = None,
              demo_sites: Sequence[str] = ()) -> FederationPaths:
    """Enrol more sites into an existing federation (their public keys, new kits, same CA)."""
    paths, fed = load_federation(root)
    keys = _check_new_sites(paths, fed.sites, site_keys or {}, demo_sites)
    with pki.private_umask():
        ca = pki.CertificateAuthority.load(paths.ca_cert, paths.ca_key)
        _enrol(paths, fed, ca, keys, demo_sites)
    return paths


def _enrol(paths: FederationPaths, fed: Federation, ca: pki.CertificateAuthority, site_keys: dict[str, bytes],
           demo_sites: Sequence[str]) -> None:
    """Record each site's public key and write its kit; generate the demo sites' key pairs into theirs."""
    from fedtune.checkpoint import atomic_write_text

    if demo_sites:
        log.warning("--demo-keys: generating the private keys of %s into their kits (%s): whoever holds this "
                    "directory can act as these sites. Only for a try-out; real sites run `fedtune client keygen` "
                    "and send you their auth.pub.", ", ".join(demo_sites), paths.root / "sites")
    new = [(site_id, public, False) for site_id, public in site_keys.items()]
    new += [(site_id, pki.write_site_keypair(paths.kit(site_id))[1].read_bytes(), True) for site_id in demo_sites]
    for site_id, public, demo in new:
        kit = paths.kit(site_id)
        pki.write_secret(paths.site_public_key(site_id), public)  # owner-only, like all of operator/
        pki.write_public(kit / "ca.crt", ca.cert_pem())
        atomic_write_text(kit / "site.yaml", _site_yaml(site_id, fed.address, len(fed.sites), demo_key=demo))
        site = EnrolledSite(site_id=site_id, public_key=public.decode().strip(),
                            fingerprint=pki.public_key_fingerprint(public), operator_holds_key=demo)
        fed.sites.append(site)
        if not demo:
            log.info("enrolled %s (key %s); its kit %s holds no private key: the site keeps the auth.key it made "
                     "with `fedtune client keygen` beside the kit's site.yaml (or sets auth_private_key to its path)",
                     site_id, site.fingerprint, kit)
    save_federation(paths, fed)
    _write_rosters(paths, fed, ca)


def _write_rosters(paths: FederationPaths, fed: Federation, ca: pki.CertificateAuthority) -> None:
    """Every kit gets the CA-signed roster of all enrolled keys (sites enrolled earlier: copy it again)."""
    from fedtune.checkpoint import atomic_write_text
    from fedtune.deploy.roster import ROSTER_FILE, signed_roster

    text = signed_roster(fed.name, len(fed.sites), {s.site_id: s.public_key for s in fed.sites}, ca.key)
    for site in fed.sites:
        atomic_write_text(paths.kit(site.site_id) / ROSTER_FILE, text)
    log.info("roster version %d of %d enrolled site(s) written to every kit; sites enrolled before must copy "
             "their kit's roster.json again", len(fed.sites), len(fed.sites))


DEMO_EVAL_FILE = "eval.jsonl"


def write_demo_data(paths: FederationPaths, fed: Federation, demo_records: int = 6000, seed: int = 0) -> None:
    """Give every kit a ``data.jsonl``: its Dirichlet share of the built-in demo corpus; and the
    operator the corpus' held-out split as its own evaluation set (``operator/eval.jsonl``,
    named as ``data.eval_path`` in server.yaml).

    For trying a deployment on one machine; real sites point ``data.path`` at their own file,
    and a real operator names a held-out file it may hold, or none (then the server does
    not evaluate).
    """
    import json

    from fedtune.checkpoint import atomic_write_text
    from fedtune.config import DataConfig
    from fedtune.data import load_federated_data

    def jsonl(records: list) -> str:
        return "\n".join(json.dumps({"prompt": r.prompt, "response": r.response, "source": r.group})
                         for r in records) + "\n"

    data = load_federated_data(DataConfig(demo_records=demo_records, seed=seed), len(fed.sites))
    for index, site in enumerate(fed.sites):
        atomic_write_text(paths.kit(site.site_id) / "data.jsonl", jsonl(data.site_records(index)))
    held_out = paths.operator_dir / DEMO_EVAL_FILE
    atomic_write_text(held_out, jsonl(data.eval_records()))
    _name_eval_file(paths.server_config, held_out)


def _name_eval_file(server_config: Path, held_out: Path) -> None:
    """Add ``data.eval_path`` to server.yaml unless it has a data section of its own (then say so)."""
    import json

    from fedtune.checkpoint import atomic_write_text

    text = server_config.read_text(encoding="utf-8") if server_config.is_file() else ""
    if any(line.startswith("data:") for line in text.splitlines()):
        log.warning("%s has its own data section: add `eval_path: %s` to it for the server to evaluate",
                    server_config, held_out)
        return
    atomic_write_text(server_config, text + "data:\n  # The server's held-out set (the demo corpus' split); null: "
                      f"no server-side evaluation.\n  eval_path: {json.dumps(str(held_out))}\n")
