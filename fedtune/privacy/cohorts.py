"""Per-cohort privacy accounting: why a site's budget need not run out as new data arrives.

A site's data is a sequence of disjoint cohorts C_1, C_2, ... (e.g. one file per month).
Each round the site runs DP-SGD with Poisson sampling at rate q over the union of its
*active* cohorts, and charges the round to each of them; a cohort whose next round would
pass its own (ε, δ) budget *retires*: its records are no longer sampled.

**Claim.** Every release of the site, over all rounds, is (ε_c, δ_c)-DP with respect to
any one record x of cohort c, where ε_c is the accountant's ε over exactly the rounds in
which c was active (those the ledger charged to c, plus any whole-site rows).

**Proof sketch.** Fix x in c and two neighbouring datasets D, D' = D ∪ {x} (add/remove
adjacency).  In a round where c is retired, x is not in the sampled union, so the round's
output distribution is the same under D and D' (its sampler draws inclusion bits for the
active records only, and which cohorts are active depends on the ledger alone, which is a
function of the server's public round configs and earlier rounds, never of x).  Such a
round costs x nothing (post-processing of the rest).  In a round where c is active,
Poisson sampling includes x independently of every other record with probability q, so
each step is the Poisson-subsampled Gaussian mechanism with respect to x, whatever the
other active cohorts are: its RDP is that of Mironov et al. 2019 / Zhu & Wang 2019
("Poisson subsampled Rényi differential privacy", ICML), as Opacus computes it.  Adaptive
composition of RDP over the active rounds gives ε_c (Mironov 2017).  Records of other
cohorts are disjoint from c, so their rounds do not compose into x's loss: this is
parallel composition over disjoint subsets (McSherry 2009, "Privacy integrated queries",
SIGMOD, Thm. 4), which holds for Poisson sampling because inclusion is decided record by
record.  Retiring c when ε_c would pass its budget therefore bounds every record of c by
its cohort's budget, while a new cohort starts at ε = 0.  ∎

What it does not cover: a person with records in two cohorts is protected per record
(group privacy applies), and a record copied into two cohorts would compose both; so the
site refuses to start when two cohorts share a record (:func:`check_disjoint`).  The
expected batch size qN normalising each step uses N over the active cohorts; it is the
released record count already, and the noise is calibrated to C, not to N.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from fedtune.privacy.accounting import Charge, check_budget, epsilon
from fedtune.privacy.ledger import PrivacyLedger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CohortBudget:
    """One cohort's name and its own (ε, δ) budget, from the site's own configuration."""

    name: str
    epsilon: float
    delta: float


@dataclass(frozen=True)
class CohortDecision:
    """Which cohorts a round may sample from, and which are retired, with each one's ε after it."""

    active: tuple[str, ...]
    retired: tuple[str, ...]
    epsilon_after: dict[str, float]


def decide_cohorts(budgets: Sequence[CohortBudget], proposed: Charge, ledger: PrivacyLedger,
                   accountant: str) -> CohortDecision:
    """Split the cohorts into those whose budget affords ``proposed`` and the retired rest.

    The decision reads the ledger only (the site's own history of public round configs),
    never a record, so it is no release of its own (see the module docstring).
    """
    active, retired, after = [], [], {}
    for cohort in budgets:
        decision = check_budget(ledger.cohort_history(cohort.name), proposed, cohort.epsilon, cohort.delta,
                                accountant)
        (active if decision.allowed else retired).append(cohort.name)
        after[cohort.name] = decision.epsilon_after if decision.allowed else decision.epsilon_before
    if retired:
        log.info("cohorts retired (budget spent): %s; active: %s", ", ".join(retired), ", ".join(active) or "none")
    return CohortDecision(tuple(active), tuple(retired), after)


def cohort_epsilons(budgets: Sequence[CohortBudget], ledger: PrivacyLedger, accountant: str) -> dict[str, float]:
    """Each cohort's ε so far, at its own δ, recomputed from the ledger."""
    return {c.name: epsilon(ledger.cohort_history(c.name), c.delta, accountant) for c in budgets}


def record_fingerprint(fields: Iterable[Optional[object]]) -> bytes:
    """A digest of one record's content, to find a record present in two cohorts (never sent)."""
    hasher = hashlib.sha256()
    for value in fields:
        text = "" if value is None else repr(value)
        hasher.update(len(text).to_bytes(8, "big") + text.encode("utf-8"))
    return hasher.digest()


def check_disjoint(cohort_fingerprints: dict[str, list[bytes]]) -> Optional[tuple[str, str]]:
    """The first pair of cohorts that share a record, or None: cohorts must be disjoint."""
    owner: dict[bytes, str] = {}
    for name, prints in cohort_fingerprints.items():
        for digest in prints:
            other = owner.setdefault(digest, name)
            if other != name:
                return other, name
    return None


__all__ = ["CohortBudget", "CohortDecision", "check_disjoint", "cohort_epsilons", "decide_cohorts",
           "record_fingerprint"]
