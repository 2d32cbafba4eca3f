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
from functools import lru_cache
from typing import Sequence

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.accountant import IAccountant

from fedtune.errors import ConfigError


# Above this σ a step's RDP is below 1e-3 at every order and the update is pure noise;
# Opacus' RDP series also slows down as σ grows (2 s per step at σ = 1e4) and never ends
# for σ = ∞, so a larger value is refused rather than accounted.
MAX_NOISE_MULTIPLIER = 100.0


class InvalidCharge(ValueError):
    """A charge that cannot be accounted (negative or zero steps, non-finite σ or q, ...).

    Raised at construction, so no code path (a round config, a ledger row, a history
    passed to :func:`epsilon`) can carry one: RDP is linear in steps, and one negative
    step count would have given a site its budget back.
    """


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Charge:
    """One round of local DP-SGD: ``steps`` Poisson-sampled steps at rate q and noise σ.

    σ = 0 is a valid charge (a non-private round) and makes ε infinite.
    """

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (_is_int(self.round) and self.round >= 0):
            raise InvalidCharge(f"round {self.round!r} is not an integer >= 0")
        if not (_is_int(self.steps) and self.steps >= 1):
            raise InvalidCharge(f"steps {self.steps!r} is not an integer >= 1")
        if not (_is_real(self.noise_multiplier) and 0 <= self.noise_multiplier <= MAX_NOISE_MULTIPLIER):
            raise InvalidCharge(f"noise multiplier {self.noise_multiplier!r} is not a finite number in "
                                f"[0, {MAX_NOISE_MULTIPLIER:g}]")
        if not (_is_real(self.sample_rate) and 0 < self.sample_rate <= 1):
            raise InvalidCharge(f"sample rate {self.sample_rate!r} is not in (0, 1]")


def make_accountant(name: str) -> IAccountant:
    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise ConfigError("privacy.accountant", f"unknown accountant '{name}'", "Use rdp or prv.")


def epsilon(history: Sequence[Charge], delta: float, accountant: str = "rdp") -> float:
    """ε after every charge in ``history`` at the given δ (0 for an empty history)."""
    if not history:
        return 0.0
    if not all(isinstance(c, Charge) for c in history):
        raise InvalidCharge("a history holds only Charge objects (validated when built)")
    if any(c.noise_multiplier == 0 for c in history):
        return math.inf
    if accountant == "rdp":
        return _rdp_epsilon(history, delta)
    acc = make_accountant(accountant)
    acc.history = [(c.noise_multiplier, c.sample_rate, c.steps) for c in history]
    return float(acc.get_epsilon(delta=delta))


@lru_cache(maxsize=4096)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """RDP of one Poisson-subsampled Gaussian step at Opacus' default orders.

    Opacus recomputes this (a series per fractional order, ~0.15 s) for every history
    entry on every query; the server and each site query ε several times a round, which
    made accounting 75% of a small simulation's time.  RDP composes by addition and is
    linear in the number of steps, so one cached vector per (σ, q) gives the same numbers.
    """
    return tuple(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                          orders=RDPAccountant.DEFAULT_ALPHAS))


def _rdp_epsilon(history: Sequence[Charge], delta: float) -> float:
    total = sum(np.asarray(_rdp_of_one_step(c.noise_multiplier, c.sample_rate)) * c.steps for c in history)
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=total, delta=delta)
    return float(eps)


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
