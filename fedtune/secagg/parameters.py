"""The secure-aggregation settings of a run: (k, t) for a round, and their validation.

These rules live beside the protocol and the quantiser they depend on (the least number
of sites, the default neighbour count, a ring that cannot wrap), so the config schema
needs nothing from secagg and secagg nothing but the schema's types.
"""

from __future__ import annotations

from fedtune.config import FedtuneConfig
from fedtune.errors import require
from fedtune.secagg.masks import Quantizer
from fedtune.secagg.protocol import MIN_SITES, default_neighbours


def secagg_parameters(cfg: FedtuneConfig, num_sites: int) -> tuple[int, int]:
    """(neighbours k, threshold t) for a round among ``num_sites`` sites."""
    k = min(cfg.secagg.neighbours if cfg.secagg.neighbours is not None else default_neighbours(num_sites),
            num_sites - 1)
    # Sites take a strict majority of their neighbours whatever the server asks
    # (fedtune.secagg.protocol.site_threshold); secagg.threshold can only raise it.
    t = max(cfg.secagg.threshold or 0, k // 2 + 1)
    return k, min(t, k)


def validate_secagg(cfg: FedtuneConfig) -> None:
    """Check the secagg section against the federation's size; raise ConfigError naming the field."""
    s, n = cfg.secagg, cfg.federation.num_sites
    require(n >= MIN_SITES, "secagg.enabled", f"secure aggregation needs at least {MIN_SITES} sites, got {n}",
            f"Use federation.num_sites >= {MIN_SITES}, or secagg.enabled=false.")
    if s.neighbours is not None:
        require(s.neighbours >= 2 and s.neighbours % 2 == 0, "secagg.neighbours",
                f"{s.neighbours} is not an even number ≥ 2", "Use an even k such as 6, or null for ~2·log2(n).")
    k, _ = secagg_parameters(cfg, n)
    if s.threshold is not None:
        require(2 <= s.threshold <= k, "secagg.threshold", f"{s.threshold} is not between 2 and neighbours={k}",
                f"Use a threshold in 2..{k} (a majority, {k // 2 + 1}, is the usual choice).")
    require(s.max_weight >= 1, "secagg.max_weight", f"{s.max_weight} < 1",
            "Use at least the largest site's record count.")
    Quantizer(bits=s.bits, clip_range=s.clip_range, max_weight=s.max_weight, num_sites=n).check()
