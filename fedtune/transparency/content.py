"""What the server adds to each adapter record: the training method, the software, each site's ε.

All of it is the server's own knowledge: the σ, q, C and steps it dictated, its ledger's
ε per site (recomputed from those, over every version of the federation), and what each
site chose to disclose of its data when it described itself (:mod:`.disclosure`).  A
site's per-cohort ε is the site's own report (it alone knows when a cohort arrived); the
server's whole-site ε bounds it from above.
"""

from __future__ import annotations

import importlib.metadata
import math
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from fedtune import reporting
from fedtune.config import FedtuneConfig
from fedtune.privacy.calibration import noise_multiplier
from fedtune.privacy.ledger import PrivacyLedger

if TYPE_CHECKING:
    from fedtune.federation.membership import SiteInfo

SOFTWARE = ("fedtune", "torch", "transformers", "peft", "opacus", "flwr")


def software_versions() -> dict[str, str]:
    """The installed versions of the packages that made the adapter."""
    versions = {}
    for name in SOFTWARE:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def training_method(cfg: FedtuneConfig) -> dict[str, Any]:
    """How every round of the run trained: DP-SGD's parameters and the aggregation protocol."""
    p = cfg.privacy
    return {
        "dp_sgd": {"enabled": p.enabled, "noise_multiplier": noise_multiplier(cfg) if p.enabled else 0.0,
                   "sample_rate": p.sample_rate, "max_grad_norm": p.max_grad_norm,
                   "local_steps": cfg.train.local_steps, "accountant": p.accountant,
                   "privacy_unit": "one record"},
        "secure_aggregation": cfg.secagg.enabled,
    }


def run_content(cfg: FedtuneConfig) -> dict[str, Any]:
    """The record fields every version of one run shares, beside governance.run_identity's."""
    return {"method": training_method(cfg), "software": software_versions()}


def round_content(ledger: PrivacyLedger, sites: list["SiteInfo"], private: bool) -> dict[str, Any]:
    """The fields of one round's record: its date, each site's ε so far and its disclosure."""
    privacy = {}
    for site in sites:
        eps = ledger.epsilon(site.name, site.delta) if private else math.inf
        privacy[site.name] = {"epsilon": reporting.json_number(eps), "delta": site.delta,
                              "accountant": ledger.accountant, "per_cohort_budget": site.per_cohort_budget}
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "privacy": privacy,
            "disclosures": {s.name: s.disclosure for s in sites if s.disclosure}}
