"""A site's disclosure of its data: the manifest fields it chooses, and per-cohort commitments.

What the site sends (in its description: when a server run starts, and after each round it
trained in, so that round's record states each cohort's ε after it) is only what ``manifest.disclose``
in its site.yaml names: any of the manifest's ``name``, ``licence``, ``provenance``,
``period``, ``deidentification`` (text the site's operator wrote, never a record), and with
``cohorts`` each cohort's name, period, record count, ε so far and commitment.

The commitment is HMAC-SHA256 of the cohort's file under a 32-byte key only the site holds
(``commitment_key`` in site.yaml, made 0600 on first use).  Without the key it reveals
nothing of the file (HMAC is a PRF); with it, the site can later show an auditor which
file it trained on (the auditor recomputes the HMAC).  The record count is the FedAvg
weight a plain round releases anyway; under secure aggregation it is released only here,
by choice.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
from pathlib import Path
from typing import Any, Optional

from fedtune.data.cohorts import CohortedRecords, cohorted
from fedtune.deploy.pki import write_secret
from fedtune.deploy.site_config import MANIFEST_FIELDS, SiteConfig
from fedtune.deploy.site_data import cohort_budgets
from fedtune.errors import ConfigError
from fedtune.privacy.cohorts import cohort_epsilons
from fedtune.privacy.ledger import PrivacyLedger

KEY_BYTES = 32
# The cohort a site without cohorts discloses its one data file as.
WHOLE_SITE_COHORT = "all"


def commitment_key(site: SiteConfig) -> bytes:
    """The site's own commitment key, created (0600, from OS entropy) if it does not exist yet."""
    path = site.resolve(site.commitment_key)
    if not path.is_file():
        write_secret(path, secrets.token_bytes(KEY_BYTES))
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise ConfigError("commitment_key", f"{path} is not a {KEY_BYTES}-byte commitment key",
                          "Restore the site's key from its backup (earlier commitments need it); only a new site "
                          "may delete the file to have a fresh key made.")
    return key


def commit_file(key: bytes, path: Path) -> str:
    """HMAC-SHA256 of the file's bytes under ``key``, as hex."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            mac.update(block)
    return mac.hexdigest()


def _cohorts(site: SiteConfig, data: CohortedRecords, key: bytes) -> list[dict[str, Any]]:
    ledger = PrivacyLedger(site.resolve(site.ledger_path), accountant=site.budget.accountant)
    if not site.data.cohorts:
        path = site.resolve(site.data.path)
        eps = ledger.epsilon(None, site.budget.delta)
        return [{"name": WHOLE_SITE_COHORT, "period": None, "records": len(data), "commitment": commit_file(key, path),
                 "epsilon": _finite(eps), "delta": site.budget.delta, "budget_epsilon": site.budget.epsilon}]
    spent = cohort_epsilons(cohort_budgets(site), ledger, site.budget.accountant)
    return [{"name": c.name, "period": c.period, "records": data.count(c.name),
             "commitment": commit_file(key, site.resolve(c.path)), "epsilon": _finite(spent[c.name]),
             "delta": b.delta, "budget_epsilon": b.epsilon}
            for c, b in zip(site.data.cohorts, cohort_budgets(site))]


def _finite(value: float) -> Optional[float]:
    """ε as JSON can carry it: a non-private site's infinite ε is null."""
    return value if math.isfinite(value) else None


def site_disclosure(site: SiteConfig, data: Any) -> Optional[str]:
    """The JSON the site's description carries, or None when it discloses nothing."""
    disclose = set(site.manifest.disclose)
    if not disclose:
        return None
    body: dict[str, Any] = {"manifest": {f: getattr(site.manifest, f) for f in MANIFEST_FIELDS if f in disclose}}
    if "cohorts" in disclose:
        body["cohorts"] = _cohorts(site, cohorted(data), commitment_key(site))
    return json.dumps(body, sort_keys=True)
