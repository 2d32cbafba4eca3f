"""A simulated site's data as a stream of cohorts (``versions.stream_cohorts``).

Each site's records are split, in their order, into K contiguous cohorts ``c01``..``cK``;
the first ``versions.arrived_cohorts`` have arrived.  With ``versions.per_cohort_budget``
each arrived cohort is accounted against its own ``privacy.target_epsilon``
(:mod:`fedtune.privacy.cohorts`); without it the arrived records are one whole-site budget,
the baseline a stream experiment compares against.
"""

from __future__ import annotations

from typing import Union

from fedtune.config import FedtuneConfig
from fedtune.data.cohorts import CohortedRecords
from fedtune.data.records import Record
from fedtune.privacy.cohorts import CohortBudget


def cohort_name(index: int) -> str:
    return f"c{index + 1:02d}"


def arrived(cfg: FedtuneConfig) -> int:
    v = cfg.versions
    return v.stream_cohorts if v.arrived_cohorts is None else v.arrived_cohorts


def stream_records(records: list[Record], cfg: FedtuneConfig) -> Union[list[Record], CohortedRecords]:
    """The site's arrived records: as cohorts (per-cohort budgets) or one list (whole-site budget)."""
    k = cfg.versions.stream_cohorts
    if k == 0:
        return records
    bounds = [round(i * len(records) / k) for i in range(k + 1)]
    named = [(cohort_name(i), records[bounds[i]:bounds[i + 1]]) for i in range(arrived(cfg))]
    if not cfg.versions.per_cohort_budget:
        return [r for _, chunk in named for r in chunk]
    return CohortedRecords.of(named)


def stream_budgets(cfg: FedtuneConfig) -> tuple[CohortBudget, ...]:
    """The arrived cohorts' budgets of a simulated site (none without per-cohort budgets)."""
    if cfg.versions.stream_cohorts == 0 or not cfg.versions.per_cohort_budget:
        return ()
    return tuple(CohortBudget(cohort_name(i), cfg.privacy.target_epsilon, cfg.privacy.delta)
                 for i in range(arrived(cfg)))
