"""A hostile server talking to a real deployed site's ClientApp, in-process.

The site is built exactly as ``fedtune client`` builds it (``make_client_app(deployed=...)``
from a ``SiteConfig``); the "server" is the test, which crafts every message and run
config by hand.  Shared by the attack regression tests and the property-based tests.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtune import adapters
from fedtune.apps import RUN_CONFIG_KEY, make_client_app
from fedtune.config import FedtuneConfig, to_dict
from fedtune.deploy.site_config import SiteConfig
from fedtune.federation import protocol
from fedtune.federation.server import round_config
from fedtune.models import build_fingerprinted_model, lora_parameter_names
from fedtune.privacy.policy import SitePolicy

# A record no reply of the site may ever contain, whatever the server does.
PLANTED = "Zelda Quartermain, MRN 7731-PLANT, diagnosed with acute porphyria"


def server_config() -> FedtuneConfig:
    """What an honest server of a tiny federation would run."""
    cfg = FedtuneConfig()
    cfg.model.tiny.hidden_size, cfg.model.tiny.intermediate_size, cfg.model.tiny.num_heads = 32, 64, 2
    cfg.model.lora.rank = 4
    cfg.data.max_length = 64
    cfg.privacy.sample_rate, cfg.privacy.noise_multiplier = 0.2, 1.0
    cfg.train.local_steps = 2
    cfg.secagg.enabled = False
    return cfg


def write_site(home: Path, records: int = 40, site_id: str = "hosp-a", **policy: Any) -> SiteConfig:
    """A site's files (data with the planted record, ledger path) and its SiteConfig."""
    home.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": f"Routine cardiology note number {i}: blood pressure stable."})
             for i in range(records - 1)]
    lines.insert(records // 2, json.dumps({"text": PLANTED}))
    (home / "data.jsonl").write_text("\n".join(lines) + "\n")
    settings = {"require_secure_aggregation": False, "min_other_sites": 0, **policy}
    site = SiteConfig(site_id=site_id, policy=SitePolicy(**settings))
    site.budget.epsilon, site.budget.delta = 20.0, 1e-4
    site.base_dir = str(home)
    return site


def enrol_sites(root: Path, site_ids: list[str], real: int, **policy: Any) -> tuple[list[SiteConfig], dict]:
    """A federation as ``fedtune init-federation`` makes it: a CA, each site's own key, the CA-signed roster.

    The first ``real`` ids get a site directory (data, ledger, kit); the others are enrolled
    keys only, whose private keys are returned: fake sites the hostile operator enrolled.
    """
    from cryptography.hazmat.primitives import serialization

    from fedtune.deploy import pki
    from fedtune.deploy.roster import ROSTER_FILE, signed_roster

    ca = pki.CertificateAuthority.create("attack")
    public, fakes, sites = {}, {}, []
    for n, site_id in enumerate(site_ids):
        home = root / site_id
        if n < real:
            sites.append(write_site(home, site_id=site_id, **policy))
            (home / "ca.crt").write_bytes(ca.cert_pem())
            pki.write_site_keypair(home)
        else:
            pki.write_site_keypair(home)
            fakes[site_id] = serialization.load_ssh_private_key((home / pki.SITE_PRIVATE_KEY).read_bytes(), None)
        public[site_id] = (home / pki.SITE_PUBLIC_KEY).read_text().strip()
    roster = signed_roster("attack-fed", len(site_ids), public, ca.key)
    for site in sites:
        Path(str(site.base_dir), ROSTER_FILE).write_text(roster)
    return sites, fakes


@dataclass
class HostileServer:
    """Crafts messages for one deployed site and keeps every reply it got."""

    site: SiteConfig
    cfg: FedtuneConfig = field(default_factory=server_config)
    replies: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1
        self.app = make_client_app(deployed=self.site)
        self.built = build_fingerprinted_model(self.cfg.model)
        self.state = adapters.lora_state(self.built.model, lora_parameter_names(self.built.model))
        self.context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
        self.run_config_json: Optional[str] = None

    def round_record(self, round_number: int = 1, **changes: Any) -> ConfigRecord:
        record = round_config(self.cfg, round_number, self.built.fingerprint).to_record()
        for key, value in changes.items():
            if value is DELETE:
                del record[key]
            else:
                record[key] = value
        return record

    def send(self, content: dict, message_type: str = protocol.TRAIN) -> Message:
        raw = self.run_config_json if self.run_config_json is not None else json.dumps(to_dict(self.cfg))
        self.context.run_config = {RUN_CONFIG_KEY: raw}
        msg = Message(RecordDict(content), dst_node_id=7, message_type=message_type)
        reply = self.app(msg, self.context)
        self.replies.append(reply)
        return reply

    def train(self, round_number: int = 1, adapter: Optional[Any] = None, **changes: Any) -> Message:
        record = adapters.to_array_record(self.state) if adapter is None else adapter
        return self.send({protocol.GLOBAL_ADAPTER: record,
                          protocol.ROUND_CONFIG: self.round_record(round_number, **changes)})

    def charges(self) -> int:
        path = self.site.resolve(self.site.ledger_path)
        if not path.exists():
            return 0
        with sqlite3.connect(path) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM charges").fetchone()[0])

    def leaked(self, secret: str = PLANTED) -> list[str]:
        """Every reply that carries ``secret`` (or a telling piece of it) anywhere."""
        pieces = [secret, secret[:12], "7731-PLANT", "porphyria"]
        return [text for text in map(reply_text, self.replies) if any(p in text for p in pieces)]


class _Delete:
    pass


DELETE = _Delete()


def outcome(reply: Message) -> str:
    """'ok', 'refused' or 'error'."""
    if reply.has_error():
        return "error"
    return str(reply.content[protocol.STATUS]["status"])


def reason(reply: Message) -> str:
    if reply.has_error():
        return reply.error.reason
    return str(reply.content[protocol.STATUS].get("reason", ""))


def reply_text(reply: Message) -> str:
    """Everything readable in a reply: error reason, config and metric values, array bytes."""
    if reply.has_error():
        return f"{reply.error.code} {reply.error.reason}"
    parts = []
    for record in reply.content.config_records.values():
        parts += [f"{k}={v!r}" for k, v in record.items()]
    for metrics in reply.content.metric_records.values():
        parts += [f"{k}={v!r}" for k, v in metrics.items()]
    for arrays in reply.content.array_records.values():
        parts += [bytes(a.data).decode("latin-1") for a in arrays.values()]
    return "\n".join(parts)
