"""Split a pooled dataset into simulated sites: iid, Dirichlet non-iid (seeded), or one site per group."""

from __future__ import annotations

from typing import Optional

import numpy as np

from fedtune.data.records import Record
from fedtune.errors import ConfigError

MIN_RECORDS_PER_SITE = 2
_MAX_DRAWS = 100


def partition_iid(n_records: int, num_sites: int, seed: int) -> list[list[int]]:
    order = np.random.default_rng(seed).permutation(n_records)
    return [sorted(part.tolist()) for part in np.array_split(order, num_sites)]


def partition_dirichlet(groups: list[str], num_sites: int, alpha: float, seed: int) -> list[list[int]]:
    """Each group's records are spread over sites in Dirichlet(α) proportions.

    As in Flower Datasets' DirichletPartitioner, proportions are redrawn until every
    site holds at least MIN_RECORDS_PER_SITE records (bounded number of draws).
    """
    rng = np.random.default_rng(seed)
    labels = np.array(groups)
    classes = sorted(set(groups))
    minimum = min(MIN_RECORDS_PER_SITE, len(groups) // max(num_sites, 1))
    for _ in range(_MAX_DRAWS):
        sites: list[list[int]] = [[] for _ in range(num_sites)]
        for cls in classes:
            idx = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet([alpha] * num_sites)
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for site, part in enumerate(np.split(idx, cuts)):
                sites[site].extend(part.tolist())
        if min(len(s) for s in sites) >= minimum:
            break
    return [sorted(s) for s in sites]


def partition_by_field(groups: list[str], min_records: int) -> list[list[int]]:
    """One site per distinct group with at least ``min_records`` records, in the groups' sorted order.

    The natural partition of LEAF-style benchmarks (one client per speaking role, per
    writer): sites differ as the data's own owners do.  Smaller groups are left out of
    training (a site of one record would make a useless, noisy update).  A dict of index
    lists built in one pass, so a thousand sites cost what ten do.
    """
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    return [members[g] for g in sorted(members) if len(members[g]) >= min_records]


def _groups(records: list[Record], method: str) -> list[str]:
    groups = [r.group for r in records]
    if any(g is None for g in groups):
        raise ConfigError("data.partition", f"{method} needs a group label on every record "
                          "(the field named by data.group_field)", "Add it to the data, or use data.partition=iid.")
    return [str(g) for g in groups]


def partition(records: list[Record], num_sites: Optional[int], method: str, alpha: float, seed: int,
              min_records: int = MIN_RECORDS_PER_SITE) -> list[list[int]]:
    """Indices of each site's records.

    ``by_field`` checks the data makes exactly ``num_sites`` sites; None takes as many as
    it makes (:func:`fedtune.data.site_count.resolve_num_sites`).  The other methods need a number.
    """
    if method in ("iid", "dirichlet") and num_sites is None:
        raise ConfigError("federation.num_sites", f"is null, but data.partition={method} needs a number of sites",
                          "Set federation.num_sites, or use data.partition=by_field (one site per group).")
    if method == "iid":
        return partition_iid(len(records), num_sites, seed)  # type: ignore[arg-type]
    if method == "dirichlet":
        return partition_dirichlet(_groups(records, method), num_sites, alpha, seed)  # type: ignore[arg-type]
    sites = partition_by_field(_groups(records, method), min_records)
    if num_sites is not None and len(sites) != num_sites:
        raise ConfigError("federation.num_sites",
                          f"data.partition=by_field makes one site per distinct data.group_field value with at "
                          f"least data.min_records_per_site={min_records} training records: this data has "
                          f"{len(sites)}, not {num_sites}",
                          f"Set federation.num_sites={len(sites)} or null (the number the data makes), or "
                          "change data.min_records_per_site.")
    return sites


def train_eval_split(n_records: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = np.random.default_rng(seed + 7919).permutation(n_records)
    n_eval = max(1, int(round(n_records * eval_fraction)))
    return sorted(order[n_eval:].tolist()), sorted(order[:n_eval].tolist())
