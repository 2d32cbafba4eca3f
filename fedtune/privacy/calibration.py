"""The noise multiplier σ that spends a site's whole budget over the run's schedule.

A fixed σ either leaves budget unspent (more noise than the budget asks for) or runs
out before the last round (a site stops training); neither is what a user who states
"ε = 8 over this run" means.  So ``privacy.noise_multiplier: null`` (the default) is
σ calibrated for the schedule: a site that trains every one of ``federation.num_rounds``
rounds of ``train.local_steps`` steps at rate ``privacy.sample_rate`` ends at ε just
under its target.  Only the server computes it (sites receive σ in each round's config
and check it against their own policy), so every party sees the same number.
"""

from __future__ import annotations

import functools
import warnings

from fedtune.config import FedtuneConfig
from fedtune.privacy.accounting import Charge, epsilon as epsilon_of


@functools.lru_cache(maxsize=64)
def calibrate_noise(epsilon: float, delta: float, sample_rate: float, rounds: int, local_steps: int,
                    accountant: str) -> float:
    """The noise multiplier σ at which a site training every round spends ``epsilon``.

    Opacus' search returns a σ whose ε is within 0.01 below the target; the result is
    checked against fedtune's own accounting of the per-round charges (what the ledger
    and the server will compute), so no run is refused for a rounding error.
    """
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        # "Optimal order is the largest alpha" while the search tries tiny σ: harmless here.
        warnings.simplefilter("ignore", UserWarning)
        sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                     steps=rounds * local_steps, accountant=accountant, epsilon_tolerance=0.005)
    for _ in range(50):
        history = [Charge(r, sigma, sample_rate, local_steps) for r in range(1, rounds + 1)]
        if epsilon_of(history, delta, accountant) <= epsilon:
            return float(sigma)
        sigma *= 1.001
    raise ValueError(f"could not calibrate σ for ε={epsilon}")


def noise_multiplier(cfg: FedtuneConfig) -> float:
    """The σ this run's rounds use: 0 without privacy, the configured one, or the calibrated one."""
    p = cfg.privacy
    if not p.enabled:
        return 0.0
    if p.noise_multiplier is not None:
        return float(p.noise_multiplier)
    return calibrate_noise(float(p.target_epsilon), float(p.delta), float(p.sample_rate),
                           int(cfg.federation.num_rounds), int(cfg.train.local_steps), p.accountant)
