"""A site's own policy: which rounds it accepts, whatever the server asks.

The server dictates σ, q, the number of steps and the aggregation mode of every round;
the site's budget alone would let a server spend the whole budget in one round of
barely-noised steps, or ask for a plain (unmasked) update.  So each site states, in its
own ``site.yaml`` (the pattern of NVIDIA FLARE's site privacy policy), the least it
accepts; a round outside the policy is refused before the ledger is touched, with the
policy field named in the site's log and a fixed code to the server.

A simulation's virtual sites take :meth:`SitePolicy.permissive`: the researcher is both
server and sites.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from fedtune.errors import ConfigError, require
from fedtune.federation.protocol import (
    FINGERPRINT_HEX,
    MAX_LOCAL_STEPS,
    REFUSED_BASE_MODEL,
    REFUSED_POLICY,
    Refusal,
    RoundConfig,
)
from fedtune.privacy.accounting import MAX_NOISE_MULTIPLIER


@dataclass
class SitePolicy:
    # The least noise a site adds: below it, one round buys little utility for much ε.
    min_noise_multiplier: float = 0.3
    # The largest Poisson sampling rate and number of DP-SGD steps of one round.
    max_sample_rate: float = 0.5
    max_local_steps: int = 1000
    # Refuse any plain round: the server then only ever sees masked sums.
    require_secure_aggregation: bool = True
    # The least number of *other* sites this site's update is summed with.
    min_other_sites: int = 2
    # The SHA-256 base-model fingerprint the site expects (fedtune.models.base_fingerprint);
    # null: the fingerprint of the site's own model copy, whatever the server says.
    expected_base_fingerprint: Optional[str] = None
    # Largest |entry| of a global adapter the site loads; larger is a crafted adapter.
    max_adapter_value: float = 1e4

    @classmethod
    def permissive(cls, secure_aggregation: bool) -> "SitePolicy":
        """A simulated site: everything the protocol allows (the researcher runs every party)."""
        return cls(min_noise_multiplier=0.0, max_sample_rate=1.0, max_local_steps=MAX_LOCAL_STEPS,
                   require_secure_aggregation=secure_aggregation, min_other_sites=0,
                   max_adapter_value=1e6)


def validate_policy(policy: SitePolicy, prefix: str = "policy") -> None:
    """Check a site's policy (site.yaml) before the site starts; ConfigError names the field."""
    require(math.isfinite(policy.min_noise_multiplier) and 0 <= policy.min_noise_multiplier <= MAX_NOISE_MULTIPLIER,
            f"{prefix}.min_noise_multiplier", f"{policy.min_noise_multiplier} is not in [0, {MAX_NOISE_MULTIPLIER:g}]",
            "Use the least σ you accept, e.g. 0.5.")
    require(0 < policy.max_sample_rate <= 1, f"{prefix}.max_sample_rate", f"{policy.max_sample_rate} is not in (0, 1]",
            "Use the largest Poisson sampling rate you accept, e.g. 0.1.")
    require(1 <= policy.max_local_steps <= MAX_LOCAL_STEPS, f"{prefix}.max_local_steps",
            f"{policy.max_local_steps} is not in [1, {MAX_LOCAL_STEPS}]", "Use e.g. 100.")
    require(policy.min_other_sites >= 0, f"{prefix}.min_other_sites", f"{policy.min_other_sites} < 0",
            "Use 0 or more (2 or more with secure aggregation).")
    fingerprint = policy.expected_base_fingerprint
    if fingerprint is not None:
        require(len(fingerprint) == FINGERPRINT_HEX and all(c in "0123456789abcdef" for c in fingerprint),
                f"{prefix}.expected_base_fingerprint", "is not 64 lowercase hex digits",
                "Copy the fingerprint `fedtune client fingerprint` prints, or null.")
    require(math.isfinite(policy.max_adapter_value) and policy.max_adapter_value > 0, f"{prefix}.max_adapter_value",
            f"{policy.max_adapter_value} is not a positive number", "Use e.g. 10000.")


def _refuse(field_name: str, detail: str) -> Refusal:
    return Refusal(REFUSED_POLICY, f"policy.{field_name}: {detail}")


def check_round(rc: RoundConfig, policy: SitePolicy, require_privacy: bool, secure: bool) -> None:
    """Raise Refusal unless this site's policy accepts the round (no ledger is touched here)."""
    if require_privacy and not rc.private:
        raise Refusal(REFUSED_POLICY, f"budget.require_privacy: round {rc.round} asks for a non-private update")
    if rc.private and rc.noise_multiplier < policy.min_noise_multiplier:
        raise _refuse("min_noise_multiplier", f"σ = {rc.noise_multiplier:g} < {policy.min_noise_multiplier:g}")
    if rc.sample_rate > policy.max_sample_rate:
        raise _refuse("max_sample_rate", f"q = {rc.sample_rate:g} > {policy.max_sample_rate:g}")
    if rc.local_steps > policy.max_local_steps:
        raise _refuse("max_local_steps", f"{rc.local_steps} steps > {policy.max_local_steps}")
    if policy.require_secure_aggregation and not secure:
        raise _refuse("require_secure_aggregation", f"round {rc.round} asks for a plain (unmasked) update")


def check_base_model(rc: RoundConfig, own_fingerprint: str, policy: SitePolicy) -> None:
    """The server's base model, the site's own copy and the policy's pin must all agree."""
    if policy.expected_base_fingerprint is not None and own_fingerprint != policy.expected_base_fingerprint:
        raise Refusal(REFUSED_BASE_MODEL, "policy.expected_base_fingerprint: this site's own model copy hashes "
                      f"{own_fingerprint[:12]}…, not the pinned fingerprint")
    if rc.base_fingerprint != own_fingerprint:
        raise Refusal(REFUSED_BASE_MODEL, f"the server's base model {rc.base_fingerprint[:12]}… is not this site's "
                      f"{own_fingerprint[:12]}… (different weights or tokenizer)")


def check_aggregation_size(num_sites: int, policy: SitePolicy) -> None:
    """The server's claimed number of sites in the sum must leave this site enough company."""
    if num_sites - 1 < policy.min_other_sites:
        raise _refuse("min_other_sites", f"the round sums {num_sites} sites, fewer than 1 + {policy.min_other_sites}")


__all__ = ["SitePolicy", "check_aggregation_size", "check_base_model", "check_round",
           "validate_policy"]
