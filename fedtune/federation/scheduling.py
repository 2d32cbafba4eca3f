"""Who takes part in the next round: the sites whose budget affords it and that are reachable.

The server dictates σ, q and the number of steps, so it computes each site's ε from its
own ledger and never schedules a round that would take a site past its budget; the
site checks again on its side.  Which of the affordable sites are asked is a seeded
sample when ``federation.sites_per_round`` is set, drawn without first describing every site
(:class:`~fedtune.federation.membership.SiteDirectory`).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Optional

from flwr.serverapp import Grid

from fedtune.config import FedtuneConfig
from fedtune.federation import protocol
from fedtune.federation.membership import SiteDirectory, SiteInfo, reachable
from fedtune.privacy.calibration import noise_multiplier
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.tasks import training_settings

log = logging.getLogger(__name__)


def round_config(cfg: FedtuneConfig, round_number: int, base_fingerprint: str) -> protocol.RoundConfig:
    """The round config the server sends; a non-private run dictates σ = 0, a null σ the calibrated one."""
    p, t, steps = cfg.privacy, cfg.train, training_settings(cfg)
    return protocol.RoundConfig(
        round=round_number, noise_multiplier=noise_multiplier(cfg),
        sample_rate=p.sample_rate, local_steps=t.local_steps, max_grad_norm=p.max_grad_norm,
        learning_rate=steps.learning_rate, head_learning_rate=float(steps.head_learning_rate),
        optimizer=steps.optimizer, strategy=cfg.federation.strategy,
        private=p.enabled, dpo_beta=float(t.dpo_beta), base_fingerprint=base_fingerprint,
    )


def affordable(sites: list[SiteInfo], rc: protocol.RoundConfig, ledger: PrivacyLedger) -> list[SiteInfo]:
    """The sites that have not refused and whose ε after this round stays within budget."""
    charge = rc.charge()
    chosen = []
    for site in sites:
        if site.refused:
            continue
        if not rc.private or site.per_cohort_budget:
            # A site with cohort budgets checks them itself and refuses when all are spent.
            chosen.append(site)
            continue
        decision = ledger.check(site.name, charge, site.budget_epsilon, site.delta)
        if decision.allowed:
            chosen.append(site)
        else:
            log.info("not scheduling %s: round %d would raise its ε from %.3f to %.3f (budget %g)", site.name,
                     rc.round, decision.epsilon_before, decision.epsilon_after, site.budget_epsilon)
    return chosen


def exhausted_reason(rc: protocol.RoundConfig) -> str:
    """Why the run stops when no site can afford round ``rc.round``, with what to change."""
    return (f"no site has privacy budget left for round {rc.round}: one more round of "
            f"σ={rc.noise_multiplier}, q={rc.sample_rate}, {rc.local_steps} steps would exceed "
            "every site's ε budget. Raise privacy.target_epsilon (or privacy.noise_multiplier), "
            "or lower privacy.sample_rate or train.local_steps.")


@dataclass
class Scheduler:
    """Selects each round's sites: affordable, then reachable, then (optionally) a seeded sample."""

    grid: Grid
    ledger: PrivacyLedger
    min_sites: int
    wait_timeout_s: float
    sites_per_round: Optional[int] = None
    enrolled: Optional[dict[int, str]] = None
    seed: int = 0
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def select(self, directory: SiteDirectory, rc: protocol.RoundConfig) -> Optional[list[SiteInfo]]:
        """The sites of round ``rc.round`` sorted by name; None when no site can afford it."""
        if self.sites_per_round is None:
            eligible = affordable(directory.sites, rc, self.ledger)
        else:
            eligible = self._draw(directory, rc, self.sites_per_round)
        if not eligible:
            return None
        ready = reachable(self.grid, eligible, self.min_sites, self.wait_timeout_s, self.enrolled)
        count = min(len(ready), self.sites_per_round or len(ready))
        return sorted(self.rng.sample(ready, count), key=lambda s: s.name)

    def _draw(self, directory: SiteDirectory, rc: protocol.RoundConfig, wanted: int) -> list[SiteInfo]:
        """Up to ``wanted`` affordable sites, drawn uniformly: nodes in a seeded random order,
        each described at its first draw, until enough afford the round or every node was tried.

        Spent and refusing sites are skipped without a message, so a round asks about as many
        sites as it needs, however many the federation has.
        """
        order = self.rng.sample(directory.node_ids, len(directory.node_ids))
        eligible: list[SiteInfo] = []
        start = 0
        while len(eligible) < wanted and start < len(order):
            batch = order[start:start + wanted - len(eligible)]
            start += len(batch)
            eligible += affordable(directory.describe(batch), rc, self.ledger)
        return eligible
