"""Split a pooled dataset into simulated sites (iid or Dirichlet non-iid), seeded."""

from __future__ import annotations

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


def partition(records: list[Record], num_sites: int, method: str, alpha: float, seed: int) -> list[list[int]]:
    """Indices of each site's records."""
    if method == "iid":
        return partition_iid(len(records), num_sites, seed)
    groups = [r.group for r in records]
    if any(g is None for g in groups):
        raise ConfigError("data.partition", "dirichlet needs a group label on every record "
                          "(the field named by data.group_field)", "Add it to the data, or use data.partition=iid.")
    return partition_dirichlet([str(g) for g in groups], num_sites, alpha, seed)


def train_eval_split(n_records: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = np.random.default_rng(seed + 7919).permutation(n_records)
    n_eval = max(1, int(round(n_records * eval_fraction)))
    return sorted(order[n_eval:].tolist()), sorted(order[:n_eval].tolist())
