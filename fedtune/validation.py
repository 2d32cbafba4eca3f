"""Validation of a whole run config: every section's rules, composed in one place.

The section rules live beside their schema (:mod:`fedtune.config`) or beside the code
whose limits they state (:mod:`fedtune.secagg.parameters`: the least number of sites,
a ring that cannot wrap) or beside the task they concern (``Task.check_config`` in
:mod:`fedtune.tasks`: the record format and classes a task needs).  Composing them here,
in a module nothing below it imports, keeps the config schema a leaf and secagg free of
any cycle back to it.
"""

from __future__ import annotations

import math

from fedtune.config import (
    FedtuneConfig,
    validate_data,
    validate_federation,
    validate_model,
    validate_privacy,
    validate_task,
    validate_train,
    validate_versions,
)
from fedtune.errors import require
from fedtune.privacy.accounting import MAX_NOISE_MULTIPLIER
from fedtune.privacy.calibration import noise_multiplier
from fedtune.secagg.parameters import validate_secagg
from fedtune.tasks import get_task


def validate(cfg: FedtuneConfig) -> None:
    """Check every value that can be checked without the data; raise ConfigError.

    Sections are checked in a fixed order, so a config with several mistakes always
    names the same first one.  A null federation.num_sites (by_field) must already have
    been counted in the data (:func:`fedtune.data.site_count.resolve_num_sites`).
    """
    validate_privacy(cfg.privacy)
    validate_train(cfg.train)
    validate_federation(cfg.federation)
    validate_versions(cfg.versions)
    require(not cfg.versions.on_new_cohort or cfg.federation.sites_per_round is None, "versions.on_new_cohort",
            "needs every site described before the first round, and federation.sites_per_round describes each "
            "only when a round samples it", "Set federation.sites_per_round=null, or versions.on_new_cohort=false.")
    validate_task(cfg.model, cfg.data)
    get_task(cfg.model.task).check_config(cfg.model, cfg.data)
    validate_data(cfg.data, cfg.federation.num_sites)
    require(cfg.federation.num_sites is not None, "federation.num_sites",
            "is null, and this entry point does not count the sites in the data (fedtune simulate and "
            "fedtune experiment do, for data.partition=by_field)",
            "Set federation.num_sites to the number of sites, or call fedtune.data.site_count.resolve_num_sites first.")
    if cfg.secagg.enabled:
        validate_secagg(cfg)
    validate_model(cfg.model)
    if cfg.privacy.enabled and cfg.privacy.noise_multiplier is None:
        validate_calibration(cfg)


def validate_calibration(cfg: FedtuneConfig) -> None:
    """A calibrated σ (privacy.noise_multiplier=null) exists and is one a site accepts."""
    p = cfg.privacy
    try:
        sigma = noise_multiplier(cfg)
    except ValueError:
        sigma = math.inf
    require(sigma <= MAX_NOISE_MULTIPLIER, "privacy.noise_multiplier",
            f"spending ε={p.target_epsilon:g} over {cfg.federation.num_rounds} rounds × {cfg.train.local_steps} "
            f"steps at q={p.sample_rate:g} needs σ > {MAX_NOISE_MULTIPLIER:g}, which sites refuse",
            "Raise privacy.target_epsilon, or lower privacy.sample_rate, train.local_steps or federation.num_rounds.")


def validate_against_data(cfg: FedtuneConfig, site_sizes: list[int], total_records: int) -> None:
    """Checks that need the partitioned data; run before any training starts."""
    f, p = cfg.federation, cfg.privacy
    require(f.num_sites <= total_records, "federation.num_sites",
            f"{f.num_sites} sites but only {total_records} training records",
            f"Use at most {total_records} sites, or more data.")
    empty = [i for i, n in enumerate(site_sizes) if n == 0]
    require(not empty, "federation.num_sites", f"sites {empty} received no records from the partitioner",
            "Use fewer sites, a larger data.dirichlet_alpha, or data.partition=iid.")
    if cfg.secagg.enabled:
        require(max(site_sizes) <= cfg.secagg.max_weight, "secagg.max_weight",
                f"a site holds {max(site_sizes)} records, above the masked weight bound {cfg.secagg.max_weight}",
                f"Set secagg.max_weight to at least {max(site_sizes)}.")
    if p.enabled:
        largest = max(site_sizes)
        require(p.delta < 1.0 / largest, "privacy.delta",
                f"δ={p.delta} is not below 1/records={1.0 / largest:.3g} for a site with {largest} records",
                f"Use δ < {1.0 / largest:.3g}, e.g. {10 ** math.floor(math.log10(0.1 / largest)):.0e}.")
