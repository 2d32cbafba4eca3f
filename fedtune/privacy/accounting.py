"""ε from a history of DP-SGD charges, and budget checks.

ε is always recomputed from the whole history with an Opacus accountant (RDP by
default, PRV selectable): privacy loss does not add up linearly, so summing
per-round ε by hand would overstate it, and caching a running ε would let one bad
write corrupt the budget.  The history entries are exactly Opacus' own
``(noise_multiplier, sample_rate, steps)`` triples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant


@dataclass(frozen=True)
class Charge:
    """One round of local DP-SGD: ``steps`` Poisson-sampled steps at rate q and noise σ."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int


def make_accountant(name: str) -> IAccountant:
    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise ValueError(f"config error in 'privacy.accountant': unknown accountant '{name}'. Use rdp or prv.")


def epsilon(history: Sequence[Charge], delta: float, accountant: str = "rdp") -> float:
    """ε after every charge in ``history`` at the given δ (0 for an empty history)."""
    if not history:
        return 0.0
    if any(c.noise_multiplier == 0 for c in history):
        return math.inf
    acc = make_accountant(accountant)
    acc.history = [(c.noise_multiplier, c.sample_rate, c.steps) for c in history]
    return float(acc.get_epsilon(delta=delta))


@dataclass(frozen=True)
class BudgetDecision:
    allowed: bool
    epsilon_before: float
    epsilon_after: float
    budget: float


def check_budget(history: Sequence[Charge], proposed: Charge, budget: float, delta: float,
                 accountant: str = "rdp") -> BudgetDecision:
    """Would ``proposed`` keep the history within ``budget``?"""
    before = epsilon(history, delta, accountant)
    after = epsilon([*history, proposed], delta, accountant)
    return BudgetDecision(allowed=after <= budget, epsilon_before=before, epsilon_after=after, budget=budget)
